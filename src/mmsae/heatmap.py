"""Heat-maps of a feature over an image: graded overlays, binary masks and their binarisation.

The activation map comes from an index example (``Example.heatmap()``, one value per pixel of
the original image). Binarisation turns it into a mask; the method is a choice and every result
records it (:func:`binarize_example` returns the record with the mask):

- ``paper``: any activation above zero (TopK leaves exact zeros where the feature is off);
- ``quantile``: Network Dissection's threshold, the feature's top ``quantile`` (default 0.995,
  i.e. the top 0.5%) of activations over every image patch of the dataset, from the index stats;
- ``fraction``: above ``fraction`` of the feature's maximum over the dataset (or of this map's
  maximum when no index is given).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from PIL import Image

from .errors import MmsaeError

Method = Literal["paper", "quantile", "fraction"]
METHODS = ("paper", "quantile", "fraction")


def binarize(heatmap: np.ndarray, method: Method = "paper", threshold: float | None = None, fraction: float = 0.5) -> np.ndarray:
    """A bool mask [H, W] of where ``heatmap`` counts as active.

    ``paper``: heatmap > 0. ``quantile``: heatmap > ``threshold`` (the dataset quantile; see
    :func:`threshold_for`). ``fraction``: heatmap > ``fraction`` x ``threshold`` if a feature
    maximum is given as ``threshold``, else ``fraction`` x this map's maximum.
    """
    heatmap = np.asarray(heatmap)
    if method == "paper":
        return heatmap > 0
    if method == "quantile":
        if threshold is None:
            raise MmsaeError("binarize(method='quantile') needs the feature's dataset quantile as threshold (FeatureIndex.quantile)")
        return heatmap > max(float(threshold), 0.0)
    if method == "fraction":
        if not 0 < fraction <= 1:
            raise MmsaeError(f"binarisation fraction {fraction} must be in (0, 1]")
        peak = float(threshold) if threshold is not None else float(heatmap.max(initial=0.0))
        return heatmap > max(fraction * peak, 0.0)
    raise MmsaeError(f"binarisation method {method!r} is unknown; use one of {', '.join(METHODS)}")


def threshold_for(index, feature: int, method: Method = "paper", quantile: float = 0.995, fraction: float = 0.5) -> dict:
    """The binarisation record of a feature: ``{"method", "threshold", ...}`` (JSON-ready).

    ``threshold`` is the value a pixel must exceed.
    """
    if method == "paper":
        return {"method": "paper", "threshold": 0.0}
    if method == "quantile":
        return {"method": "quantile", "quantile": quantile, "threshold": float(index.quantile(feature, quantile))}
    if method == "fraction":
        peak = float(index.stats(feature)["max_activation"])
        return {"method": "fraction", "fraction": fraction, "feature_max": peak, "threshold": fraction * peak}
    raise MmsaeError(f"binarisation method {method!r} is unknown; use one of {', '.join(METHODS)}")


def binarize_example(example, index=None, method: Method = "paper", quantile: float = 0.995,
                     fraction: float = 0.5, heatmap: np.ndarray | None = None) -> tuple[np.ndarray, dict]:
    """The mask [H, W] of an index example and the record of how it was made.

    ``index`` (a FeatureIndex) is needed for ``quantile`` and gives the feature maximum for
    ``fraction``; without it ``fraction`` uses the example's own maximum.
    """
    heatmap = example.heatmap()
    if index is None:
        if method == "quantile":
            raise MmsaeError("quantile binarisation needs the feature index (its dataset statistics)")
        record = ({"method": "paper", "threshold": 0.0} if method == "paper" else
                  {"method": "fraction", "fraction": fraction, "feature_max": None,
                   "threshold": fraction * float(heatmap.max(initial=0.0))})
    else:
        record = threshold_for(index, example.feature, method, quantile, fraction)
    return heatmap > record["threshold"], record


def _normalise(heatmap: np.ndarray, vmax: float | None) -> np.ndarray:
    peak = float(vmax) if vmax is not None else float(np.asarray(heatmap).max(initial=0.0))
    if peak <= 0:
        return np.zeros_like(heatmap, dtype=np.float32)
    return np.clip(np.asarray(heatmap, dtype=np.float32) / peak, 0.0, 1.0)


def overlay(image: Image.Image, heatmap: np.ndarray, mode: Literal["overlay", "mask", "crop"] = "overlay",
            alpha: float = 0.5, vmax: float | None = None, mask: np.ndarray | None = None, dim: float = 0.25,
            cmap: str = "jet", margin: float = 0.15) -> Image.Image:
    """Show a heat-map on its image.

    ``overlay``: the map in a colour map, blended with weight ``alpha`` where it is non-zero
    (scaled to ``vmax``, default the map's maximum). ``mask``: the image unchanged inside the
    mask (default: the map > 0) and dimmed to ``dim`` brightness outside, so colours inside stay
    true. ``crop``: the mask's bounding box plus ``margin`` of its size on each side.
    """
    image = image.convert("RGB")
    heatmap = np.asarray(heatmap, dtype=np.float32)
    if heatmap.shape != (image.height, image.width):
        raise MmsaeError(f"heat-map {heatmap.shape} does not match the image ({image.height}, {image.width})")
    pixels = np.asarray(image, dtype=np.float32)
    if mode == "overlay":
        import matplotlib

        level = _normalise(heatmap, vmax)
        colours = matplotlib.colormaps[cmap](level)[..., :3] * 255.0
        weight = (alpha * (level > 0))[..., None]
        return Image.fromarray((pixels * (1 - weight) + colours * weight).round().astype(np.uint8))
    if mask is None:
        mask = heatmap > 0
    mask = np.asarray(mask, dtype=bool)
    if mode == "mask":
        factor = np.where(mask, 1.0, dim)[..., None]
        return Image.fromarray((pixels * factor).round().astype(np.uint8))
    if mode == "crop":
        if not mask.any():
            return image.copy()
        ys, xs = np.nonzero(mask)
        y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
        my, mx = int(round((y1 - y0) * margin)), int(round((x1 - x0) * margin))
        return image.crop((max(0, x0 - mx), max(0, y0 - my), min(image.width, x1 + mx), min(image.height, y1 + my)))
    raise MmsaeError(f"overlay mode {mode!r} is unknown; use overlay, mask or crop")
