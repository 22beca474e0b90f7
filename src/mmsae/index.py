"""The feature index: each feature's top images with their per-patch activation maps.

``build_index`` streams images through the model with the SAE attached at one layer and keeps,
per feature and with memory bounded by features x N:

- the top N images by an image score (the max or the mean of the feature over the image's
  patches), each with the full per-patch activation map (every tile, AnyRes crops included);
- a uniform random sample of the images where the feature fires (those with the smallest
  :func:`random_key`), with their maps, spanning the feature's activation quantiles, for scoring
  and detection later;
- firing frequency (patches, images, text tokens), maximum, a log-binned histogram of the
  non-zero patch activations and quantiles over all image patches (Network Dissection's
  threshold is the 0.995 quantile);
- the top text tokens with their context.

The lists and statistics are kept on the SAE's device, updated from the sparse codes; only the
patch maps of the images that enter a list go to the host. Under ``torchrun`` each rank indexes
the samples whose id % world == rank and rank 0 merges the ranks' states into the same index.

The folder it writes (``RUN/index/``) is read back by :class:`FeatureIndex`; :class:`IndexWriter`
builds the same folder from examples given by hand (for tests and other tools).

Layout of the folder::

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
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image

from .config import check_config
from .errors import MmsaeError
from .io import claim_dir, ensure_dir, json_format, no_space_guard, read_json, save_tensors, write_json, write_text
from .models.base import Tile, TokenLayout, image_heatmap
from .runtime import barrier, check_dtype, init_distributed, out_of_memory_guard, resolve_device

FORMAT = "mmsae-index"
VERSION = 1
QUANTILE_LEVELS = (0.5, 0.9, 0.99, 0.995, 0.999)
# Log-spaced histogram of non-zero activations shared by every feature: 1e-4 .. 1e5, 16 bins a
# decade (a bin is 15% wide; quantiles interpolate inside it). Values outside land in the end bins.
HIST_LOG10_MIN, HIST_LOG10_MAX, HIST_BINS_PER_DECADE = -4.0, 5.0, 16
HIST_BINS = int((HIST_LOG10_MAX - HIST_LOG10_MIN) * HIST_BINS_PER_DECADE)
KEY_SHIFT = 2**40  # map keys pack (feature, sample id) into one int64
IMAGES_WRITTEN = ".mmsae-images"  # the image copies this index wrote (relative paths, one a line)
INDEX_FILES = ("manifest.json", "examples.safetensors", "stats.safetensors", "samples.json", "layouts.safetensors",
               "tokens.json", "checkpoint.safetensors")


def hist_edges() -> np.ndarray:
    return np.logspace(HIST_LOG10_MIN, HIST_LOG10_MAX, HIST_BINS + 1)


def _hist_bin(values: torch.Tensor) -> torch.Tensor:
    b = ((torch.log10(values.double().clamp_min(1e-30)) - HIST_LOG10_MIN) * HIST_BINS_PER_DECADE).floor()
    return b.clamp(0, HIST_BINS - 1).long()


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


# --------------------------------------------------------------------------------------------
# Statistics
# --------------------------------------------------------------------------------------------


class ActivationStats:
    """Per-feature counters over a dataset, updated from sparse codes (values, indices).

    The counters live on ``device`` (where the codes are); ``state()`` gives them on the CPU.
    """

    def __init__(self, num_latents: int, device: str | torch.device = "cpu"):
        self.num_latents = num_latents
        self.n_patches = 0
        self.n_images = 0
        self.n_text = 0
        self.fired_patches = torch.zeros(num_latents, dtype=torch.int64, device=device)
        self.fired_images = torch.zeros(num_latents, dtype=torch.int64, device=device)
        self.fired_text = torch.zeros(num_latents, dtype=torch.int64, device=device)
        self.sum_patches = torch.zeros(num_latents, dtype=torch.float64, device=device)
        self.max_patches = torch.zeros(num_latents, dtype=torch.float32, device=device)
        self.hist = torch.zeros(num_latents, HIST_BINS, dtype=torch.int64, device=device)

    def update_patches(self, values: torch.Tensor, indices: torch.Tensor) -> None:
        """Image-patch codes: values/indices [T, k] (one row per patch token)."""
        self.n_patches += values.shape[0]
        device = self.hist.device
        v, i = values.reshape(-1).float().to(device), indices.reshape(-1).long().to(device)
        # codes that did not fire count 0 and add 0 (no boolean mask: it would wait for the GPU)
        fired = v > 0
        v, ones = torch.where(fired, v, 0.0), fired.long()
        self.fired_patches.index_add_(0, i, ones)
        self.sum_patches.index_add_(0, i, v.double())
        self.max_patches.scatter_reduce_(0, i, v, reduce="amax")
        self.hist.view(-1).index_add_(0, i * HIST_BINS + _hist_bin(v), ones)

    def update_images(self, scores: torch.Tensor) -> None:
        """Image scores [B, F] (dense)."""
        self.n_images += scores.shape[0]
        self.fired_images += (scores > 0).sum(0).to(self.fired_images.device)

    def update_text(self, values: torch.Tensor, indices: torch.Tensor) -> None:
        self.n_text += values.shape[0]
        device = self.fired_text.device
        v, i = values.reshape(-1).to(device), indices.reshape(-1).long().to(device)
        self.fired_text.index_add_(0, i, (v > 0).long())

    def merge(self, other: ActivationStats) -> None:
        """Add the counters of ``other`` (another rank's share of the data): counts and sums add, maxima max."""
        self.n_patches += other.n_patches
        self.n_images += other.n_images
        self.n_text += other.n_text
        for name in ("fired_patches", "fired_images", "fired_text", "sum_patches", "hist"):
            getattr(self, name).add_(getattr(other, name).to(self.hist.device))
        torch.maximum(self.max_patches, other.max_patches.to(self.hist.device), out=self.max_patches)

    def state(self) -> dict[str, torch.Tensor]:
        """The counters as CPU tensors (what ``stats.safetensors`` and checkpoints hold)."""
        counts = torch.tensor([self.n_patches, self.n_images, self.n_text], dtype=torch.int64)
        return {"stats_counts": counts, "fired_patches": self.fired_patches.cpu(), "fired_images": self.fired_images.cpu(),
                "fired_text": self.fired_text.cpu(), "sum_patches": self.sum_patches.cpu(),
                "max_patches": self.max_patches.cpu(), "hist": self.hist.cpu()}

    @classmethod
    def from_state(cls, tensors: dict[str, torch.Tensor], device: str | torch.device = "cpu") -> ActivationStats:
        s = cls(tensors["fired_patches"].shape[0], device="meta")  # (no memory: every counter is set below)
        s.n_patches, s.n_images, s.n_text = (int(x) for x in tensors["stats_counts"])
        for name in ("fired_patches", "fired_images", "fired_text", "sum_patches", "max_patches", "hist"):
            setattr(s, name, tensors[name].to(device, copy=True))
        return s


def quantile_from_hist(counts: np.ndarray, n_total: int, q: float, max_value: float) -> float:
    """The q-quantile of a feature's activations over all n_total patches (zeros included).

    The non-zero activations are in the log-binned ``counts``; inside a bin the quantile is
    interpolated on the log scale, and never exceeds the exact maximum.
    """
    if n_total <= 0:
        return 0.0
    above = (1.0 - q) * n_total  # how many activations lie above the quantile
    n_fired = int(counts.sum())
    if above >= n_fired:
        return 0.0
    edges = hist_edges()
    seen = 0.0
    for b in range(len(counts) - 1, -1, -1):
        c = counts[b]
        if c and seen + c >= above:
            frac = (above - seen) / c  # part of this bin that lies above the quantile
            lo, hi = math.log10(edges[b]), math.log10(edges[b + 1])
            value = 10 ** (hi - frac * (hi - lo))
            return float(min(value, max_value))
        seen += c
    return 0.0


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


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
        """Raise MmsaeError unless ``sae`` (path or module) is the SAE this index was built with."""
        if isinstance(sae, (str, os.PathLike)):
            from .sae import load_sae

            sae = load_sae(str(sae))
        fp = sae_fingerprint(sae)
        if fp != self.sae_fingerprint:
            raise MmsaeError(f"index {self.path} was built with another SAE (fingerprint {self.sae_fingerprint}, "
                             f"this SAE {fp}); rebuild it with 'mmsae index' for this SAE")

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
        from .data.sources import UnreadableImage, load_image

        try:
            return load_image(path)
        except UnreadableImage as e:
            raise MmsaeError(f"index image {path} cannot be read ({e}); rebuild the index") from e

    def sample_meta(self, sample_id: int) -> dict:
        return dict(self._sample(sample_id).get("meta") or {})

    def sample_text(self, sample_id: int) -> str:
        return self._sample(sample_id).get("text") or ""


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# Building from a model
# --------------------------------------------------------------------------------------------


@dataclass
class IndexConfig:
    """Options of ``mmsae index``."""

    sae: str = field(metadata={"help": "SAE folder (sparsify, SAELens or mmsae layout) or hub id"})
    data: str = field(metadata={"help": "data: image folder, .jsonl, dataset path or name, or shapes:N[:SEED]"})
    out: str = field(metadata={"help": "index folder to write (RUN/index)"})
    model: str | None = field(default=None, metadata={"help": "model id or path (default: the SAE's cfg.model)"})
    layer: int | None = field(default=None, metadata={"help": "decoder layer (default: the SAE's cfg.layer)", "min": 0})
    top_n: int = field(default=20, metadata={"help": "top images kept per feature", "min": 1})
    random_n: int = field(default=20, metadata={"help": "random activating images kept per feature (a sample across quantiles)", "min": 1})
    image_score: Literal["max", "mean"] = field(default="max", metadata={"help": "image score: max or mean of the feature over the image's patches"})
    top_tokens: int = field(default=10, metadata={"help": "top text tokens kept per feature", "min": 1})
    context_tokens: int = field(default=8, metadata={"help": "text tokens of context kept before each top token", "min": 0})
    batch_size: int = field(default=8, metadata={"help": "images per forward pass", "min": 1})
    max_samples: int | None = field(default=None, metadata={"help": "only samples with id below this", "min": 1})
    prompt: str | None = field(default=None, metadata={"help": "prompt shown with every image (default: the sample's own text)"})
    split: str = field(default="train", metadata={"help": "dataset split"})
    device: str = field(default="auto", metadata={"help": "cpu, cuda, cuda:N or auto"})
    dtype: str = field(default="float32", metadata={"help": "model dtype: float32, bfloat16 or float16"})
    checkpoint_every: int = field(default=512, metadata={"help": "save resumable state every this many images", "min": 1})
    seed: int = field(default=0, metadata={"help": "seed of the random example sample", "min": 0})
    overwrite: bool = field(default=False, metadata={"help": "write into an --out folder that holds other files (they are kept)"})

    def __post_init__(self):
        check_config(self)


AFTER_TOKENS = 3  # text tokens of context kept after each top token
NO_KEY = torch.iinfo(torch.int64).max  # the random-example key of an empty slot (above every real key)
_M31 = (1 << 31) - 1


def _mix31(x: torch.Tensor, salt: torch.Tensor | int) -> torch.Tensor:
    """Scramble int64 values in [0, 2**31) with ``salt`` (multiply, fold the high bits down, twice).

    Every product stays below 2**62, so no step overflows and every device gives the same result."""
    x = (x ^ salt) * 0x5BD1E995
    x = (x ^ (x >> 31)) & _M31
    x = x * 0x6A09E667
    return (x ^ (x >> 29)) & _M31


def random_key(seed: int, feature: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
    """The key that picks a feature's random examples: each feature keeps its activating images with
    the smallest keys, a uniform random sample of them.

    A pseudo-random permutation of the sample ids (a four-round Feistel network on 62 bits, its round
    keys drawn from the seed and the feature): different for every feature, never equal for two
    samples of one feature, and a function of (seed, feature, sample id) alone, so the same images
    are picked whatever order, batches or processes saw them. ``feature`` and ``sample`` broadcast.
    """
    feature, sample = feature.long() & _M31, sample.long()
    left, right = sample >> 31, sample & _M31
    for r in range(4):
        salt = int.from_bytes(hashlib.blake2b(f"{seed}:{r}".encode(), digest_size=4).digest(), "little") & _M31
        left, right = right, left ^ _mix31(right, _mix31(feature, salt))
    return (left << 31) | right


def _ranked(score: torch.Tensor, *ties: torch.Tensor) -> torch.Tensor:
    """Per row, the column order by ``score`` descending, then by each of ``ties`` ascending.

    One order whichever way the candidates arrived, so lists merged in any grouping (batches,
    checkpoints, ranks) come out the same."""
    order = None
    for key in (*reversed(ties), -score):  # stable sorts: the last one decides first
        if order is None:
            order = key.sort(dim=-1, stable=True).indices
        else:
            order = order.gather(-1, key.gather(-1, order).sort(dim=-1, stable=True).indices)
    return order


class IndexState:
    """Everything ``build_index`` accumulates; bounded by features x (top_n + random_n).

    The lists and the statistics live on ``device`` (the SAE's, where the codes are); only the
    patch maps, records and layouts of the kept examples are copied to the host. States built from
    disjoint samples (the ranks under torchrun) ``merge`` into the state of their union.
    """

    def __init__(self, num_latents: int, top_n: int, random_n: int, top_tokens: int, context_tokens: int,
                 image_score: str, seed: int, device: str | torch.device = "cpu"):
        F = num_latents
        self.F, self.N, self.K, self.M = F, top_n, random_n, top_tokens
        self.C, self.W = context_tokens, context_tokens + 1 + AFTER_TOKENS
        self.image_score = image_score
        self.seed = seed
        self.device = torch.device(device)
        self.top_sample = torch.full((F, top_n), -1, dtype=torch.int64, device=device)
        self.top_score = torch.zeros(F, top_n, device=device)
        self.rand_sample = torch.full((F, random_n), -1, dtype=torch.int64, device=device)
        self.rand_score = torch.zeros(F, random_n, device=device)
        self.rand_key = torch.full((F, random_n), NO_KEY, dtype=torch.int64, device=device)  # ascending
        self.tok_act = torch.zeros(F, top_tokens, device=device)
        self.tok_sample = torch.full((F, top_tokens), -1, dtype=torch.int64, device=device)
        self.tok_pos = torch.full((F, top_tokens), -1, dtype=torch.int64, device=device)
        self.tok_ctx = torch.full((F, top_tokens, self.W), -1, dtype=torch.int32, device=device)
        self.stats = ActivationStats(F, device)
        self.maps: dict[int, np.ndarray] = {}
        self.samples: dict[int, dict] = {}
        self.layouts: dict[int, TokenLayout] = {}
        self.next_id = 0
        self.skipped = 0

    _LISTS = ("top_sample", "top_score", "rand_sample", "rand_score", "rand_key", "tok_act", "tok_sample", "tok_pos", "tok_ctx")

    def to(self, device: str | torch.device) -> IndexState:
        """Move the lists and the statistics to ``device`` (in place); returns self."""
        self.device = torch.device(device)
        for name in self._LISTS:
            setattr(self, name, getattr(self, name).to(device))
        self.stats = ActivationStats.from_state(self.stats.state(), device)
        return self

    # --- per batch -----------------------------------------------------------------------------
    def image_scores(self, values: torch.Tensor, indices: torch.Tensor, image: torch.Tensor,
                     sizes: torch.Tensor) -> torch.Tensor:
        """Dense [B, F] scores of B images from their patch codes [P, k] (``image`` [P]: the image of
        each row, ``sizes`` [B]: the patches of each image)."""
        B = sizes.numel()
        v = values.reshape(-1).float().clamp_min(0)
        flat = (image[:, None] * self.F + indices.long()).reshape(-1)
        scores = torch.zeros(B * self.F, device=v.device)
        if self.image_score == "max":
            return scores.scatter_reduce_(0, flat, v, reduce="amax").view(B, self.F)
        return scores.index_add_(0, flat, v).view(B, self.F) / sizes.clamp_min(1)[:, None]

    def add_images(self, sample_ids: list[int], codes: list[tuple[torch.Tensor, torch.Tensor]]) -> list[int]:
        """Merge a batch of images (patch codes [P, k] each) into the statistics, the top lists and
        the random examples, and keep the patch maps of every (feature, image) that entered a list.
        ``sample_ids`` ascend and lie above every id added before (one build streams in id order;
        states built otherwise combine with ``merge``).

        Returns the batch positions of the images that entered some list (their samples must be recorded).
        """
        if not codes:
            return []
        dev = self.device
        values = torch.cat([v for v, _ in codes]).to(dev).float()
        indices = torch.cat([i for _, i in codes]).to(dev).long()
        sizes = [v.shape[0] for v, _ in codes]
        size_t = torch.tensor(sizes, device=dev)
        image = torch.repeat_interleave(torch.arange(len(codes), device=dev), size_t, output_size=sum(sizes))
        self.stats.update_patches(values, indices)
        scores = self.image_scores(values, indices, image, size_t)  # [B, F]
        self.stats.update_images(scores)
        feats = torch.nonzero((scores > 0).any(0), as_tuple=True)[0]  # the lists of no other feature change
        if feats.numel() == 0:
            return []
        score = scores[:, feats].T  # [G, B]
        sids = torch.tensor(sample_ids, dtype=torch.int64, device=dev).expand_as(score)
        entered = torch.zeros_like(score, dtype=torch.bool)
        # only features where an image beats the last kept one merge: the batch's ids are above every
        # kept id (one build sees its samples in id order), so a tied score loses
        bar = torch.where(self.top_sample[feats, -1] >= 0, self.top_score[feats, -1], 0.0)
        g = torch.nonzero((score > bar[:, None]).any(1), as_tuple=True)[0]
        entered[g] = self._merge_top(feats[g], score[g], sids[g], in_id_order=True)
        key = torch.where(score > 0, random_key(self.seed, feats[:, None], sids), NO_KEY)
        g = torch.nonzero((key < self.rand_key[feats, -1:]).any(1), as_tuple=True)[0]
        entered[g] |= self._merge_random(feats[g], key[g], score[g], sids[g])
        b, g = torch.nonzero(entered.T, as_tuple=True)  # by image, then feature
        self._keep_maps(values, indices, image, sizes, sample_ids, b, feats[g])
        return b.unique().tolist()

    def _merge_top(self, rows: torch.Tensor, score: torch.Tensor, sample: torch.Tensor, in_id_order: bool = False) -> torch.Tensor:
        """Merge candidates (score, sample) [G, X] into the top lists of features ``rows`` [G]: best
        score first, ties to the lower sample id; empty slots and zero scores never win.
        ``in_id_order``: the candidates' ids ascend and lie above every kept id (a stream in id order),
        so ties are already in id order. Returns which candidates entered [G, X]."""
        cand_score = torch.cat([self.top_score[rows], score], 1)
        cand_sample = torch.cat([self.top_sample[rows], sample], 1)
        cand_score = torch.where((cand_sample >= 0) & (cand_score > 0), cand_score, -math.inf)
        order = (_ranked(cand_score) if in_id_order else _ranked(cand_score, cand_sample))[:, : self.N]
        best = cand_score.gather(1, order)
        empty = torch.isinf(best)
        self.top_sample[rows] = torch.where(empty, -1, cand_sample.gather(1, order))
        self.top_score[rows] = torch.where(empty, 0.0, best)
        return torch.zeros_like(cand_score, dtype=torch.bool).scatter_(1, order, ~empty)[:, self.N:]

    def _merge_random(self, rows: torch.Tensor, key: torch.Tensor, score: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        """Merge candidates (``random_key`` or NO_KEY, score, sample) [G, X] into the random examples of
        features ``rows``: the K smallest keys stay. Returns which candidates entered [G, X]."""
        cand_key = torch.cat([self.rand_key[rows], key], 1)
        order = cand_key.sort(dim=1).indices[:, : self.K]  # (keys of one feature never tie)
        kept = cand_key.gather(1, order)
        empty = kept == NO_KEY
        self.rand_key[rows] = kept
        self.rand_sample[rows] = torch.where(empty, -1, torch.cat([self.rand_sample[rows], sample], 1).gather(1, order))
        self.rand_score[rows] = torch.where(empty, 0.0, torch.cat([self.rand_score[rows], score], 1).gather(1, order))
        return torch.zeros_like(cand_key, dtype=torch.bool).scatter_(1, order, ~empty)[:, self.K:]

    def _keep_maps(self, values: torch.Tensor, indices: torch.Tensor, image: torch.Tensor, sizes: list[int],
                   sample_ids: list[int], image_of: torch.Tensor, feature: torch.Tensor) -> None:
        """Copy to the host the patch maps [P] of the (image, feature) pairs given, from the batch's
        codes [R, k] (``image`` [R]: each row's position in the batch)."""
        if feature.numel() == 0:
            return
        dev, P = values.device, max(sizes)
        start = torch.tensor(np.cumsum([0, *sizes[:-1]]), device=dev)
        patch = (torch.arange(values.shape[0], device=dev) - start[image])[:, None].expand_as(indices)
        row_of = torch.full((len(sizes), self.F), -1, dtype=torch.long, device=dev)
        keys = (feature.cpu() * KEY_SHIFT + torch.tensor(sample_ids)[image_of.cpu()]).tolist()
        ends = np.cumsum(torch.bincount(image_of, minlength=len(sizes)).tolist())  # the pairs come by image
        chunk = max(1, 2**24 // P)  # maps copied at once: bounds the device memory they take
        for lo in range(0, len(keys), chunk):
            b, f = image_of[lo: lo + chunk], feature[lo: lo + chunk]
            row_of[b, f] = torch.arange(b.numel(), device=dev)
            rows = row_of[image[:, None], indices]  # [R, k]: the map each code belongs to, -1 for none
            maps = torch.zeros(b.numel() + 1, P, device=dev)
            maps[torch.where(rows >= 0, rows, b.numel()), patch] = values  # (codes of no map go to a spare row)
            row_of[b, f] = -1
            maps_np = maps.cpu().numpy()
            hi = lo + b.numel()
            for image_b, (first, last) in enumerate(zip([0, *ends[:-1]], ends)):
                first, last = max(first, lo), min(last, hi)
                if first < last:  # this image's maps, each copied out of the block
                    rows_np = maps_np[first - lo: last - lo, : sizes[image_b]]
                    self.maps.update(zip(keys[first:last], map(np.ndarray.copy, rows_np)))

    def add_text(self, sample_id: torch.Tensor, position: torch.Tensor, context: torch.Tensor,
                 values: torch.Tensor, indices: torch.Tensor) -> None:
        """Merge text-token codes [T, k] (with each token's sample, position and context ids [T, W]);
        the samples lie above every sample added before, the tokens come in (sample, position) order."""
        if values.shape[0] == 0:
            return
        self.stats.update_text(values, indices)
        dev = self.device
        T, k = values.shape
        v, f = values.reshape(-1).float().to(dev), indices.reshape(-1).long().to(dev)
        t = torch.arange(T, device=dev).repeat_interleave(k)
        # a token must beat the feature's last kept one: a tie goes to the lower sample id, and one
        # build sees its samples in id order
        thresh = torch.where(self.tok_sample[:, -1] >= 0, self.tok_act[:, -1], 0.0)
        keep = v > thresh[f]
        v, f, t = v[keep], f[keep], t[keep]
        if f.numel() == 0:
            return
        sample, pos = sample_id.to(dev)[t], position.to(dev)[t]
        # the (feature, token) codes by feature, then best first (ties stay in token order): the first M
        # of each feature are its candidates
        order = _ranked(v)
        order = order[f[order].sort(stable=True).indices]
        v, f, t, sample, pos = v[order], f[order], t[order], sample[order], pos[order]
        feats, counts = torch.unique_consecutive(f, return_counts=True)
        row = torch.repeat_interleave(torch.arange(feats.numel(), device=dev), counts, output_size=f.numel())
        rank = torch.arange(f.numel(), device=dev) - (counts.cumsum(0) - counts)[row]
        top = rank < self.M
        row, rank = row[top], rank[top]
        G = feats.numel()
        act = torch.full((G, self.M), -math.inf, device=dev)
        act[row, rank] = v[top]
        cand_sample, cand_pos, cand_t = (torch.zeros(G, self.M, dtype=torch.int64, device=dev).index_put_((row, rank), x[top])
                                         for x in (sample, pos, t))
        self._merge_tokens(feats, act, cand_sample, cand_pos, cand_t, context.to(dev), in_id_order=True)

    def _merge_tokens(self, rows: torch.Tensor, act: torch.Tensor, sample: torch.Tensor, position: torch.Tensor,
                      ctx_index: torch.Tensor, ctx_table: torch.Tensor, in_id_order: bool = False) -> None:
        """Merge candidate tokens (activation, -inf for none; sample; position) [G, X] into the top
        tokens of features ``rows``: highest activation first, ties to the lower (sample, position).
        A candidate's context is ``ctx_table[ctx_index]`` ([W] ids). ``in_id_order``: the candidates'
        ties are in (sample, position) order and their samples lie above every kept one."""
        M, W = self.M, self.W
        old_sample = self.tok_sample[rows]
        cand_act = torch.cat([torch.where(old_sample >= 0, self.tok_act[rows], -math.inf), act], 1)
        cand_sample = torch.cat([old_sample, sample], 1)
        cand_pos = torch.cat([self.tok_pos[rows], position], 1)
        order = (_ranked(cand_act) if in_id_order else _ranked(cand_act, cand_sample, cand_pos))[:, :M]
        best = cand_act.gather(1, order)
        empty = torch.isinf(best)
        old_ctx = self.tok_ctx[rows].gather(1, order.clamp(max=M - 1)[..., None].expand(-1, -1, W))
        new_ctx = ctx_table[ctx_index.gather(1, (order - M).clamp(min=0))]
        ctx = torch.where((order < M)[..., None], old_ctx, new_ctx)
        self.tok_sample[rows] = torch.where(empty, -1, cand_sample.gather(1, order))
        self.tok_pos[rows] = torch.where(empty, -1, cand_pos.gather(1, order))
        self.tok_act[rows] = torch.where(empty, 0.0, best)
        self.tok_ctx[rows] = torch.where(empty[..., None], -1, ctx)

    def merge(self, other: IndexState) -> None:
        """Fold in ``other``, a state built from other samples (another rank's share): the result is
        the state one build over both sets of samples gives (sums of floats up to rounding)."""
        rows = torch.arange(self.F, device=self.device)
        o = {name: getattr(other, name).to(self.device) for name in self._LISTS}
        self._merge_top(rows, o["top_score"], o["top_sample"])
        self._merge_random(rows, o["rand_key"], o["rand_score"], o["rand_sample"])
        self._merge_tokens(rows, torch.where(o["tok_sample"] >= 0, o["tok_act"], -math.inf), o["tok_sample"], o["tok_pos"],
                           torch.arange(self.F * self.M, device=self.device).view(self.F, self.M),
                           o["tok_ctx"].view(self.F * self.M, self.W))
        self.stats.merge(other.stats)
        self.maps.update(other.maps)
        self.samples.update(other.samples)
        self.layouts.update(other.layouts)
        self.skipped += other.skipped
        self.next_id = max(self.next_id, other.next_id)
        self.prune()

    # --- bookkeeping ---------------------------------------------------------------------------
    def referenced_samples(self) -> set[int]:
        return set(self.top_sample[self.top_sample >= 0].tolist()) | set(self.rand_sample[self.rand_sample >= 0].tolist())

    def prune(self) -> None:
        """Forget maps and samples no list refers to any more."""
        keys = set((torch.nonzero(self.top_sample >= 0)[:, 0] * KEY_SHIFT + self.top_sample[self.top_sample >= 0]).tolist())
        keys |= set((torch.nonzero(self.rand_sample >= 0)[:, 0] * KEY_SHIFT + self.rand_sample[self.rand_sample >= 0]).tolist())
        self.maps = {k: v for k, v in self.maps.items() if k in keys}
        refs = self.referenced_samples()
        self.samples = {s: r for s, r in self.samples.items() if s in refs}
        self.layouts = {s: lt for s, lt in self.layouts.items() if s in refs}

    def tensors(self) -> dict[str, torch.Tensor]:
        """The state as CPU tensors (a checkpoint; ``rand_key`` is recomputed from ``rand_sample``)."""
        keys = sorted(self.maps)
        lengths = [len(self.maps[k]) for k in keys]
        sids = sorted(self.layouts)
        lay = [self.layouts[s] for s in sids]
        return {
            **{name: getattr(self, name).cpu() for name in self._LISTS if name != "rand_key"},
            "map_key": torch.tensor(keys, dtype=torch.int64),
            "map_len": torch.tensor(lengths, dtype=torch.int64),
            "map_values": torch.from_numpy(np.concatenate([self.maps[k] for k in keys])) if keys else torch.zeros(0),
            "lay_sample": torch.tensor(sids, dtype=torch.int64),
            "lay_len": torch.tensor([lt.num_image_tokens for lt in lay], dtype=torch.int64),
            **{f"lay_{name}": (torch.cat([getattr(lt, name).cpu().long() for lt in lay]) if lay else torch.zeros(0, dtype=torch.long))
               for name in ("positions", "tile", "row", "col")},
            **self.stats.state(),
        }

    def save(self, path: Path, signature: dict) -> None:
        self.prune()
        meta = {"signature": json.dumps(signature), "next_id": str(self.next_id), "skipped": str(self.skipped),
                "samples": json.dumps({str(s): {**r, "layout": _layout_to_json(self.layouts[s])} for s, r in self.samples.items()})}
        save_tensors(path, self.tensors(), metadata=meta)

    @classmethod
    def load(cls, path: Path, signature: dict, **kwargs) -> IndexState:
        """A saved state (``save``), on ``kwargs["device"]``; refused unless it was started with ``signature``."""
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            meta = f.metadata()
            t = {k: f.get_tensor(k) for k in f.keys()}
        if json.loads(meta["signature"]) != signature:
            raise MmsaeError(f"{path} was started with other options or another SAE; rerun with the same options, or use another --out")
        state = cls(**kwargs)
        dev = state.device
        for name in cls._LISTS:
            if name != "rand_key":
                setattr(state, name, t[name].to(dev))
        features = torch.arange(state.F, device=dev)[:, None]
        state.rand_key = torch.where(state.rand_sample >= 0, random_key(state.seed, features, state.rand_sample.clamp_min(0)), NO_KEY)
        # (a checkpoint of an older mmsae kept its random examples in draw order; sort them by key)
        state.rand_key, order = state.rand_key.sort(dim=1)
        state.rand_sample, state.rand_score = state.rand_sample.gather(1, order), state.rand_score.gather(1, order)
        offsets = np.concatenate([[0], np.cumsum(t["map_len"].numpy())])
        values = t["map_values"].numpy()
        state.maps = {int(k): values[offsets[i]: offsets[i + 1]].copy() for i, k in enumerate(t["map_key"].tolist())}
        samples = json.loads(meta["samples"])
        lay_off = np.concatenate([[0], np.cumsum(t["lay_len"].numpy())])
        for i, s in enumerate(t["lay_sample"].tolist()):
            rec = samples[str(s)]
            lo, hi = lay_off[i], lay_off[i + 1]
            state.layouts[s] = TokenLayout(
                positions=t["lay_positions"][lo:hi], tile=t["lay_tile"][lo:hi], row=t["lay_row"][lo:hi], col=t["lay_col"][lo:hi],
                tiles=[Tile(tuple(box), r, c) for box, r, c in rec["layout"]["tiles"]],
                image_size=tuple(rec["layout"]["image_size"]) if rec["layout"]["image_size"] is not None else None)
            state.samples[s] = {k: v for k, v in rec.items() if k != "layout"}
        state.stats = ActivationStats.from_state(t, dev)
        state.next_id, state.skipped = int(meta["next_id"]), int(meta["skipped"])
        return state

    def token_rows(self, tokenizer) -> dict[int, list[dict]]:
        """Decode the top text tokens of every feature into ``{"token", "context", ...}`` rows."""
        out: dict[int, list[dict]] = {}
        sample, act, pos, ctx = (t.cpu() for t in (self.tok_sample, self.tok_act, self.tok_pos, self.tok_ctx))
        for f in torch.nonzero((sample >= 0).any(1), as_tuple=True)[0].tolist():
            rows = []
            for sid, a, p, ids in zip(sample[f].tolist(), act[f].tolist(), pos[f].tolist(), ctx[f].tolist()):
                if sid < 0:
                    continue
                before = tokenizer.decode([i for i in ids[: self.C] if i >= 0])
                token = tokenizer.decode([ids[self.C]])
                after = tokenizer.decode([i for i in ids[self.C + 1:] if i >= 0])
                rows.append({"token": token, "context": before + token + after, "before": before, "after": after,
                             "activation": float(a), "sample_id": int(sid), "position": int(p)})
            out[f] = rows
        return out


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


def _text_contexts(input_ids: torch.Tensor, text_positions: torch.Tensor, before: int) -> torch.Tensor:
    """Context ids [T, before + 1 + AFTER_TOKENS] around each text position, over text tokens only."""
    ids = input_ids[text_positions].cpu()
    T = ids.numel()
    padded = torch.cat([torch.full((before,), -1, dtype=ids.dtype), ids, torch.full((AFTER_TOKENS,), -1, dtype=ids.dtype)])
    window = torch.arange(before + 1 + AFTER_TOKENS)[None] + torch.arange(T)[:, None]
    return padded[window].to(torch.int32)


def encode_batch(adapter, sae, layer: int, images: list, prompts: list[str]):
    """One forward pass to ``layer`` and the SAE codes of every image and text token.

    Returns the built inputs and, per sequence, ((patch values, indices) [P, k], (text values,
    indices) [T, k]), float32 values on the SAE's device (the index's bookkeeping runs there too).
    """
    from .hooks import run_until

    inputs = adapter.build_inputs(images, prompts)
    with torch.inference_mode():
        hidden = run_until(adapter, layer, inputs)
        parts = []
        for b, layout in enumerate(inputs.layouts):
            parts += [hidden[b, layout.positions.to(hidden.device)], hidden[b, layout.text_positions.to(hidden.device)]]
        sizes = [p.shape[0] for p in parts]
        values, indices = sae.encode_sparse(torch.cat(parts).to(sae.device))
    values = values.float()
    codes, start = [], 0
    for n in sizes:
        codes.append((values[start:start + n], indices[start:start + n]))
        start += n
    return inputs, [(codes[2 * b], codes[2 * b + 1]) for b in range(len(inputs.layouts))]


def _checkpoint_name(rank: int, world: int) -> str:
    """One process's checkpoint; under torchrun each rank has its own, named with the world size."""
    return "checkpoint.safetensors" if world == 1 else f"checkpoint-{rank}-of-{world}.safetensors"


def build_index(cfg: IndexConfig) -> FeatureIndex:
    """Stream ``cfg.data`` through the model with the SAE at ``cfg.layer`` and write the index.

    Resumable: rerun with the same options after an interruption and it continues from its
    last checkpoint; a finished index with the same options is returned as it is. Under
    ``torchrun`` rank r indexes the samples whose id % world == r (resumable per rank, with the
    same number of processes); rank 0 merges the ranks' states and writes the folder, the index
    one process would write.
    """
    device = resolve_device(cfg.device)
    check_dtype(cfg.dtype, device)
    rank, world = init_distributed(device, "index")  # (the group stays for the process: see init_distributed)
    return _build_index(cfg, device, rank, world)


def _build_index(cfg: IndexConfig, device: torch.device, rank: int, world: int) -> FeatureIndex:
    from tqdm import tqdm

    from .data.sources import open_source
    from .models import load_adapter
    from .models.sites import check_sae_site, parse_site, recorded_site
    from .sae import load_sae

    sae = load_sae(cfg.sae).to(device).eval()
    model_id = cfg.model or sae.cfg.model
    layer = cfg.layer
    if layer is None and recorded_site(sae.cfg) is not None:  # e.g. a release that records only model.layers.24
        recorded = parse_site(recorded_site(sae.cfg))
        layer = recorded.layer if recorded.kind == "lm" else None
    if model_id is None or layer is None:
        raise MmsaeError(f"SAE {cfg.sae} does not record its model and layer; give --model and --layer")
    out = Path(cfg.out)
    if rank == 0:  # one claim: ranks checking an empty folder at once would see each other's marker
        out = claim_dir(cfg.out, "index", cfg.overwrite, legacy=_is_index_folder)
        if not _is_index_folder(out):  # a new index: none of the files it writes may be someone else's
            taken = [name for name in INDEX_FILES if (out / name).exists()]
            if taken:
                raise MmsaeError(f"{out / taken[0]} exists and was not written by mmsae index; move it away or choose a new --out")
    barrier(world)
    record = IMAGES_WRITTEN if world == 1 else f"{IMAGES_WRITTEN}-{rank}"
    written = _written_images(out, rank, world)
    fingerprint = sae_fingerprint(sae)
    signature = {"sae_fingerprint": fingerprint, "model": str(model_id), "layer": int(layer), "data": cfg.data,
                 "split": cfg.split, "max_samples": cfg.max_samples, "prompt": cfg.prompt, "top_n": cfg.top_n,
                 "random_n": cfg.random_n, "image_score": cfg.image_score, "top_tokens": cfg.top_tokens,
                 "context_tokens": cfg.context_tokens, "seed": cfg.seed}
    manifest_path = out / "manifest.json"
    if manifest_path.exists():
        old = read_json(manifest_path)
        if old.get("complete") and old.get("signature") == signature:
            print(f"index {out} is already complete", flush=True)
            return FeatureIndex(out)
        if old.get("complete"):
            raise MmsaeError(f"{out} already holds an index built with other options or another SAE; use another --out or delete it")
    ours = {_checkpoint_name(r, world) for r in range(world)}
    theirs = sorted(p.name for p in out.glob("checkpoint*.safetensors") if p.name not in ours)
    if theirs:
        raise MmsaeError(f"{out / theirs[0]} is the unfinished index of another number of processes than {world}; "
                         "rerun with as many as before, or use another --out")

    adapter = load_adapter(str(model_id), dtype=cfg.dtype, device=device)
    check_sae_site(sae, adapter, int(layer), f"SAE {cfg.sae}")  # the one site and width check
    source = open_source(cfg.data, split=cfg.split)
    state_kwargs = dict(num_latents=sae.cfg.num_latents, top_n=cfg.top_n, random_n=cfg.random_n, top_tokens=cfg.top_tokens,
                        context_tokens=cfg.context_tokens, image_score=cfg.image_score, seed=cfg.seed, device=device)
    ckpt = out / _checkpoint_name(rank, world)
    who = f"rank {rank}: " if world > 1 else ""
    if ckpt.exists():
        state = IndexState.load(ckpt, signature, **state_kwargs)
        print(f"{who}resuming index at sample {state.next_id} ({state.stats.n_images} images done)", flush=True)
    else:
        with out_of_memory_guard("index", device, "--top-n or --random-n"):  # features x (top_n + random_n) slots
            state = IndexState(**state_kwargs)
    total = source.num_samples if cfg.max_samples is None or source.num_samples is None else min(cfg.max_samples, source.num_samples)

    def share(stop: int) -> int:  # this rank's samples below ``stop``
        return len(range(rank, stop, world))

    def on_skip(sample_id: int, reason: str) -> None:
        state.skipped += 1

    @out_of_memory_guard("index", device, "--batch-size or --top-n")  # the last checkpoint stays: a rerun resumes
    def run_batch(batch: list) -> None:
        images = [s.image for s in batch]
        prompts = [cfg.prompt or s.text or "Describe the image." for s in batch]
        inputs, codes = encode_batch(adapter, sae, int(layer), images, prompts)
        with_image = [b for b, lt in enumerate(inputs.layouts) if lt.num_image_tokens > 0]
        entered = state.add_images([batch[b].id for b in with_image], [codes[b][0] for b in with_image])
        for b in (with_image[j] for j in entered):  # images that became some feature's example: keep the sample
            sid = batch[b].id
            if sid not in state.samples:
                state.samples[sid] = {"meta": _jsonable(batch[b].meta), "text": prompts[b],
                                      "image": _save_image(out, sid, batch[b].image, written, record)}
                lt = inputs.layouts[b]
                state.layouts[sid] = TokenLayout(lt.positions.cpu(), lt.tile.cpu(), lt.row.cpu(), lt.col.cpu(), lt.tiles, lt.image_size)
        ids = inputs.inputs["input_ids"].cpu()
        sample_t, pos_t, ctx_t = [], [], []
        for b, lt in enumerate(inputs.layouts):
            tp = lt.text_positions.cpu()
            sample_t.append(torch.full((tp.numel(),), batch[b].id, dtype=torch.int64))
            pos_t.append(tp)
            ctx_t.append(_text_contexts(ids[b], tp, state.C))
        text_v = torch.cat([codes[b][1][0] for b in range(len(batch))])
        text_i = torch.cat([codes[b][1][1] for b in range(len(batch))])
        state.add_text(torch.cat(sample_t), torch.cat(pos_t), torch.cat(ctx_t), text_v, text_i)
        state.next_id = batch[-1].id + 1
        # evicted maps are dropped once they outnumber the live ones: memory stays O(features x N)
        live = int((state.top_sample >= 0).sum() + (state.rand_sample >= 0).sum())
        if len(state.maps) > 2 * live + 4096:
            state.prune()

    since_ckpt = 0
    started = time.perf_counter()
    bar = tqdm(total=None if total is None else share(total), initial=share(state.next_id), dynamic_ncols=True,
               desc="index" + (f" rank {rank}" if world > 1 else ""), unit="sample", disable=rank != 0)
    batch: list = []
    try:
        for sample in source.samples(start=state.next_id, rank=rank, world=world, stop=cfg.max_samples, on_skip=on_skip):
            batch.append(sample)
            if len(batch) == cfg.batch_size:
                run_batch(batch)
                bar.update(share(batch[-1].id + 1) - bar.n)
                since_ckpt += len(batch)
                batch = []
                if since_ckpt >= cfg.checkpoint_every:
                    state.save(ckpt, signature)
                    _drop_unreferenced_images(out, {r["image"] for r in state.samples.values()}, written, record)
                    since_ckpt = 0
        if batch:
            run_batch(batch)
    finally:
        bar.close()
    if total is not None:
        state.next_id = max(state.next_id, total)
    state.save(ckpt, signature)  # the finished state, in case writing the folder is interrupted
    barrier(world)  # every rank's finished state is on disk
    if rank == 0:
        for r in range(1, world):
            state.merge(IndexState.load(out / _checkpoint_name(r, world), signature, **state_kwargs))
        _write_index(cfg, out, state, signature, adapter, sae, int(layer), model_id, world, started)
    barrier(world)
    return FeatureIndex(out)


def _write_index(cfg: IndexConfig, out: Path, state: IndexState, signature: dict, adapter, sae, layer: int,
                 model_id, world: int, started: float) -> None:
    """Rank 0: write the folder of the finished (merged) ``state``, then remove the checkpoints."""
    if state.stats.n_images == 0:  # nothing worth resuming: the folder may take other data
        for r in range(world):
            (out / _checkpoint_name(r, world)).unlink(missing_ok=True)
        raise MmsaeError(f"data {cfg.data} gave no images to index; give a source with images")
    state.to("cpu")
    # every rank's image copies, recorded in the one record before the ranks' records go
    written = _written_images(out)
    records = _image_records(out)
    if any(path.name != IMAGES_WRITTEN for path in records):
        write_text(out / IMAGES_WRITTEN, "".join(f"{rel}\n" for rel in sorted(written)))
        for path in records:
            if path.name != IMAGES_WRITTEN:
                path.unlink()
    manifest = {"format": FORMAT, "version": VERSION, "sae": str(cfg.sae), "sae_fingerprint": signature["sae_fingerprint"],
                "model": str(model_id), "layer": layer, "site": str(adapter.resolve_site(layer)), "hook_point": adapter.hook_point(layer),
                "data": cfg.data, "top_n": cfg.top_n, "random_n": cfg.random_n, "image_score": cfg.image_score,
                "n_images": state.stats.n_images, "n_skipped": state.skipped, "num_latents": sae.cfg.num_latents,
                "k": sae.cfg.k, "quantile_levels": list(QUANTILE_LEVELS), "signature": signature,
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    tokens = state.token_rows(adapter.tokenizer)
    # this session's time from the first batch to the finished folder (model loading excluded)
    manifest["run_seconds"] = round(time.perf_counter() - started, 3)
    _write_folder(out, manifest, state.top_sample, state.top_score, state.rand_sample, state.rand_score, state.maps,
                  state.stats, state.samples, state.layouts, tokens, written)
    for r in range(world):
        (out / _checkpoint_name(r, world)).unlink(missing_ok=True)
    if state.skipped:
        print(f"skipped {state.skipped} unreadable samples", flush=True)
    n_features = int((state.top_sample >= 0).any(1).sum())
    print(f"index: {n_features} of {sae.cfg.num_latents} features fired on {state.stats.n_images} images -> {out}", flush=True)
