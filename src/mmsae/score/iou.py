"""IoU between a concept's segmentation mask and a feature's binarised activation map.

Two aggregations:

* the paper's: IoU per top image, averaged over the feature's top images (a failed
  segmentation, i.e. no mask, counts as IoU 0);
* Network Dissection's dataset-level IoU: the sum of intersections over the sum of unions across
  all images of the dataset, so large and empty images weigh by their pixels rather than one vote
  each. The index keeps only samples of the dataset, so :func:`netdissect_iou` estimates the sums
  from a uniform sample of the images where the feature fires and a sample of the others.
"""

from __future__ import annotations

import numpy as np
from PIL import Image


def fit_mask(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Resize a bool mask to ``shape`` (height, width) with nearest-neighbour sampling."""
    mask = np.asarray(mask, dtype=bool)
    if mask.shape == tuple(shape):
        return mask
    img = Image.fromarray(mask.astype(np.uint8) * 255).resize((shape[1], shape[0]), Image.NEAREST)
    return np.asarray(img) > 127


def intersection_union(mask: np.ndarray | None, activation: np.ndarray) -> tuple[int, int]:
    """Pixel counts |mask ∩ activation| and |mask ∪ activation|; a missing mask is an empty one."""
    activation = np.asarray(activation, dtype=bool)
    if mask is None:
        return 0, int(activation.sum())
    mask = fit_mask(mask, activation.shape)
    return int(np.logical_and(mask, activation).sum()), int(np.logical_or(mask, activation).sum())


def iou(mask: np.ndarray | None, activation: np.ndarray) -> float:
    """IoU of two bool masks; 0 when the segmentation failed (``mask is None``) or both are empty."""
    inter, union = intersection_union(mask, activation)
    return inter / union if union else 0.0


def mean_iou(masks: list[np.ndarray | None], activations: list[np.ndarray]) -> float:
    """The paper's IoU: per-image IoU averaged over the images (failed segmentations count 0)."""
    if not activations:
        return 0.0
    return float(np.mean([iou(m, a) for m, a in zip(masks, activations, strict=True)]))


def dataset_iou(masks: list[np.ndarray | None], activations: list[np.ndarray]) -> float:
    """Network Dissection's IoU: sum of intersections over sum of unions across the images."""
    inter = union = 0
    for m, a in zip(masks, activations, strict=True):
        i, u = intersection_union(m, a)
        inter += i
        union += u
    return inter / union if union else 0.0


def netdissect_iou(firing: list[tuple[int, int]], n_firing: float, nonfiring_mask_areas: list[int],
                   n_images: int) -> float:
    """Network Dissection's IoU over a dataset, estimated from samples.

    ``firing``: (intersection, union) pixel counts on a uniform sample of the ``n_firing`` images
    where the feature fires; ``nonfiring_mask_areas``: the concept mask's pixel count on a sample
    of the other ``n_images - n_firing`` images (where the feature's map is empty, the union is the
    mask). Each sample mean is scaled by its population: sum I / sum U.
    """
    if not firing or n_firing <= 0:
        return 0.0
    inter = n_firing * float(np.mean([i for i, _ in firing]))
    union = n_firing * float(np.mean([u for _, u in firing]))
    if nonfiring_mask_areas and n_images > n_firing:
        union += (n_images - n_firing) * float(np.mean(nonfiring_mask_areas))
    return inter / union if union else 0.0


def token_coverage(layout, mask: np.ndarray) -> np.ndarray:
    """The fraction of each image token's cell that ``mask`` covers: float32 [P].

    ``layout`` is the example's TokenLayout (tiles with their boxes over the original image), so
    this is what a feature firing exactly on the mask would look like at the model's resolution.
    """
    width, height = layout.image_size
    mask = fit_mask(mask, (height, width))
    values = np.zeros(len(layout.positions), dtype=np.float32)
    tiles, rows, cols = (t.cpu().numpy() for t in (layout.tile, layout.row, layout.col))
    for i, (t, r, c) in enumerate(zip(tiles, rows, cols)):
        tile = layout.tiles[int(t)]
        x0, y0, x1, y1 = tile.box
        cw, ch = (x1 - x0) / tile.cols, (y1 - y0) / tile.rows
        # the pixels whose centres fall in the cell (as image_heatmap paints them)
        xa, xb = int(np.ceil(x0 + c * cw - 0.5)), int(np.ceil(x0 + (c + 1) * cw - 0.5))
        ya, yb = int(np.ceil(y0 + r * ch - 0.5)), int(np.ceil(y0 + (r + 1) * ch - 0.5))
        cell = mask[max(ya, 0):min(yb, height), max(xa, 0):min(xb, width)]
        values[i] = cell.mean() if cell.size else 0.0
    return values


def resolution_ceiling(layout, mask: np.ndarray | None) -> float:
    """The best IoU any feature map at the model's token resolution can reach against ``mask``.

    A binarised feature map is a union of token cells. Adding a cell with ``a`` mask pixels and
    ``b`` others raises IoU = I/U exactly when a/b > I/U, that is when the cell's covered
    fraction exceeds IoU / (1 + IoU); so the best union keeps every cell covered above some
    threshold, and the ceiling is the best IoU over thresholds of the mask's own coverage per
    token. Whatever the binarisation, no feature scores above it on this image and segmentation,
    which separates what resolution costs from what the SAE and the explainer lose.
    """
    from ..models.base import image_heatmap

    if mask is None:
        return 0.0
    width, height = layout.image_size
    mask = fit_mask(mask, (height, width))
    if not mask.any():
        return 0.0
    heat = image_heatmap(layout, token_coverage(layout, mask)).reshape(-1)
    levels, level_of = np.unique(heat, return_inverse=True)  # ascending
    inside = np.bincount(level_of.reshape(-1), weights=mask.reshape(-1), minlength=len(levels))
    pixels = np.bincount(level_of.reshape(-1), minlength=len(levels))
    # keeping every pixel at or above each level, from the highest level down
    inter = np.cumsum(inside[::-1])[::-1]
    union = mask.sum() + np.cumsum(pixels[::-1])[::-1] - inter
    positive = levels > 0
    return float((inter[positive] / union[positive]).max())
