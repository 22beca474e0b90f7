"""IoU between a concept's segmentation mask and a feature's binarised activation map.

Two aggregations:

* the paper's: IoU per top image, averaged over the feature's top images (a failed
  segmentation, i.e. no mask, counts as IoU 0);
* Network Dissection's dataset-level IoU: the sum of intersections over the sum of unions across
  all images, so large and empty images weigh by their pixels rather than one vote each.
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
