"""The static feature dashboard and run report (``mmsae dashboard``).

``build_dashboard(DashboardConfig(run=RUN))`` reads whatever the run folder holds (SAE config and
training log, metrics, feature index, explanations, scores, steering, attribution), writes a
static site to ``RUN/site`` and returns the path of its ``index.html``. The site opens from disk
(file://) with no server: data lives in small ``.js`` files loaded by ``<script>`` elements, so
neither ``fetch`` nor a server is needed; ``serve=True`` also serves it on 127.0.0.1.

Site layout::

    index.html          feature list: search, sort, filter, paginated, chunks loaded on demand
    feature.html#F      one feature: explanation, scores vs baselines, histogram, top images
                        (raw / overlay / mask), top tokens in context, steering examples
    report.html         run report: model, layer, SAE config, training curves, metrics,
                        the paper-style score table, steering and attribution
    assets/             the site's own JavaScript and CSS (no CDN, nothing from the network)
    data/meta.js        run summary; data/list/NNNNN.js the list chunks; data/f/BBB/F.js features
    img/ plots/         JPEG thumbnails, heat-map overlays and masks; report figures
"""

from __future__ import annotations

import functools
import http.server
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import MmsaeError
from ..config import check_config
from ..io import ensure_dir, no_space_guard
from .features import write_features, write_list, list_rows
from .pages import copy_assets, write_feature_page, write_index_page, write_report
from .rundata import RunData, load_run
from .safe import js_put, write_file

SITE_MARKER = ".mmsae-site"


@dataclass
class DashboardConfig:
    run: str = field(metadata={"help": "run folder (what `mmsae demo` or the stages wrote)"})
    out: str | None = field(default=None, metadata={"help": "site folder (default: RUN/site)"})
    sae: str | None = field(default=None, metadata={"help": "SAE folder (default: RUN/sae)"})
    serve: bool = field(default=False, metadata={"help": "after building, serve the site on 127.0.0.1 until Ctrl-C"})
    port: int = field(default=8000, metadata={"help": "port for --serve (0 picks a free one)", "min": 0, "max": 65535})
    max_features: int = field(default=2000, metadata={
        "help": "write pages (with images) for at most this many features, best first: scored, then explained, then "
                "most frequent; the list always holds every feature. Pass 0 for no limit", "min": 0})
    n_images: int = field(default=5, metadata={"help": "top images shown per feature", "min": 0})
    thumb_size: int = field(default=224, metadata={"help": "longest side of the image thumbnails, in pixels", "min": 16})
    chunk_size: int = field(default=1000, metadata={"help": "features per list chunk file", "min": 1})
    page_size: int = field(default=50, metadata={"help": "features per page of the list", "min": 1})
    dense_threshold: float = field(default=0.1, metadata={"help": "a feature firing more often than this is dense",
                                                          "min": 0, "max": 1})
    title: str | None = field(default=None, metadata={"help": "site title (default: the run folder's name)"})

    def __post_init__(self):
        check_config(self)


def _check_out(site: Path) -> None:
    """Refuse to replace a folder that is neither empty nor a site this function built."""
    if site.exists() and (not site.is_dir() or (any(site.iterdir()) and not (site / SITE_MARKER).exists())):
        raise MmsaeError(f"{site} exists and is not a dashboard folder; pass an empty or new --out")


def _swap_in(building: Path, site: Path) -> None:
    """Replace ``site`` by the finished ``building`` folder with renames, so no half-built site is ever seen.

    The old site (empty, or marked as built here) moves to a fresh hidden name first and is deleted
    from there: nothing but it is ever removed."""
    _check_out(site)  # again: the build took a while
    old = Path(tempfile.mkdtemp(prefix=f".{site.name}.old-", dir=site.parent))
    if site.exists():
        site.rename(old)  # onto the empty folder just made (POSIX rename replaces an empty folder)
    building.rename(site)
    shutil.rmtree(old, ignore_errors=True)


def _drop_unfinished(site: Path) -> None:
    """Delete what a killed build left beside ``site``: hidden copies that carry the dashboard's marker."""
    for p in list(site.parent.glob(f".{site.name}.building*")) + list(site.parent.glob(f".{site.name}.old*")):
        if p.is_dir() and (p / SITE_MARKER).exists():
            shutil.rmtree(p, ignore_errors=True)


def _write_site(building: Path, cfg: DashboardConfig, data: RunData, rows: list[dict], facts: dict, title: str) -> list:
    """Write every file of the site into ``building``; returns the features that got a page."""
    (building / SITE_MARKER).write_text("made by mmsae dashboard; the folder is replaced on each build\n")
    pages = write_features(building, data, rows, cfg.max_features or None, cfg.n_images, cfg.thumb_size)
    n_chunks = write_list(building, rows, cfg.chunk_size)
    meta = {
        "title": title, "model": data.model, "layer": data.layer, "hook_point": data.hook_point,
        "num_latents": data.num_latents, "n_rows": len(rows), "n_live": len(rows) - facts["n_dead"],
        "n_chunks": n_chunks, "chunk_size": cfg.chunk_size, "page_size": cfg.page_size,
        "n_feature_pages": len(pages), "dense_threshold": cfg.dense_threshold,
        "missing": data.missing, "problems": data.problems, **facts,
    }
    write_file(building / "data" / "meta.js", js_put("meta", meta))
    copy_assets(building)
    write_index_page(building, title)
    write_feature_page(building, title)
    write_report(building, data, facts, title, pages)
    return pages


def build_dashboard(cfg: DashboardConfig) -> Path:
    """Build the site from ``cfg.run``; returns the path of its index.html (and prints both pages)."""
    data = load_run(cfg.run, cfg.sae)
    site = Path(cfg.out) if cfg.out else Path(cfg.run) / "site"
    _check_out(site)
    ensure_dir(site.parent)
    _drop_unfinished(site)
    building = Path(tempfile.mkdtemp(prefix=f".{site.name}.building-", dir=site.parent))  # a fresh name: no one else's
    title = cfg.title or Path(cfg.run).resolve().name

    rows, facts = list_rows(data, cfg.dense_threshold)
    with no_space_guard(site):
        try:
            pages = _write_site(building, cfg, data, rows, facts, title)
            _swap_in(building, site)
        except BaseException:
            shutil.rmtree(building, ignore_errors=True)  # the unfinished copy; a rerun builds it afresh
            raise
    index = site / "index.html"
    n_live = len(rows) - facts["n_dead"]
    if len(pages) < n_live:
        print(f"dashboard: pages for the best {len(pages)} of {n_live} live features (--max-features); the list has all")
    print(f"dashboard: {index.resolve()}")
    print(f"run report: {(site / 'report.html').resolve()}")
    if cfg.serve:
        serve(site, cfg.port)
    return index


def make_server(site: Path, port: int = 8000) -> http.server.ThreadingHTTPServer:
    """An HTTP server for ``site`` bound to 127.0.0.1 only (call ``serve_forever`` on it)."""
    handler = functools.partial(_QuietHandler, directory=str(site))
    try:
        return http.server.ThreadingHTTPServer(("127.0.0.1", port), handler)
    except OSError as e:
        raise MmsaeError(f"cannot serve on 127.0.0.1:{port} ({e.strerror}); pass another --port (0 picks a free one)") from e


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 - the base class's name
        pass


def serve(site: Path, port: int = 8000) -> None:
    """Serve ``site`` on 127.0.0.1 until interrupted."""
    with make_server(site, port) as server:
        print(f"serving http://127.0.0.1:{server.server_address[1]}/ (Ctrl-C stops)", flush=True)
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            pass


__all__ = ["DashboardConfig", "build_dashboard", "make_server", "serve"]
