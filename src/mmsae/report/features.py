"""The feature list (in chunk files) and the per-feature data files and images of the dashboard.

The list of all features is split into ``data/list/NNNNN.js`` chunks written in the default
order (scored features by score, then live ones by frequency, dead ones last), so the first
pages show without loading the rest; searching or sorting loads the other chunks on demand.
Each feature with a page gets ``data/f/BBB/F.js`` and its images under ``img/``.
"""

from __future__ import annotations

import io
import math
import re
from collections import defaultdict
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from .rundata import RunData
from .safe import clean, js_put, write_file

LIST_TEXT_CHARS = 300  # explanations are cut to this length in the list (the feature page has all)


def bucket(feature: int) -> str:
    """Feature data files are spread over folders of 1,000 so no folder grows huge."""
    return f"{feature // 1000:03d}"


def feature_data_path(feature: int) -> str:
    return f"data/f/{bucket(feature)}/{feature}.js"


def _number(v) -> float | None:
    try:
        v = float(v)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _safe_name(value) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", str(value))[:100]


def feature_scores(scores: list[dict]) -> dict[int, dict[str, float]]:
    """Per feature, each scorer's value for the explanation itself (baseline "none"), averaged."""
    acc: dict[int, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for row in scores:
        v = _number(row.get("value")) if not isinstance(row.get("value"), bool) else None
        if v is not None and row.get("baseline", "none") in ("none", None):
            acc[int(row["feature"])][str(row["scorer"])].append(v)
    return {f: {s: sum(vs) / len(vs) for s, vs in by.items()} for f, by in acc.items()}


def primary_scorer(scorers: set[str]) -> str | None:
    """The score the list sorts by first: IoU (the paper's main score) when there is one."""
    for name in ("iou", "clip"):
        if name in scorers:
            return name
    return min(scorers) if scorers else None


def list_rows(data: RunData, dense_threshold: float) -> tuple[list[dict], dict]:
    """One compact row per feature, in the default order, and facts about them for the page."""
    per_feature = feature_scores(data.scores)
    scorers = {s for by in per_feature.values() for s in by}
    primary = primary_scorer(scorers)
    indexed = set(data.index.features()) if data.index is not None else set()
    ids = indexed | set(data.explanations) | set(per_feature)
    n = data.num_latents
    if n:
        ids |= set(range(n))
    rows = []
    for f in tqdm(sorted(ids), desc="dashboard: features", unit="feature", disable=len(ids) < 5000, mininterval=1.0):
        row: dict = {"f": f}
        exp = data.explanations.get(f)
        if exp:
            text = str(exp.get("explanation") or "")
            row["e"] = text[:LIST_TEXT_CHARS] + ("…" if len(text) > LIST_TEXT_CHARS else "")
            if exp.get("category"):
                row["c"] = str(exp["category"])
            if exp.get("concept"):
                row["k"] = str(exp["concept"])
        if f in per_feature:
            row["s"] = per_feature[f]
        if data.index is not None:
            if f in indexed:
                stats = data.index.stats(f)
                freq, top = _number(stats.get("frequency")), _number(stats.get("max_activation"))
                if freq is not None:
                    row["fr"] = freq
                if top is not None:
                    row["mx"] = top
                if freq is not None and freq > dense_threshold:
                    row["n"] = 1
                if freq == 0:
                    row["d"] = 1
            else:
                row["d"] = 1  # never among any image's or token's top activations
        rows.append(row)

    def order(row):
        score = (row.get("s") or {}).get(primary) if primary else None
        return (row.get("d", 0), score is None, "e" not in row, -(score or 0.0), -(row.get("fr") or 0.0), row["f"])

    rows.sort(key=order)
    facts = {
        # the monosemanticity score (of the feature, not of its explanation) beside the primary score
        "scorers": sorted(scorers, key=lambda s: (s != primary, s != "monosemanticity", s)),
        "primary": primary,
        "categories": sorted({r["c"] for r in rows if "c" in r}),
        "n_dead": sum(1 for r in rows if r.get("d")),
        "n_dense": sum(1 for r in rows if r.get("n")),
        "n_explained": sum(1 for r in rows if "e" in r),
        "has_index": data.index is not None,
    }
    return rows, facts


def write_list(site: Path, rows: list[dict], chunk_size: int) -> int:
    n_chunks = max(1, math.ceil(len(rows) / chunk_size))
    for i in range(n_chunks):
        write_file(site / "data" / "list" / f"{i:05d}.js", js_put(f"list/{i}", rows[i * chunk_size:(i + 1) * chunk_size]))
    return n_chunks


def _jpeg(img: Image.Image, quality: int = 82) -> bytes:
    buf = io.BytesIO()
    img.convert("RGB").save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _thumbnail(img: Image.Image, size: int) -> Image.Image:
    img = img.convert("RGB")
    scale = min(1.0, size / max(img.size))
    if scale < 1.0:
        img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.BILINEAR)
    return img


def _resize_map(heatmap: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    hm = np.asarray(heatmap, dtype=np.float32)
    if hm.shape[::-1] == tuple(size):
        return hm
    return np.asarray(Image.fromarray(hm, mode="F").resize(size, Image.BILINEAR), dtype=np.float32)


class ImageWriter:
    """Writes each sample's picture once and each example's overlay and mask as small JPEGs."""

    def __init__(self, site: Path, index, size: int):
        self.site, self.index, self.size = site, index, size
        self.samples: dict = {}

    def sample(self, sample_id) -> tuple[str, Image.Image] | None:
        if sample_id not in self.samples:
            try:
                img = self.index.image(sample_id)
            except Exception:  # noqa: BLE001 - a missing or unreadable image just leaves the example without pictures
                img = None
            if img is None:
                self.samples[sample_id] = None
            else:
                thumb = _thumbnail(img, self.size)
                rel = f"img/s/{_safe_name(sample_id)}.jpg"
                write_file(self.site / rel, _jpeg(thumb))
                self.samples[sample_id] = (rel, thumb)
        return self.samples[sample_id]

    def example(self, feature: int, rank: int, ex, threshold: float, vmax: float | None) -> dict:
        """Raw, overlay and mask views of one example; the mask keeps pixels above ``threshold``."""
        from ..heatmap import overlay

        out = {"sample_id": ex.sample_id, "score": _number(ex.score)}
        got = self.sample(ex.sample_id)
        layout = getattr(ex, "layout", None)
        if got is None or layout is None or getattr(layout, "image_size", None) is None:
            return out
        rel, thumb = got
        full = np.asarray(ex.heatmap(), dtype=np.float32)
        heat = _resize_map(full, thumb.size)
        mask = np.asarray(Image.fromarray((full > threshold).astype(np.uint8) * 255).resize(thumb.size, Image.NEAREST)) > 0
        views = {"overlay": overlay(thumb, heat, mode="overlay", vmax=vmax),
                 "mask": overlay(thumb, heat, mode="mask", mask=mask)}
        out["raw"] = rel
        for mode, img in views.items():
            path = f"img/f/{bucket(feature)}/{feature}-{rank}-{mode}.jpg"
            write_file(self.site / path, _jpeg(img))
            out[mode] = path
        return out


def mask_threshold(explanation: dict | None) -> tuple[float, dict]:
    """The binarisation the explanation was made with (mmsae.heatmap's record), else the paper's (> 0)."""
    record = (explanation or {}).get("binarization")
    if isinstance(record, dict) and _number(record.get("threshold")) is not None:
        return float(record["threshold"]), record
    return 0.0, {"method": "paper", "threshold": 0.0}


def feature_detail(data: RunData, feature: int, row: dict, images: ImageWriter | None, n_images: int) -> dict:
    """Everything the feature page shows about one feature."""
    detail: dict = {"f": feature, "row": row}
    exp = data.explanations.get(feature)
    if exp:
        detail["explanation"] = {k: v for k, v in exp.items() if k != "feature"}
    rank = {"iou": 0, "monosemanticity": 1}  # the page's score table: IoU, then MS beside it, then the rest
    detail["scores"] = sorted((
        {k: r.get(k) for k in ("scorer", "baseline", "value", "category", "details")}
        for r in data.scores if int(r["feature"]) == feature
    ), key=lambda r: rank.get(r["scorer"], 2)) if data.scores else []
    if data.index is not None and not row.get("d"):
        idx = data.index
        detail["stats"] = clean(idx.stats(feature))
        threshold, detail["mask"] = mask_threshold(exp)
        vmax = _number(detail["stats"].get("max_activation")) or None
        detail["examples"] = [images.example(feature, rank, ex, threshold, vmax) for rank, ex in
                              enumerate(idx.top_examples(feature, n=n_images))]
        detail["tokens"] = clean(idx.top_tokens(feature))[:20]
    detail["steering"] = [r for r in data.steering if _mentions(r, feature)][:20]
    return detail


def steered_features(row: dict) -> list[int]:
    """The features a steering row intervened on (``interventions`` from mmsae.steer, or ``feature``)."""
    found = [iv.get("feature") for iv in row.get("interventions") or [] if isinstance(iv, dict)]
    f = row.get("feature", row.get("features"))
    found += f if isinstance(f, list) else [f]
    return [x for x in found if isinstance(x, int) and not isinstance(x, bool)]


def _mentions(row: dict, feature: int) -> bool:
    return feature in steered_features(row)


def write_features(site: Path, data: RunData, rows: list[dict], max_features: int | None,
                   n_images: int, thumb_size: int) -> set[int]:
    """Write the data file (and images) of each live feature, in list order, up to ``max_features``."""
    # live features with anything to show, and dead ones that were explained all the same
    chosen = [r for r in rows if ("e" in r or "s" in r or "fr" in r) and (not r.get("d") or "e" in r)]
    if max_features is not None:
        chosen = chosen[:max_features]
    images = ImageWriter(site, data.index, thumb_size) if data.index is not None else None
    for i, row in enumerate(tqdm(chosen, desc="dashboard: feature pages", unit="feature", disable=len(chosen) < 50,
                                 mininterval=1.0)):
        detail = feature_detail(data, row["f"], row, images, n_images)
        # previous / next in the list's default order (best first), among features with a page
        detail["prev"] = chosen[i - 1]["f"] if i > 0 else None
        detail["next"] = chosen[i + 1]["f"] if i + 1 < len(chosen) else None
        write_file(site / feature_data_path(row["f"]), js_put(f"f/{row['f']}", detail))
        row["p"] = 1
        top = next((ex for ex in detail.get("examples", []) if "overlay" in ex), None)
        if top:
            row["t"] = top["overlay"]  # the list shows the best example as a thumbnail
    return {row["f"] for row in chosen}
