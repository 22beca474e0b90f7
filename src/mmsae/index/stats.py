"""Per-feature activation statistics of an index: firing counts, sums, maxima and a log-binned
histogram of the non-zero patch activations, from which quantiles are read."""

from __future__ import annotations

import math

import numpy as np
import torch

QUANTILE_LEVELS = (0.5, 0.9, 0.99, 0.995, 0.999)
# Log-spaced histogram of non-zero activations shared by every feature: 1e-4 .. 1e5, 16 bins a
# decade (a bin is 15% wide; quantiles interpolate inside it). Values outside land in the end bins.
HIST_LOG10_MIN, HIST_LOG10_MAX, HIST_BINS_PER_DECADE = -4.0, 5.0, 16
HIST_BINS = int((HIST_LOG10_MAX - HIST_LOG10_MIN) * HIST_BINS_PER_DECADE)


def hist_edges() -> np.ndarray:
    return np.logspace(HIST_LOG10_MIN, HIST_LOG10_MAX, HIST_BINS + 1)


def _hist_bin(values: torch.Tensor) -> torch.Tensor:
    b = ((torch.log10(values.double().clamp_min(1e-30)) - HIST_LOG10_MIN) * HIST_BINS_PER_DECADE).floor()
    return b.clamp(0, HIST_BINS - 1).long()



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

