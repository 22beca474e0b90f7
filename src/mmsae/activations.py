"""Harvesting one layer's activations into a sharded store, and reading the store back.

``harvest(HarvestConfig)`` streams a data source through a model adapter, stops each forward pass
after the wanted layer and writes the kept tokens' residual-stream vectors to
``shard-R-NNNNN.safetensors`` files (R = rank) with a ``manifest.json`` (format in
docs/architecture.md). Shards are written atomically and always end at a sample boundary; after
each shard the rank's ``progress-R.json`` records which samples are done, so rerunning the same
command after a crash or ``kill -9`` resumes exactly where the last shard ended (no sample
duplicated or dropped). Under ``torchrun`` rank r takes the samples whose id % world == r.
The wanted tokens are gathered on the device and copied to the host without blocking; a writer
thread builds and writes the shards while the next batches run (one or two shards in flight).

``ActivationStore(dir)`` reads a store back: token counts, metadata and a deterministic, shuffled
stream of float32 batches that holds only a few shards in memory at a time.
"""

from __future__ import annotations

import dataclasses
import math
import os
import queue
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import numpy as np
import torch
from tqdm import tqdm

from .config import check_config
from .data import Sample
from .data.sources import DEFAULT_PROMPT, open_source
from .errors import MmsaeError
from .exclusion import TokenExclusion
from .io import claim_dir, is_no_space, json_format, no_space_error, read_json, save_tensors, write_json
from .models.sites import Site, parse_site, site_dirname
from .runtime import barrier, check_dtype, init_distributed, out_of_memory_guard, resolve_device

FORMAT = "mmsae-activations"
VERSION = 1
STORE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
METADATA_KEYS = ("sample", "pos", "is_image", "tile", "row", "col")
TokenKind = Literal["all", "image", "text"]
# Settings that change what a store holds; a resumed run must use the same ones.
# (The store dtype is checked once the model is loaded, as "auto" depends on where it runs.)
_RESUME_KEYS = ("model", "layer", "site", "data", "tokens", "max_tokens", "max_samples", "model_dtype",
                "prompt", "split", "image_column", "text_column", "shard_size", "exclude_token_ids", "exclude_norm_above")


@dataclass
class HarvestConfig:
    """What ``mmsae harvest`` runs: one model layer over one data source, into one store folder."""

    model: str = field(metadata={"help": "model hub id or local path"})
    data: str = field(metadata={"help": "image folder, .jsonl of {image, text}, Hugging Face dataset (name or path) or shapes:N[:SEED]"})
    out: str = field(metadata={"help": "store folder (created; rerun the same command to resume); with several --site, one store per site in OUT/<site> (lm:2 -> OUT/lm-2)"})
    layer: Optional[int] = field(default=None, metadata={"help": "decoder layer whose output (the residual stream) is stored, 0-based: the same as --site lm:LAYER", "min": 0})
    site: Optional[list[str]] = field(default=None, metadata={"help": "sites to store (lm:L, vision:L, projector; one forward pass for all): vision and projector sites store the image-patch rows"})
    tokens: Literal["all", "image", "text"] = field(default="all", metadata={"help": "which tokens to keep"})
    max_tokens: Optional[int] = field(default=None, metadata={"help": "stop after this many tokens (over all ranks)", "min": 1})
    max_samples: Optional[int] = field(default=None, metadata={"help": "use only the first N samples of the source", "min": 1})
    store_dtype: Literal["auto", "float32", "bfloat16", "float16"] = field(default="auto", metadata={"help": "dtype the activations are stored in; auto = bfloat16 when the model runs on a GPU, else float32 (manifest.json records the one used)"})
    model_dtype: Literal["float32", "bfloat16", "float16"] = field(default="float32", metadata={"help": "dtype the model runs in"})
    batch_size: int = field(default=8, metadata={"help": "samples per forward pass", "min": 1})
    device: str = field(default="auto", metadata={"help": "torch device; auto = this rank's GPU if any, else cpu"})
    device_map: Optional[Literal["auto"]] = field(default=None, metadata={"help": "auto = spread a model too large for one GPU over all GPUs (and CPU memory) with accelerate; one process, instead of --device"})
    prompt: str = field(default=DEFAULT_PROMPT, metadata={"help": "text for samples that have none (image-only sources)"})
    split: str = field(default="train", metadata={"help": "dataset split"})
    image_column: Optional[str] = field(default=None, metadata={"help": "dataset image column (default: detected)"})
    text_column: Optional[str] = field(default=None, metadata={"help": "dataset text column (default: detected)"})
    shard_size: int = field(default=32768, metadata={"help": "tokens per shard (shards end at sample boundaries)", "min": 1})
    exclude_token_ids: Optional[list[int]] = field(default=None, metadata={"help": "leave out tokens with these ids (e.g. BOS); recorded in manifest.json", "min": 0})
    exclude_norm_above: Optional[float] = field(default=None, metadata={"help": "leave out tokens whose norm is above this multiple of their sequence's median token norm (attention sinks; e.g. 10)", "gt": 1})
    trust_remote_code: bool = field(default=False, metadata={"help": "allow the model's own code from the hub"})
    overwrite: bool = field(default=False, metadata={"help": "write into an --out folder that holds other files (they are kept)"})

    def __post_init__(self):
        check_config(self)
        if self.device_map is not None and self.device != "auto":
            raise MmsaeError(f"--device-map {self.device_map} places the model itself; leave out --device {self.device}")
        if (self.layer is None) == (self.site is None):
            raise MmsaeError("harvest needs --layer L or --site SITE [SITE ...], not both" if self.layer is not None
                             else "harvest needs --layer L or --site SITE [SITE ...]; give one")
        sites = self.sites()
        if len(set(sites)) != len(sites):
            raise MmsaeError(f"--site {' '.join(self.site)} names a site twice; give each once")
        image_sites = [str(s) for s in sites if s.kind != "lm"]
        if image_sites and (self.exclude_token_ids is not None or self.exclude_norm_above is not None):
            raise MmsaeError(f"--exclude-token-ids / --exclude-norm-above apply to lm sites only; harvest {', '.join(image_sites)} without them")
        if image_sites and self.tokens == "text":
            raise MmsaeError(f"--tokens text keeps nothing at {', '.join(image_sites)} (image-patch rows only); harvest those sites with --tokens all")

    def sites(self) -> list[Site]:
        """The sites to store: ``--site`` parsed, or ``lm:LAYER``."""
        sites = [Site.lm(self.layer)] if self.site is None else [parse_site(s) for s in self.site]
        for site in sites:
            if site.kind == "module":
                raise MmsaeError(f"--site {site}: harvest stores lm:L, vision:L and projector sites, not other modules")
        return sites


# --------------------------------------------------------------------------------------------
# harvesting
# --------------------------------------------------------------------------------------------


def harvest(cfg: HarvestConfig) -> ActivationStore | dict[str, ActivationStore]:
    """Run ``cfg.model`` over ``cfg.data`` and store the activations at ``cfg.sites()`` in ``cfg.out``.

    One site: the store is ``cfg.out`` (returned). Several: one forward pass per batch feeds one
    store per site, ``cfg.out/<site>`` (``lm:2`` -> ``lm-2``; returned as {site name: store}).
    Resumable: rerunning with the same config continues each store after its last complete
    shard. Under ``torchrun`` every rank writes its own shards; rank 0 writes the manifests.
    """
    device = resolve_device(cfg.device)
    check_dtype(cfg.model_dtype, device, "--model-dtype")
    rank, world = init_distributed(device)
    sites = cfg.sites()
    out = Path(cfg.out)
    outs = {sites[0]: out} if len(sites) == 1 else {site: out / site_dirname(site) for site in sites}
    if rank == 0:  # one claim: ranks checking an empty folder at once would see each other's marker
        if len(sites) > 1:
            claim_dir(out, "harvest", cfg.overwrite)
        for folder in outs.values():
            claim_dir(folder, "harvest", cfg.overwrite, legacy=_is_store_folder)
    barrier(world)
    progress = {site: _start_progress(folder, cfg, rank, world) for site, folder in outs.items()}
    if not all(p["done"] for p in progress.values()):  # (the shards written before running out of memory stay: a rerun resumes)
        with out_of_memory_guard("harvest", device, "--batch-size or --shard-size"):
            _harvest_rank(cfg, outs, progress, rank, world, device)
    barrier(world)
    if rank == 0:
        for site, folder in outs.items():
            at = f" at {site}" if len(sites) > 1 else ""
            merged = _merge_progress(folder)
            if merged["complete"] and merged["stats"]["n_tokens"] == 0:  # (one process stops earlier, in _harvest_rank)
                if merged["stats"]["n_excluded"]:
                    TokenExclusion.of(cfg).check_kept(0, f"data {cfg.data}")
                raise MmsaeError(f"data {cfg.data} gave no tokens to store{at}; fix the data or choose another --data")
            manifest = _write_manifest(folder)
            if manifest["complete"]:
                stats = manifest["stats"]
                tqdm.write(f"harvest: {stats['n_tokens']} tokens from {stats['n_samples']} samples in {folder}"
                           + (f"; skipped {stats['n_skipped']} unreadable samples (listed in manifest.json)"
                              if stats["n_skipped"] else ""), file=sys.stderr)
    stores = {str(site): ActivationStore(folder) for site, folder in outs.items()}
    return stores[str(sites[0])] if len(sites) == 1 else stores


def _progress_path(out: Path, rank: int) -> Path:
    return out / f"progress-{rank}.json"


def _start_progress(out: Path, cfg: HarvestConfig, rank: int, world: int) -> dict:
    """This rank's progress: a fresh record, or the one a previous run left (checked to match)."""
    config = dataclasses.asdict(cfg)
    for path in sorted(out.glob("progress-*.json")):
        other = read_json(path)
        changed = [k for k in _RESUME_KEYS if other["config"].get(k) != config[k]]
        if changed:
            k = changed[0]
            raise MmsaeError(f"{out} holds a harvest with {k}={other['config'].get(k)!r}, not {config[k]!r}; "
                             "rerun with the same settings to resume, or choose a new --out")
        if other["world"] != world:
            raise MmsaeError(f"{out} was harvested by {other['world']} processes, not {world}; "
                             f"resume with the same number of processes, or choose a new --out")
    if not any(out.glob("progress-*.json")) and (out / "manifest.json").exists():
        raise MmsaeError(f"{out} already holds an activation store with no resumable progress; choose a new --out")
    path = _progress_path(out, rank)
    if path.exists():
        progress = read_json(path)
    else:
        progress = {"rank": rank, "world": world, "config": config, "next_sample": 0, "samples_done": 0,
                    "n_tokens": 0, "done": False, "shards": [], "skipped": [], "seconds": {}}
    # Remove what a killed run left beyond its last recorded shard: temp files and unrecorded shards.
    recorded = {s["file"] for s in progress["shards"]}
    for leftover in list(out.glob(f"shard-{rank}-*.safetensors")) + list(out.glob(f".shard-{rank}-*.tmp")) \
            + list(out.glob(f".progress-{rank}.json.*.tmp")):
        if leftover.name not in recorded:
            if leftover.name.startswith("shard-") and not _is_own_shard(leftover):
                raise MmsaeError(f"{leftover} is not a shard mmsae wrote; move it away or choose a new --out")
            leftover.unlink()
    return progress


def _is_own_shard(path: Path) -> bool:
    """Whether ``path`` is a shard a harvest wrote (its safetensors metadata names the store format)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            return (f.metadata() or {}).get("format") == FORMAT
    except Exception:  # safetensors raises its own error types for files that are not safetensors
        return False


def _is_store_folder(path: Path) -> bool:
    """A store folder a harvest wrote before output folders were marked (for ``claim_dir``)."""
    return any(path.glob("progress-*.json")) or json_format(path / "manifest.json") == FORMAT


class _ShardWriter:
    """Buffers token rows and hands each finished shard to a writer thread.

    The thread builds the shard (one tensor per column, the NaN/inf check, norms), writes it and
    then the rank's progress, both atomically and in order, so ``progress-R.json`` only ever names
    shards that are fully on disk. That keeps the host copy and the disk off the forward pass's
    critical path. At most ``depth`` shards wait for the thread (``flush`` blocks beyond that), so
    host memory stays bounded. An error in the thread is raised in the caller at its next
    ``flush`` or at ``close``; ``close`` joins the thread and must be called on every exit path.
    """

    def __init__(self, out: Path, progress: dict, dtype: torch.dtype, depth: int = 1):
        self.out, self.progress, self.dtype = out, progress, dtype
        self.parts: list[dict[str, torch.Tensor]] = []
        self.events: list = []  # CUDA events after which this shard's host copies are complete
        self.buffered = 0
        self.n_shards = len(progress["shards"])  # shards handed to the thread (names the next one)
        self.n_excluded = progress.get("n_excluded", 0)  # the thread owns ``progress``; this is the loop's count
        self.pending_skips: list[tuple[int, str]] = []  # appended by the prefetch thread
        self.lock = threading.Lock()
        self.jobs: queue.Queue = queue.Queue(maxsize=depth)
        self.thread: threading.Thread | None = None  # started by the first flush
        self.error: BaseException | None = None
        self.abort = threading.Event()

    def skip(self, sample_id: int, reason: str) -> None:
        with self.lock:
            self.pending_skips.append((sample_id, reason))

    def wait_for(self, events: list) -> None:
        """The rows added next are read only after ``events`` (their device-to-host copies) complete."""
        self.events += events

    def add(self, part: dict[str, torch.Tensor]) -> None:
        self.parts.append(part)
        self.buffered += len(part["sample"])

    def flush(self, next_sample: int, samples_done: int, done: bool, seconds: dict) -> None:
        """Hand the buffered rows (if any) to the thread as a shard, with progress up to ``next_sample``."""
        # skips found by the prefetcher beyond next_sample are recorded with a later shard
        with self.lock:
            skipped = [[i, r] for i, r in self.pending_skips if i < next_sample]
            self.pending_skips = [(i, r) for i, r in self.pending_skips if i >= next_sample]
        name = None
        if self.parts:
            name = f"shard-{self.progress['rank']}-{self.n_shards:05d}.safetensors"
            self.n_shards += 1
        job = {"parts": self.parts, "events": self.events, "name": name, "skipped": skipped,
               "progress": {"next_sample": next_sample, "samples_done": samples_done, "done": done,
                            "n_excluded": self.n_excluded}, "seconds": dict(seconds)}
        self.parts, self.events, self.buffered = [], [], 0
        seconds.update({k: 0.0 for k in seconds})
        if self.thread is None:
            self.thread = threading.Thread(target=self._work, name=f"mmsae-shard-writer-{self.progress['rank']}")
            self.thread.start()
        self._put(job)
        if self.error is not None:
            raise self.error

    def close(self, failed: bool = False) -> None:
        """Wait for the queued shards (after a failure of the caller: only the one being written)
        and join the thread; raise its error, if any, unless the caller is failing already."""
        if self.thread is None:
            return
        if failed:
            self.abort.set()
        self._put(None)
        self.thread.join()
        if self.error is not None and not failed:
            raise self.error

    def _put(self, job: dict | None) -> None:
        while self.thread.is_alive():  # a thread that died of an error takes no more jobs
            try:
                self.jobs.put(job, timeout=0.1)
                return
            except queue.Full:
                continue

    def _work(self) -> None:
        while not self.abort.is_set():
            job = self.jobs.get()
            if job is None or self.abort.is_set():
                return
            try:
                self._write_shard(job)
            except BaseException as e:  # re-raised in the harvest loop
                self.error = e
                return

    def _write_shard(self, job: dict) -> None:
        p = self.progress
        if job["parts"]:
            for event in job["events"]:
                event.synchronize()
            parts = job["parts"]
            tensors = {k: torch.cat([part[k] for part in parts]) for k in parts[0]}
            acts = tensors["acts"]
            if not torch.isfinite(acts).all():
                bad = tensors["sample"][~torch.isfinite(acts).all(dim=1)].unique()[:5].tolist()
                raise MmsaeError(f"activations of samples {bad} are NaN/inf in {acts.dtype}; "
                                 "store in bfloat16 or float32 (--store-dtype), or run the model in float32 (--model-dtype)")
            name = job["name"]
            self._write(lambda: save_tensors(self.out / name, tensors, metadata={"format": FORMAT}), name)
            p["shards"].append({
                "file": name, "rank": p["rank"], "n_tokens": len(acts),
                "n_image_tokens": int(tensors["is_image"].sum()),
                "first_sample": int(tensors["sample"][0]), "last_sample": int(tensors["sample"][-1]),
                "norm_sum": float(acts.float().norm(dim=1).sum()),
            })
            p["n_tokens"] += len(acts)
        p["skipped"] += job["skipped"]
        p.update(job["progress"], seconds={k: round(p["seconds"].get(k, 0.0) + v, 3) for k, v in job["seconds"].items()})
        self._write(lambda: write_json(_progress_path(self.out, p["rank"]), p), _progress_path(self.out, p["rank"]).name)

    def _write(self, write, name: str) -> None:
        try:
            write()
        except OSError as e:
            if is_no_space(e):  # (mmsae.io's writers already raise this one as an MmsaeError)
                raise no_space_error(self.out / name) from e
            kept = f"{len(self.progress['shards'])} shards ({self.progress['n_tokens']} tokens) kept"
            raise MmsaeError(f"cannot write {self.out / name}: {e.strerror or e}; {kept}; fix the folder and rerun to resume") from e


def _prefetch(batches: Iterator, depth: int = 2) -> Iterator:
    """Run ``batches`` in a background thread (image decoding and processing overlap the model)."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    done = object()
    stop = threading.Event()

    def work():
        try:
            for item in batches:
                while not stop.is_set():
                    try:
                        q.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put(done)
        except BaseException as e:  # re-raised in the consumer
            q.put(e)

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    try:
        while True:
            item = q.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()


def _batched(samples: Iterator[Sample], adapter, batch_size: int) -> Iterator[tuple[list[Sample], Any]]:
    batch: list[Sample] = []
    for sample in samples:
        batch.append(sample)
        if len(batch) == batch_size:
            yield batch, adapter.build_inputs([s.image for s in batch], [s.text for s in batch])
            batch = []
    if batch:
        yield batch, adapter.build_inputs([s.image for s in batch], [s.text for s in batch])


def _to_host(t: torch.Tensor, dtype: torch.dtype, events: list) -> torch.Tensor:
    """``t`` in ``dtype`` on the CPU. From a CUDA device the copy goes to pinned memory without
    blocking, and the event after which it is complete is appended to ``events``: the reader must
    wait for it (``event.synchronize()``) before reading."""
    if t.device.type != "cuda":
        return t.to("cpu", dtype)
    host = torch.empty(t.shape, dtype=dtype, pin_memory=True)
    host.copy_(t.to(dtype), non_blocking=True)
    event = torch.cuda.Event()
    event.record(torch.cuda.current_stream(t.device))
    events.append(event)
    return host


def _token_rows(hidden: torch.Tensor, batch: list[Sample], layouts, tokens: str, store_dtype: torch.dtype,
                input_ids: torch.Tensor | None = None, rule: TokenExclusion = TokenExclusion()
                ) -> tuple[list[tuple[dict, int]], list]:
    """Per sample, the kept tokens' activations (on the CPU in the store dtype) and metadata, and how
    many tokens of the wanted kind ``rule`` left out; and the CUDA events to wait for before
    reading the activations and token ids (none on the CPU). The tokens are gathered on the device,
    and without an exclusion rule nothing here waits for the device."""
    kept, metas, excluded = [], [], []
    seq_len = hidden.shape[1]
    for i, (sample, layout) in enumerate(zip(batch, layouts)):
        image_pos = layout.positions.cpu().long()
        text_pos = layout.text_positions.cpu().long()
        n_img = len(image_pos) if tokens in ("all", "image") else 0
        pos = torch.cat([image_pos[:n_img], text_pos if tokens in ("all", "text") else text_pos[:0]])
        is_image = torch.arange(len(pos)) < n_img
        grid = torch.full((3, len(pos)), -1, dtype=torch.long)
        if n_img:
            grid[:, :n_img] = torch.stack([layout.tile.cpu(), layout.row.cpu(), layout.col.cpu()])
        order = torch.argsort(pos)
        pos, is_image, grid = pos[order], is_image[order], grid[:, order]
        if rule:  # the median norm is the whole sequence's (image and text), whichever kind is kept
            real = torch.cat([image_pos, text_pos])
            keep_at = torch.ones(seq_len, dtype=torch.bool)
            keep_at[real] = rule.keep(hidden[i, real.to(hidden.device)].float().norm(dim=-1).cpu(), None,
                                      input_ids[i, real.to(input_ids.device)].cpu() if input_ids is not None else None)
            keep = keep_at[pos]
            pos, is_image, grid = pos[keep], is_image[keep], grid[:, keep]
        excluded.append(len(order) - len(pos))
        kept.append(pos)
        metas.append({"sample": torch.full((len(pos),), sample.id, dtype=torch.int64), "pos": pos.to(torch.int32),
                      "is_image": is_image, "tile": grid[0].to(torch.int16), "row": grid[1].to(torch.int16),
                      "col": grid[2].to(torch.int16)})
    events: list = []

    def gather(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:  # the kept rows of a [B, T, ...] tensor
        index = torch.cat([pos + i * x.shape[1] for i, pos in enumerate(kept)])
        return _to_host(x.flatten(0, 1).index_select(0, _on(index, x.device)), dtype, events)

    acts = gather(hidden, store_dtype)
    token_ids = gather(input_ids, torch.int32) if input_ids is not None else None
    rows, start = [], 0
    for meta, n_excluded in zip(metas, excluded):
        n = len(meta["sample"])
        row = {"acts": acts[start:start + n], **meta}
        if token_ids is not None:
            row["token"] = token_ids[start:start + n]
        rows.append((row, n_excluded))
        start += n
    return rows, events


def _on(index: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host index tensor on ``device``; to a CUDA device without making the host wait for it."""
    if device.type != "cuda":
        return index.to(device)
    return index.pin_memory().to(device, non_blocking=True)


@dataclass
class _SiteStore:
    """One site's store during a harvest: its writer and counters."""

    site: Site
    writer: _ShardWriter
    budget: int | None  # this rank's share of --max-tokens
    resume_at: int  # samples before this id are in the store already
    tokens_total: int
    samples_done: int
    next_sample: int
    done: bool


def _harvest_rank(cfg: HarvestConfig, outs: dict[Site, Path], progress: dict[Site, dict], rank: int, world: int,
                  device: torch.device) -> None:
    from .hooks import run_sites
    from .models import load_adapter

    if cfg.device_map is not None and world > 1:
        raise MmsaeError(f"--device-map {cfg.device_map} spreads one process over every GPU; run it without torchrun")
    adapter = load_adapter(cfg.model, dtype=cfg.model_dtype, device=device, device_map=cfg.device_map,
                           trust_remote_code=cfg.trust_remote_code)
    sites = [adapter.resolve_site(site) for site in outs]  # one-line errors for a site the model lacks
    source = open_source(cfg.data, split=cfg.split, image_column=cfg.image_column, text_column=cfg.text_column,
                         prompt=cfg.prompt, allow_text_only=not adapter.has_vision)
    budget = None
    if cfg.max_tokens is not None:
        budget = cfg.max_tokens // world + (rank < cfg.max_tokens % world)
    stores = []
    for site in sites:
        out, p = outs[site], progress[site]
        store_dtype = _resolve_store_dtype(cfg.store_dtype, adapter.device, out)
        p["hook_point"], p["d"] = _hook_point(adapter, site), adapter.site_width(site)
        p["site"], p["layer"] = str(site), site.layer if site.kind == "lm" else None
        p["dtype"] = store_dtype
        p["source"] = source.spec
        stores.append(_SiteStore(site, _ShardWriter(out, p, STORE_DTYPES[store_dtype]), budget, p["next_sample"],
                                 p["n_tokens"], p["samples_done"], p["next_sample"], p["done"]))
    rule = TokenExclusion.of(cfg)
    if source.num_samples == 0:
        raise MmsaeError(f"data {cfg.data} holds no samples; give --data a source with samples")

    def on_skip(sample_id: int, reason: str) -> None:
        for st in stores:
            if sample_id >= st.resume_at:
                st.writer.skip(sample_id, reason)

    live = [st for st in stores if not st.done]
    first = min(live, key=lambda st: st.resume_at)
    stop = cfg.max_samples if cfg.max_samples is not None else source.num_samples
    total = None if stop is None else len(range(rank, stop, world))
    samples = source.samples(start=first.resume_at, rank=rank, world=world, stop=cfg.max_samples, on_skip=on_skip)
    bar = tqdm(total=total, initial=first.samples_done + len(first.writer.progress["skipped"]), unit="sample",
               desc=f"harvest {' '.join(str(st.site) for st in live)}" + (f" rank {rank}" if world > 1 else ""),
               disable=None if rank == 0 else True, dynamic_ncols=True)
    seconds: dict[str, float] = {"data": 0.0, "model": 0.0, "store": 0.0}
    session_tokens, t_start = 0, time.perf_counter()
    warned_text_only = False
    try:
        t0 = time.perf_counter()
        for batch, model_inputs in _prefetch(_batched(samples, adapter, cfg.batch_size)):
            t1 = time.perf_counter()
            has_image = any(s.image is not None for s in batch)
            # a batch without images never reaches the vision tower: its image sites get no rows
            wanted = [st.site for st in live if not st.done and (st.site.kind == "lm" or has_image)]
            acts = run_sites(adapter, wanted, model_inputs) if wanted else {}
            t2 = time.perf_counter()
            for st in live:
                if st.done:
                    continue
                if st.site not in acts:
                    rows = [({}, 0)] * len(batch)
                elif st.site.kind == "lm":
                    rows, copies = _token_rows(acts[st.site], batch, model_inputs.layouts, cfg.tokens, st.writer.dtype,
                                               model_inputs.inputs.get("input_ids"), rule)
                    st.writer.wait_for(copies)
                else:
                    rows, copies = _patch_rows(adapter, st.site, acts[st.site], batch, model_inputs, st.writer.dtype)
                    st.writer.wait_for(copies)
                for sample, (row, n_excluded) in zip(batch, rows):
                    if sample.id < st.resume_at:  # stored before the run that this one resumes
                        continue
                    # counted with the rows, so progress-R.json's count matches its shards after a crash
                    st.writer.n_excluded += n_excluded
                    n = len(row["sample"]) if row else 0
                    if st.budget is not None and st.tokens_total + n >= st.budget:
                        row = {k: v[: st.budget - st.tokens_total] for k, v in row.items()}
                        n = st.budget - st.tokens_total
                        st.done = True
                    if n:
                        st.writer.add(row)
                    st.tokens_total += n
                    session_tokens += n
                    st.samples_done += 1
                    st.next_sample = sample.id + 1
                    if st.done:
                        break
                if st.writer.buffered >= cfg.shard_size or st.done:
                    st.writer.flush(st.next_sample, st.samples_done, st.done, seconds)
            for sample in batch:
                if sample.image is None and adapter.has_vision and not warned_text_only:
                    warned_text_only = True
                    tqdm.write(f"harvest: warning: sample {sample.id} of {cfg.data} has no image, so {cfg.model} (a "
                               "vision-language model) gives it text tokens only; so may later samples (warned once)",
                               file=sys.stderr)
            t3 = time.perf_counter()
            seconds["data"] += t1 - t0
            seconds["model"] += t2 - t1
            seconds["store"] += t3 - t2
            bar.update(len(batch))
            bar.set_postfix_str(f"{session_tokens / (t3 - t_start):,.0f} tok/s, {len(source.skipped)} skipped", refresh=False)
            if all(st.done for st in live):
                break
            t0 = time.perf_counter()
        for st in live:
            if st.done:
                continue
            if st.tokens_total == 0 and world == 1:  # nothing recorded: no empty store for later stages
                if st.writer.n_excluded:
                    rule.check_kept(0, f"data {cfg.data}")  # the exclusion left out every token
                skips = source.skipped
                at = f" at {st.site}" if len(stores) > 1 else ""
                why = (f" ({len(skips)} samples skipped; first: sample {skips[0][0]}: {skips[0][1]})" if skips
                       else f" (--tokens {cfg.tokens})" if cfg.tokens != "all" else "")
                raise MmsaeError(f"data {cfg.data} gave no tokens to store{at}{why}; fix the data or choose another --data")
            # the source is exhausted: the last shard, and every skip up to its end
            end = max([st.next_sample, stop or 0] + [i + 1 for i, _ in st.writer.pending_skips])
            st.writer.flush(end, st.samples_done, True, seconds)
    except BaseException:
        for st in stores:
            st.writer.close(failed=True)  # (the shards already on disk stay recorded: a rerun resumes after them)
        raise
    finally:
        bar.close()
    for st in stores:
        st.writer.close()
    skipped = first.writer.progress["skipped"]
    if skipped:
        tqdm.write(f"harvest: rank {rank} skipped {len(skipped)} samples with missing or "
                   f"unreadable images (first: sample {skipped[0][0]}: {skipped[0][1]})", file=sys.stderr)


def _hook_point(adapter, site: Site) -> str:
    """The name recorded for a site's module: mmsae's lm hook point, else the module's path."""
    if site.kind == "lm":
        return adapter.hook_point(site.layer)
    return next(name for name, named in adapter.named_site_modules().items() if named == site)


def _patch_rows(adapter, site: Site, activation: torch.Tensor, batch: list[Sample], inputs, store_dtype: torch.dtype
                ) -> tuple[list[tuple[dict, int]], list]:
    """Per sample, the image-patch rows of a vision or projector site's activation (CLS and
    register rows left out) and their metadata, like ``_token_rows``'s image tokens: ``pos`` is
    the patch's order among its sample's patches, ``tile``/``row``/``col`` where it lies."""
    rows = adapter.site_rows(site, inputs)
    order = torch.argsort(rows.sample, stable=True)  # the samples' rows contiguous, so each is a slice
    events: list = []
    acts = _to_host(rows.take(activation)[_on(order, activation.device)], store_dtype, events)
    sample, tile, row, col = rows.sample[order], rows.tile[order], rows.row[order], rows.col[order]
    out, start = [], 0
    for i, s in enumerate(batch):
        n = int((sample == i).sum())
        part = slice(start, start + n)
        out.append(({"acts": acts[part], "sample": torch.full((n,), s.id, dtype=torch.int64),
                     "pos": torch.arange(n, dtype=torch.int32), "is_image": torch.ones(n, dtype=torch.bool),
                     "tile": tile[part].to(torch.int16), "row": row[part].to(torch.int16), "col": col[part].to(torch.int16)}, 0))
        start += n
    return out, events


def _resolve_store_dtype(requested: str, model_device: torch.device, out: Path) -> str:
    """The store dtype ``--store-dtype`` names (auto: bfloat16 for a model on a GPU, else float32),
    checked against the one the shards already in ``out`` were written in."""
    dtype = requested if requested != "auto" else "bfloat16" if model_device.type == "cuda" else "float32"
    for path in sorted(out.glob("progress-*.json")):
        p = read_json(path)
        stored = p.get("dtype", p["config"].get("dtype"))  # (stores harvested before "auto" kept it in the config)
        if stored is not None and stored != dtype:
            raise MmsaeError(f"{out} holds activations stored in {stored}, not {dtype} (--store-dtype {requested}); "
                             f"resume with --store-dtype {stored}, or choose a new --out")
    return dtype


def _merge_progress(out: Path) -> dict:
    """The manifest that the ranks' progress files describe (complete once every rank is done)."""
    progress = [read_json(p) for p in sorted(out.glob("progress-*.json"))]
    if not progress:
        raise MmsaeError(f"{out} holds no activation store (no manifest.json or progress files); run mmsae harvest first")
    progress.sort(key=lambda p: p["rank"])
    world = progress[0]["world"]
    cfg = progress[0]["config"]
    described = next((p for p in progress if "d" in p), {})
    shards = [s for p in progress for s in p["shards"]]
    skipped = sorted((i, r) for p in progress for i, r in p["skipped"])
    n_tokens = sum(s["n_tokens"] for s in shards)
    n_image = sum(s["n_image_tokens"] for s in shards)
    return {
        "format": FORMAT, "version": VERSION, "model": cfg["model"], "layer": described.get("layer", cfg["layer"]),
        "site": described.get("site"), "hook_point": described.get("hook_point"), "d": described.get("d"),
        "dtype": described.get("dtype", cfg.get("dtype")),  # the dtype used (older stores: their config's)
        "source": described.get("source", cfg["data"]), "tokens": cfg["tokens"], "world": world,
        "complete": len(progress) == world and all(p["done"] for p in progress),
        "shards": shards,
        "ranks": {str(p["rank"]): {"samples_done": p["samples_done"], "next_sample": p["next_sample"],
                                   "n_tokens": p["n_tokens"], "done": p["done"], "seconds": p["seconds"]}
                  for p in progress},
        "stats": {"n_tokens": n_tokens, "n_image_tokens": n_image, "n_text_tokens": n_tokens - n_image,
                  "n_samples": sum(p["samples_done"] for p in progress), "n_skipped": len(skipped),
                  "skipped": [{"sample": i, "reason": r} for i, r in skipped],
                  "mean_norm": sum(s["norm_sum"] for s in shards) / max(n_tokens, 1),
                  "n_excluded": sum(p.get("n_excluded", 0) for p in progress)},
        "config": cfg,
    }


def _write_manifest(out: Path) -> dict:
    manifest = _merge_progress(out)
    try:
        write_json(out / "manifest.json", manifest)
    except OSError as e:
        raise MmsaeError(f"cannot write {out / 'manifest.json'}: {e.strerror or e}; free space and rerun to finish") from e
    return manifest


# --------------------------------------------------------------------------------------------
# reading
# --------------------------------------------------------------------------------------------


class ActivationStore:
    """A harvested store: ``manifest.json`` plus safetensors shards.

    ``n_tokens``, ``d``, ``dtype`` and ``cfg`` (model, layer, hook point, data, harvest settings)
    describe it; ``batches`` streams it for training; ``metadata`` and ``iter_shards`` give the
    per-token sample id, position, image flag and tile/row/col.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        manifest_path = self.path / "manifest.json"
        # A store whose harvest was interrupted (or whose ranks never merged) is read from the
        # progress files, which are always up to date; the manifest is their merged copy.
        self.manifest = read_json(manifest_path) if manifest_path.exists() else _merge_progress(self.path)
        if not self.manifest.get("complete", True) and any(self.path.glob("progress-*.json")):
            self.manifest = _merge_progress(self.path)
        if self.manifest.get("format") != FORMAT:
            raise MmsaeError(f"{manifest_path} is not an mmsae activation store (format {self.manifest.get('format')!r})")
        self.shards: list[dict] = self.manifest["shards"]
        self._kept_counts: dict[tuple, list[int]] = {}  # per shard, under an exclusion rule (read once)

    # --- description -----------------------------------------------------------------------
    @property
    def n_tokens(self) -> int:
        return sum(s["n_tokens"] for s in self.shards)

    @property
    def d(self) -> int:
        return int(self.manifest["d"])

    @property
    def dtype(self) -> torch.dtype:
        return STORE_DTYPES[self.manifest["dtype"]]

    @property
    def complete(self) -> bool:
        return bool(self.manifest.get("complete", True))

    @property
    def cfg(self) -> dict:
        """model, layer, site, hook_point, d, dtype, data source, tokens and the full harvest config
        (``site``: ``lm:LAYER`` for stores harvested before sites were recorded)."""
        m = self.manifest
        site = m.get("site") or (f"lm:{m['layer']}" if m.get("layer") is not None else None)
        return {"model": m["model"], "layer": m["layer"], "site": site, "hook_point": m["hook_point"], "d": m["d"],
                "dtype": m["dtype"], "data": m["config"]["data"], "tokens": m["tokens"],
                "mean_norm": m["stats"]["mean_norm"], "harvest": m["config"]}

    def count(self, tokens: TokenKind = "all", exclude: TokenExclusion | None = None) -> int:
        """How many tokens of a kind the store holds (that ``exclude`` keeps)."""
        return sum(self.shard_counts(tokens, exclude))

    def shard_counts(self, tokens: TokenKind = "all", exclude: TokenExclusion | None = None) -> list[int]:
        """Tokens of a kind in each shard; under an exclusion rule every shard is read once to count."""
        if not exclude:
            return [_shard_count(s, tokens) for s in self.shards]
        key = (tokens, exclude)
        if key not in self._kept_counts:
            self._kept_counts[key] = [len(self.load_shard(i, tokens, exclude)["acts"]) for i in range(len(self.shards))]
        return self._kept_counts[key]

    def __len__(self) -> int:
        return self.n_tokens

    def __repr__(self) -> str:
        return f"ActivationStore({str(self.path)!r}, n_tokens={self.n_tokens}, d={self.manifest['d']}, shards={len(self.shards)})"

    # --- shards ----------------------------------------------------------------------------
    def load_shard(self, index: int, tokens: TokenKind = "all", exclude: TokenExclusion | None = None) -> dict[str, torch.Tensor]:
        """One shard's tensors (acts in the stored dtype), checked for NaN/inf, filtered by token kind
        and by ``exclude`` (whose median norms are over each sample's stored tokens of every kind)."""
        from safetensors.torch import load_file

        path = self.path / self.shards[index]["file"]
        try:
            tensors = load_file(str(path))
        except FileNotFoundError as e:
            raise MmsaeError(f"shard {path} is missing; the store is incomplete, harvest again into a new folder") from e
        except Exception as e:  # safetensors raises its own error types for damaged files
            raise MmsaeError(f"shard {path} cannot be read ({e}); delete the store and harvest again") from e
        if not torch.isfinite(tensors["acts"]).all():
            raise MmsaeError(f"shard {path} holds NaN or inf activations; delete it and its store and harvest again")
        keep = None
        if exclude:
            keep = exclude.keep(tensors["acts"].float().norm(dim=1), tensors["sample"], tensors.get("token"))
        if tokens != "all":
            kind = tensors["is_image"] if tokens == "image" else ~tensors["is_image"]
            keep = kind if keep is None else keep & kind
        if keep is not None:
            tensors = {k: v[keep] for k, v in tensors.items()}
        return tensors

    def iter_shards(self, tokens: TokenKind = "all", exclude: TokenExclusion | None = None) -> Iterator[dict[str, torch.Tensor]]:
        """Every shard in store order: ``acts`` (stored dtype) and the metadata columns."""
        for i in range(len(self.shards)):
            yield self.load_shard(i, tokens, exclude)

    def metadata(self, tokens: TokenKind = "all") -> dict[str, torch.Tensor]:
        """The metadata columns (sample, pos, is_image, tile, row, col) of every token, in store order."""
        from safetensors import safe_open

        columns: dict[str, list[torch.Tensor]] = {k: [] for k in METADATA_KEYS}
        for shard in self.shards:
            with safe_open(str(self.path / shard["file"]), framework="pt") as f:
                part = {k: f.get_tensor(k) for k in METADATA_KEYS}
            if tokens != "all":
                keep = part["is_image"] if tokens == "image" else ~part["is_image"]
                part = {k: v[keep] for k, v in part.items()}
            for k in METADATA_KEYS:
                columns[k].append(part[k])
        return {k: torch.cat(v) if v else torch.zeros(0) for k, v in columns.items()}

    def load_all(self, tokens: TokenKind = "all") -> torch.Tensor:
        """Every activation as one float32 [N, d] tensor (small stores: tests, quick evaluations)."""
        parts = [s["acts"].float() for s in self.iter_shards(tokens)]
        return torch.cat(parts) if parts else torch.zeros(0, self.d)

    # --- training stream -------------------------------------------------------------------
    def num_batches(self, batch_size: int, world: int = 1, tokens: TokenKind = "all", drop_last: bool = False,
                    exclude: TokenExclusion | None = None) -> int:
        """Batches per epoch (the same for every rank); see ``batches``."""
        n, global_batch = self.count(tokens, exclude), batch_size * world
        return n // global_batch if drop_last else math.ceil(n / global_batch)

    def batches(
        self,
        batch_size: int,
        shuffle: bool = True,
        seed: int = 0,
        rank: int = 0,
        world: int = 1,
        epochs: int | None = 1,
        start_batch: int = 0,
        tokens: TokenKind = "all",
        drop_last: bool = False,
        shuffle_shards: int = 4,
        device: str | torch.device | None = None,
        exclude: TokenExclusion | None = None,
    ) -> Iterator[torch.Tensor]:
        """Float32 [batch_size, d] batches; each epoch visits every kept token exactly once.

        Memory holds at most ``shuffle_shards`` shards: each epoch the shard order is shuffled,
        shards are taken ``shuffle_shards`` at a time and their tokens permuted together.
        Everything is a function of ``seed``, so ``start_batch=n`` resumes the stream exactly
        where a consumer that had taken ``n`` batches stopped (whole shards before it are not
        read). For data-parallel training ``rank`` takes its slice of each global batch of
        ``batch_size * world`` tokens; use ``drop_last=True`` there so ranks take equal steps.
        ``epochs=None`` loops forever. ``exclude`` leaves out the tokens that rule picks.
        """
        if batch_size < 1 or not 0 <= rank < world:
            raise ValueError(f"need batch_size >= 1 and 0 <= rank < world (got {batch_size}, {rank}, {world})")
        per_epoch = self.num_batches(batch_size, world, tokens, drop_last, exclude)
        if per_epoch == 0:
            return
        epoch, offset = divmod(start_batch, per_epoch)
        while epochs is None or epoch < epochs:
            for batch in self._epoch_batches(epoch, offset, batch_size, world, rank, shuffle, seed, tokens,
                                             drop_last, max(1, shuffle_shards), exclude):
                yield batch.to(device) if device is not None else batch
            epoch, offset = epoch + 1, 0

    def _epoch_batches(self, epoch, first_batch, batch_size, world, rank, shuffle, seed, tokens, drop_last, window, exclude=None):
        global_batch = batch_size * world
        counts = self.shard_counts(tokens, exclude)
        order = np.random.default_rng([seed, epoch]).permutation(len(self.shards)) if shuffle else np.arange(len(self.shards))
        if not shuffle:
            window = 1
        skip = first_batch * global_batch  # tokens of this epoch already consumed
        carry: list[torch.Tensor] = []
        carried = 0
        for w, start in enumerate(range(0, len(order), window)):
            members = order[start:start + window]
            size = sum(counts[i] for i in members)
            if skip >= size:  # wholly consumed before start_batch: not even read
                skip -= size
                continue
            acts = torch.cat([self.load_shard(int(i), tokens, exclude)["acts"] for i in members])
            if shuffle:
                acts = acts[torch.from_numpy(np.random.default_rng([seed, epoch, w]).permutation(len(acts)))]
            acts, skip = acts[skip:], 0
            carry.append(acts)
            carried += len(acts)
            if carried < global_batch:
                continue
            pool = torch.cat(carry)
            n_full = len(pool) // global_batch
            for b in range(n_full):
                yield pool[b * global_batch + rank * batch_size: b * global_batch + (rank + 1) * batch_size].float()
            rest = pool[n_full * global_batch:]
            carry, carried = [rest], len(rest)
        if carried and not drop_last:
            pool = torch.cat(carry)
            part = torch.tensor_split(pool, world)[rank]  # the last, short global batch split evenly
            if len(part):
                yield part.float()


def _shard_count(shard: dict, tokens: str) -> int:
    if tokens == "all":
        return shard["n_tokens"]
    return shard["n_image_tokens"] if tokens == "image" else shard["n_tokens"] - shard["n_image_tokens"]
