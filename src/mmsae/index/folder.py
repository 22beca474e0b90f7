"""The index folder: reading it (:class:`FeatureIndex`), writing it (:func:`_write_folder`,
:class:`IndexWriter` for examples given by hand) and the image copies it keeps.

Layout of the folder (``RUN/index/``)::

    manifest.json          configuration, the SAE's fingerprint, counts ("complete": true when done)
    examples.safetensors   top_sample/top_score [F, N], rand_sample/rand_score [F, K],
                           map_key [M] (feature * 2**40 + sample), map_offset [M + 1], map_values
    stats.safetensors      counters, max, sums and the histogram per feature
    samples.json           per referenced sample: layout (tiles, image size), meta, text, image file
    layouts.safetensors    per referenced sample: image-token positions, tile, row, col (flat)
    tokens.json            per feature: top text tokens with context
    images/                copies of the referenced images (PNG)
    .mmsae-images          the copies this index wrote, one a line: clean-up deletes only these
    checkpoint.safetensors the state of an unfinished build (removed when it completes); under
                           torchrun one per rank, checkpoint-R-of-W.safetensors, and each rank
                           records its image copies in .mmsae-images-R until rank 0 merges them
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image

from ..errors import MmsaeError
from ..io import claim_dir, ensure_dir, json_format, no_space_guard, read_json, save_tensors, write_json, write_text
from ..models.base import Tile, TokenLayout, image_heatmap
from .stats import QUANTILE_LEVELS, ActivationStats, hist_edges, quantile_from_hist

FORMAT = "mmsae-index"
VERSION = 1
KEY_SHIFT = 2**40  # map keys pack (feature, sample id) into one int64
IMAGES_WRITTEN = ".mmsae-images"  # the image copies this index wrote (relative paths, one a line)
INDEX_FILES = ("manifest.json", "examples.safetensors", "stats.safetensors", "samples.json", "layouts.safetensors",
               "tokens.json", "checkpoint.safetensors")



def sae_fingerprint(sae: torch.nn.Module) -> str:
    """A hash of the SAE's weights and of the config fields that change its codes.

    Independent of the file layout it was loaded from (sparsify, SAELens, mmsae).
    """
    h = hashlib.sha256()
    cfg = getattr(sae, "cfg", None)
    for name in ("d_in", "num_latents", "k", "architecture"):
        h.update(f"{name}={getattr(cfg, name, None)};".encode())
    for name, tensor in sorted(sae.state_dict().items()):
        t = tensor.detach().to("cpu", torch.float32).contiguous()
        h.update(f"{name}:{tuple(t.shape)};".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()[:16]


def index_fingerprint(manifest: dict, top_sample: torch.Tensor | np.ndarray) -> str:
    """A hash of what an index was built from and what it holds: the SAE's fingerprint, the data
    spec and the index settings (the build's signature, else the manifest's fields), and every
    feature's top example ids.

    Explanations record it, so rows written for another index (other data, settings or SAE), whose
    evidence ids name other samples, are told apart from this index's.
    """
    settings = manifest.get("signature") or {k: manifest.get(k) for k in (
        "sae_fingerprint", "model", "layer", "data", "top_n", "image_score", "num_latents")}
    h = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode())
    h.update(np.ascontiguousarray(np.asarray(top_sample, dtype=np.int64)).tobytes())
    return h.hexdigest()[:16]



@dataclass
class Example:
    """One image of a feature: its score and the feature's activation on each image token."""

    feature: int
    sample_id: int
    score: float
    patch_values: np.ndarray  # float32 [P], one per entry of layout.positions
    layout: TokenLayout
    kind: str = "top"  # "top" or "random" (the reservoir sample across quantiles)

    def heatmap(self, combine: str = "max") -> np.ndarray:
        """The activation map over the original image, float32 [H, W]."""
        return image_heatmap(self.layout, self.patch_values, combine=combine).astype(np.float32)


def _layout_to_json(layout: TokenLayout) -> dict:
    return {"tiles": [[list(map(float, t.box)), int(t.rows), int(t.cols)] for t in layout.tiles],
            "image_size": list(layout.image_size) if layout.image_size is not None else None}


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, (np.bool_,)):
        return bool(value)
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if hasattr(value, "__dataclass_fields__"):
        return _jsonable(asdict(value))
    return str(value)


class FeatureIndex:
    """Read access to an index folder (``RUN/index``).

    ``sae`` (a path or a loaded SAE), when given, must be the SAE the index was built with;
    otherwise a one-line MmsaeError says so.
    """

    def __init__(self, path: str | os.PathLike, sae: Any = None):
        self.path = Path(path)
        manifest = self.path / "manifest.json"
        if not manifest.exists():
            raise MmsaeError(f"{self.path} is not a feature index (no manifest.json); build one with 'mmsae index'")
        self.cfg: dict = read_json(manifest)
        if self.cfg.get("format") != FORMAT:
            raise MmsaeError(f"{manifest} is not an mmsae index manifest (format {self.cfg.get('format')!r})")
        if not self.cfg.get("complete", False):
            raise MmsaeError(f"index {self.path} is unfinished; rerun 'mmsae index' with the same options to complete it")
        from safetensors.torch import load_file

        ex = load_file(str(self.path / "examples.safetensors"))
        self._top_sample = ex["top_sample"].numpy()
        self._top_score = ex["top_score"].numpy()
        self._rand_sample = ex["rand_sample"].numpy()
        self._rand_score = ex["rand_score"].numpy()
        keys = ex["map_key"].numpy()
        self._map_offset = ex["map_offset"].numpy()
        self._map_values = ex["map_values"].numpy()
        self._map_row = {int(k): i for i, k in enumerate(keys)}
        self._stats = {k: v.numpy() for k, v in load_file(str(self.path / "stats.safetensors")).items()}
        self._samples: dict[str, dict] = read_json(self.path / "samples.json")
        lay = load_file(str(self.path / "layouts.safetensors"))
        self._lay_row = {int(s): i for i, s in enumerate(lay["sample"].numpy())}
        self._lay = {k: v for k, v in lay.items()}
        self._tokens: dict[str, list] | None = None
        self._digests: dict[int, str] = {}  # sample_digest's, one per sample asked for
        self.num_latents = int(self.cfg["num_latents"])
        if sae is not None:
            self.check_sae(sae)

    # --- identity ----------------------------------------------------------------------------
    @property
    def sae_fingerprint(self) -> str:
        return self.cfg.get("sae_fingerprint", "")

    @property
    def fingerprint(self) -> str:
        """This index's own fingerprint (SAE, data, settings, top examples): :func:`index_fingerprint`."""
        return self.cfg.get("index_fingerprint") or index_fingerprint(self.cfg, self._top_sample)

    def check_sae(self, sae: Any) -> None:
        """Raise MmsaeError unless ``sae`` (path or module) is the SAE this index was built with, at
        the site the index records (an index from before sites records ``lm:LAYER``)."""
        from ..models.sites import check_store_site

        name = f"SAE {sae}" if isinstance(sae, (str, os.PathLike)) else "the SAE"
        if isinstance(sae, (str, os.PathLike)):
            from ..sae import load_sae

            sae = load_sae(str(sae))
        fp = sae_fingerprint(sae)
        if fp != self.sae_fingerprint:
            raise MmsaeError(f"index {self.path} was built with another SAE (fingerprint {self.sae_fingerprint}, "
                             f"this SAE {fp}); rebuild it with 'mmsae index' for this SAE")
        check_store_site(sae, self.site, name, f"index {self.path}")

    @property
    def site(self) -> str | None:
        """The site the index was built at (``lm:L``, ``vision:L``, ``projector``), None if unknown."""
        if self.cfg.get("site") is not None:
            return self.cfg["site"]
        return f"lm:{self.cfg['layer']}" if self.cfg.get("layer") is not None else None

    def check_feature(self, feature: int) -> int:
        if not isinstance(feature, (int, np.integer)) or not 0 <= int(feature) < self.num_latents:
            raise MmsaeError(f"feature {feature} is out of range for index {self.path}: "
                             f"the SAE has {self.num_latents} latents, use 0..{self.num_latents - 1}")
        return int(feature)

    # --- features ------------------------------------------------------------------------------
    def features(self) -> list[int]:
        """Features with at least one top example, in id order."""
        return [int(f) for f in np.flatnonzero((self._top_sample >= 0).any(axis=1))]

    def stats(self, feature: int) -> dict:
        """Frequency, maximum, mean, quantiles and the histogram of non-zero patch activations."""
        f = self.check_feature(feature)
        n_patches, n_images, n_text = (int(x) for x in self._stats["stats_counts"])
        fired = int(self._stats["fired_patches"][f])
        counts = self._stats["hist"][f]
        max_act = float(self._stats["max_patches"][f])
        nz = np.flatnonzero(counts)
        edges = hist_edges()
        hist = ({"counts": counts[nz[0]: nz[-1] + 1].tolist(), "edges": edges[nz[0]: nz[-1] + 2].tolist()}
                if nz.size else {"counts": [], "edges": []})
        return {
            "frequency": fired / n_patches if n_patches else 0.0,
            "image_frequency": int(self._stats["fired_images"][f]) / n_images if n_images else 0.0,
            "text_frequency": int(self._stats["fired_text"][f]) / n_text if n_text else 0.0,
            "n_patches": n_patches,
            "n_images": n_images,
            "n_fired_patches": fired,
            "max_activation": max_act,
            "mean_activation": float(self._stats["sum_patches"][f]) / fired if fired else 0.0,
            "quantiles": {str(q): quantile_from_hist(counts, n_patches, q, max_act) for q in QUANTILE_LEVELS},
            "histogram": hist,
        }

    def quantile(self, feature: int, q: float = 0.995) -> float:
        """The q-quantile of the feature over every image patch of the dataset (zeros included)."""
        f = self.check_feature(feature)
        n_patches = int(self._stats["stats_counts"][0])
        return quantile_from_hist(self._stats["hist"][f], n_patches, q, float(self._stats["max_patches"][f]))

    # --- examples ------------------------------------------------------------------------------
    def _examples(self, f: int, samples: np.ndarray, scores: np.ndarray, kind: str, n: int | None) -> list[Example]:
        out = []
        for sid, score in zip(samples.tolist(), scores.tolist()):
            if sid < 0:
                continue
            row = self._map_row[f * KEY_SHIFT + sid]
            values = self._map_values[self._map_offset[row]: self._map_offset[row + 1]]
            out.append(Example(f, sid, float(score), values.astype(np.float32), self.layout(sid), kind))
            if n is not None and len(out) >= n:
                break
        return out

    def top_examples(self, feature: int, n: int | None = None) -> list[Example]:
        """The feature's top examples, best first (at most ``n``)."""
        f = self.check_feature(feature)
        return self._examples(f, self._top_sample[f], self._top_score[f], "top", n)

    def random_examples(self, feature: int, n: int | None = None) -> list[Example]:
        """A uniform random sample of the images where the feature fires, highest score first.

        Their scores spread over the feature's activation distribution (activation quantiles).
        """
        f = self.check_feature(feature)
        order = np.argsort(-self._rand_score[f], kind="stable")
        return self._examples(f, self._rand_sample[f][order], self._rand_score[f][order], "random", n)

    def top_tokens(self, feature: int) -> list[dict]:
        """Top text tokens: ``{"token", "context", "before", "after", "activation", "sample_id", "position"}``."""
        f = self.check_feature(feature)
        if self._tokens is None:
            path = self.path / "tokens.json"
            self._tokens = read_json(path) if path.exists() else {}
        return list(self._tokens.get(str(f), []))

    # --- samples -------------------------------------------------------------------------------
    def sample_ids(self) -> list[int]:
        """Samples kept in the index (those referenced by some example)."""
        return sorted(int(s) for s in self._samples)

    def _sample(self, sample_id: int) -> dict:
        rec = self._samples.get(str(int(sample_id)))
        if rec is None:
            raise MmsaeError(f"sample {sample_id} is not kept in index {self.path}; only samples that are some feature's example are")
        return rec

    def layout(self, sample_id: int) -> TokenLayout:
        rec = self._sample(sample_id)
        i = self._lay_row[int(sample_id)]
        lo, hi = int(self._lay["offset"][i]), int(self._lay["offset"][i + 1])
        tiles = [Tile(tuple(box), rows, cols) for box, rows, cols in rec["layout"]["tiles"]]
        size = rec["layout"]["image_size"]
        return TokenLayout(positions=self._lay["pos"][lo:hi].long(), tile=self._lay["tile"][lo:hi].long(),
                           row=self._lay["row"][lo:hi].long(), col=self._lay["col"][lo:hi].long(),
                           tiles=tiles, image_size=tuple(size) if size is not None else None)

    def image(self, sample_id: int) -> Image.Image:
        """The sample's image (RGB), from the copy under ``index/images/``."""
        rec = self._sample(sample_id)
        if not rec.get("image"):
            raise MmsaeError(f"sample {sample_id} has no image in index {self.path}")
        path = self.path / rec["image"]
        from ..data.sources import UnreadableImage, load_image

        try:
            return load_image(path)
        except UnreadableImage as e:
            raise MmsaeError(f"index image {path} cannot be read ({e}); rebuild the index") from e

    def sample_meta(self, sample_id: int) -> dict:
        return dict(self._sample(sample_id).get("meta") or {})

    def sample_text(self, sample_id: int) -> str:
        return self._sample(sample_id).get("text") or ""

    def sample_digest(self, sample_id: int) -> str:
        """A hash of the sample as this index keeps it: its image copy's bytes and its meta.

        Sample ids are positions in the indexed data, so two indexes over other data share ids
        for other pictures; equal digests mean the same picture and scene whatever the ids
        (score shares per-image work across runs by it). Hashed once per sample.
        """
        sid = int(sample_id)
        if sid not in self._digests:
            rec = self._sample(sid)
            h = hashlib.sha256(json.dumps(rec.get("meta") or {}, sort_keys=True).encode())
            if rec.get("image"):
                path = self.path / rec["image"]
                try:
                    h.update(path.read_bytes())
                except OSError as e:
                    raise MmsaeError(f"index image {path} cannot be read ({e.strerror}); rebuild the index") from e
            self._digests[sid] = h.hexdigest()[:32]
        return self._digests[sid]



def _write_folder(out: Path, manifest: dict, top_sample: torch.Tensor, top_score: torch.Tensor,
                  rand_sample: torch.Tensor, rand_score: torch.Tensor, maps: dict[int, np.ndarray],
                  stats: ActivationStats, samples: dict[int, dict], layouts: dict[int, TokenLayout],
                  tokens: dict[int, list], written: set[str]) -> None:
    """Write a complete index folder; the manifest goes last and marks it complete.

    ``written`` is the set of image copies this index wrote (:func:`_save_image`)."""
    ensure_dir(out)
    referenced = set(top_sample[top_sample >= 0].tolist()) | set(rand_sample[rand_sample >= 0].tolist())
    keys = sorted(k for k in maps if (k % KEY_SHIFT) in referenced)
    lengths = [len(maps[k]) for k in keys]
    offset = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    values = np.concatenate([maps[k] for k in keys]).astype(np.float32) if keys else np.zeros(0, np.float32)
    save_tensors(out / "examples.safetensors", {
        "top_sample": top_sample.long(), "top_score": top_score.float(),
        "rand_sample": rand_sample.long(), "rand_score": rand_score.float(),
        "map_key": torch.tensor(keys, dtype=torch.int64), "map_offset": torch.from_numpy(offset),
        "map_values": torch.from_numpy(values)})
    save_tensors(out / "stats.safetensors", stats.state())
    sids = sorted(s for s in referenced)
    lay = [layouts[s] for s in sids]
    lay_off = np.concatenate([[0], np.cumsum([lt.num_image_tokens for lt in lay])]).astype(np.int64)

    def cat(name: str, dtype) -> torch.Tensor:
        return torch.cat([getattr(lt, name).reshape(-1).cpu().to(dtype) for lt in lay]) if lay else torch.zeros(0, dtype=dtype)

    save_tensors(out / "layouts.safetensors", {
        "sample": torch.tensor(sids, dtype=torch.int64), "offset": torch.from_numpy(lay_off),
        "pos": cat("positions", torch.int32), "tile": cat("tile", torch.int16),
        "row": cat("row", torch.int16), "col": cat("col", torch.int16)})
    write_json(out / "samples.json", {str(s): {**samples[s], "layout": _layout_to_json(layouts[s])} for s in sids})
    write_json(out / "tokens.json", {str(f): rows for f, rows in sorted(tokens.items()) if rows})
    _drop_unreferenced_images(out, {samples[s].get("image") for s in sids}, written)
    write_json(out / "manifest.json", {**manifest, "index_fingerprint": index_fingerprint(manifest, top_sample),
                                       "complete": True})


def _image_file(sample_id: int) -> str:
    return f"images/{sample_id:09d}.png"


def _image_records(out: Path) -> list[Path]:
    """The records of image copies: ``.mmsae-images`` and, while ranks under torchrun work, each rank's
    ``.mmsae-images-R`` (rank 0 folds them into the first when it writes the folder)."""
    ranks = sorted(p for p in out.glob(f"{IMAGES_WRITTEN}-*") if p.name[len(IMAGES_WRITTEN) + 1:].isdigit())
    return [p for p in [out / IMAGES_WRITTEN, *ranks] if p.exists()]


def _written_images(out: Path, rank: int = 0, world: int = 1) -> set[str]:
    """The image copies this index recorded writing (its clean-up may delete these and no others);
    with ``world`` ranks, those of rank ``rank``'s samples (id % world == rank), whichever record holds them."""
    written = set().union(*(p.read_text(encoding="utf-8").split() for p in _image_records(out)))
    return {rel for rel in written if world == 1 or int(Path(rel).stem) % world == rank}


def _save_image(out: Path, sample_id: int, image: Image.Image, written: set[str], record: str = IMAGES_WRITTEN) -> str:
    """Copy a sample's image into ``images/``; the copy is recorded in ``record`` (``.mmsae-images``) first."""
    rel = _image_file(sample_id)
    path = out / rel
    if path.exists():
        if rel in written:
            return rel  # this index's copy (a resumed build)
        raise MmsaeError(f"{path} exists and was not written by mmsae index; choose a new --out")
    ensure_dir(path.parent)
    # recorded before it is written: a crash in between leaves a record of a missing file, never an unrecorded copy
    with open(out / record, "a", encoding="utf-8") as f:
        f.write(rel + "\n")
    written.add(rel)
    tmp = path.with_name(f".{path.name}.tmp")
    # not io.atomic_path: no fsync per image, these are working copies
    with no_space_guard(path):
        try:
            image.convert("RGB").save(tmp, format="PNG", compress_level=1)  # fast
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    return rel


class IndexWriter:
    """Build an index folder from examples given by hand (tests, fixtures, other tools).

    ::

        w = IndexWriter(out, num_latents=64, top_n=5, sae_fingerprint="...", model="m", layer=3)
        w.add_sample(7, image, layout, meta={...}, text="Describe the image.")
        w.add_example(feature=3, sample_id=7, patch_values=np.array([...]))   # score: max (or mean)
        w.add_activations(3, all_patch_values)   # optional: the dataset statistics of feature 3
        w.add_token(3, token="red", context="a red star", activation=2.0, sample_id=7, position=12)
        w.finish()

    Without ``add_activations`` a feature's statistics come from its examples' patch maps.
    """

    def __init__(self, out: str | os.PathLike, num_latents: int, top_n: int = 20,
                 image_score: Literal["max", "mean"] = "max", **manifest: Any):
        self.out = claim_dir(out, "index", legacy=_is_index_folder)
        self.written = _written_images(self.out)
        self.num_latents = num_latents
        self.top_n = top_n
        self.image_score = image_score
        self.manifest = {"format": FORMAT, "version": VERSION, "num_latents": num_latents, "top_n": top_n,
                         "image_score": image_score, "sae": None, "sae_fingerprint": "", "model": None,
                         "layer": None, "hook_point": None, "data": None, "n_images": 0, **manifest}
        self.samples: dict[int, dict] = {}
        self.layouts: dict[int, TokenLayout] = {}
        self.examples: dict[int, list[tuple[float, int, np.ndarray]]] = {}
        self.random: dict[int, list[tuple[float, int, np.ndarray]]] = {}
        self.activations: dict[int, list[np.ndarray]] = {}
        self.tokens: dict[int, list[dict]] = {}

    def add_sample(self, sample_id: int, image: Image.Image | None, layout: TokenLayout,
                   meta: dict | None = None, text: str = "") -> None:
        rec = {"meta": _jsonable(meta or {}), "text": text, "image": None}
        if image is not None:
            rec["image"] = _save_image(self.out, sample_id, image, self.written)
        self.samples[sample_id] = rec
        self.layouts[sample_id] = layout

    def _score(self, values: np.ndarray) -> float:
        return float(values.max() if self.image_score == "max" else values.mean()) if values.size else 0.0

    def add_example(self, feature: int, sample_id: int, patch_values, score: float | None = None,
                    kind: Literal["top", "random"] = "top") -> None:
        if sample_id not in self.samples:
            raise MmsaeError(f"add_sample({sample_id}, ...) must come before its examples")
        values = np.asarray(patch_values, dtype=np.float32).reshape(-1)
        if values.size != self.layouts[sample_id].num_image_tokens:
            raise MmsaeError(f"example of feature {feature} on sample {sample_id} has {values.size} patch values, "
                             f"its layout {self.layouts[sample_id].num_image_tokens} image tokens")
        score = self._score(values) if score is None else float(score)
        (self.examples if kind == "top" else self.random).setdefault(feature, []).append((score, sample_id, values))

    def add_activations(self, feature: int, values) -> None:
        self.activations.setdefault(feature, []).append(np.asarray(values, dtype=np.float32).reshape(-1))

    def add_token(self, feature: int, token: str, context: str, activation: float, sample_id: int = -1,
                  position: int = -1, before: str = "", after: str = "") -> None:
        self.tokens.setdefault(feature, []).append({"token": token, "context": context, "before": before, "after": after,
                                                    "activation": float(activation), "sample_id": int(sample_id),
                                                    "position": int(position)})

    def finish(self) -> FeatureIndex:
        F = self.num_latents
        width = max([self.top_n] + [len(v) for v in self.random.values()])
        top_sample = torch.full((F, self.top_n), -1, dtype=torch.int64)
        top_score = torch.zeros(F, self.top_n)
        rand_sample = torch.full((F, width), -1, dtype=torch.int64)
        rand_score = torch.zeros(F, width)
        maps: dict[int, np.ndarray] = {}
        for table, samples_t, scores_t, limit in ((self.examples, top_sample, top_score, self.top_n),
                                                 (self.random, rand_sample, rand_score, width)):
            for f, rows in table.items():
                if not 0 <= f < F:
                    raise MmsaeError(f"feature {f} is out of range for {F} latents")
                rows = sorted(rows, key=lambda r: -r[0])[:limit]
                for j, (score, sid, values) in enumerate(rows):
                    samples_t[f, j], scores_t[f, j] = sid, score
                    maps[f * KEY_SHIFT + sid] = values
        stats = ActivationStats(F)
        for f in range(F):
            given = self.activations.get(f)
            if given:
                vals = torch.from_numpy(np.concatenate(given))
            else:
                vals = torch.from_numpy(np.concatenate([v for _, _, v in self.examples.get(f, [])] or [np.zeros(0, np.float32)]))
            stats.update_patches(vals[:, None], torch.full((vals.numel(), 1), f, dtype=torch.int64))
        # the dataset is the added samples, unless longer activation lists were given
        n_given = max([sum(len(v) for v in vs) for vs in self.activations.values()] + [0])
        stats.n_patches = max(n_given, sum(lt.num_image_tokens for lt in self.layouts.values()))
        stats.n_images = len(self.samples)
        for f, rows in self.examples.items():
            stats.fired_images[f] = sum(1 for s, _, _ in rows if s > 0)
        manifest = {**self.manifest, "n_images": len(self.samples)}
        _write_folder(self.out, manifest, top_sample, top_score, rand_sample, rand_score, maps, stats,
                      self.samples, self.layouts, self.tokens, self.written)
        return FeatureIndex(self.out)



def _drop_unreferenced_images(out: Path, keep: set[str], written: set[str], record: str = IMAGES_WRITTEN) -> None:
    """Delete the image copies this index wrote that no example refers to any more (``keep``:
    relative paths) and rewrite their ``record``; nothing else in the folder is touched."""
    drop = written - keep
    if not drop:
        return
    for rel in drop:
        path = out / rel
        path.unlink(missing_ok=True)
        path.with_name(f".{path.name}.tmp").unlink(missing_ok=True)  # what a crash mid-copy left
    written -= drop
    write_text(out / record, "".join(f"{rel}\n" for rel in sorted(written)))


def _is_index_folder(path: Path) -> bool:
    """An index folder written before output folders were marked (for ``claim_dir``)."""
    return (path / "checkpoint.safetensors").exists() or json_format(path / "manifest.json") == FORMAT

