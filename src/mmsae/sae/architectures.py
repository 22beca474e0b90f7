"""SAE architectures, one class each: what TopK, BatchTopK and JumpReLU do differently.

``SparseAutoencoder`` holds ``arch = ARCHITECTURES[cfg.architecture]()`` and the training step
and the file formats ask it for everything that differs: its extra tensors (``add_parameters``),
its inference activation (``activate``, ``encode``, ``at_most_k``), its training encoder and
extra loss terms (``train_encode``), its update after each optimiser step (``after_step``), and
what the formats need (``saelens``: the name SAELens saves it under; ``matryoshka``, ``auxk``).

To add an architecture, write one ``Architecture`` subclass in this file and add its name to
``ARCHITECTURES``: ``--architecture NAME`` then trains it and both layouts save and load it
(its weights under their ``state_dict`` names), with no other file touched (a hyper-parameter
of its own would be one more ``TrainConfig`` field).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..errors import MmsaeError
from .kernels import sparse_encode

if TYPE_CHECKING:
    from .model import SparseAutoencoder
    from ..train import TrainConfig


@dataclass
class Codes:
    """A training batch's latents as an architecture's ``train_encode`` gives them to the loss:
    sparse (``values`` and ``indices`` [B, w]) or dense (``values`` [B, n], ``indices`` None),
    a term added to the loss as it is (``penalty``: a mean over the local batch's tokens, as the
    ranks' gradients are averaged), and tensors ``after_step`` reads (``extra``)."""

    values: torch.Tensor
    indices: torch.Tensor | None = None
    penalty: torch.Tensor | None = None
    extra: dict = field(default_factory=dict)


class Architecture:
    """The base: no extra tensors, nothing to do after a step, no optional feature; subclasses
    define the rest."""

    saelens: str | None = None  # the SAELens architecture it saves as (None: SAELens cannot hold it)
    at_most_k = False  # encode_sparse's k latents are every latent that fires: decode them sparsely
    matryoshka = False  # Matryoshka groups apply (they change the loss over sparse training codes)
    auxk = False  # the AuxK loss (dead latents reconstruct the residual) applies

    def add_parameters(self, sae: SparseAutoencoder, device: torch.device | str | None, dtype: torch.dtype) -> None:
        """Register the architecture's own parameters or buffers on ``sae`` (saved with it)."""

    def activate(self, sae: SparseAutoencoder, values: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """Latent values of the k largest pre-activations ``values`` of latents ``indices``."""
        raise NotImplementedError

    def encode(self, sae: SparseAutoencoder, x: torch.Tensor) -> torch.Tensor:
        """Dense latent activations [..., n]."""
        raise NotImplementedError

    def train_encode(self, sae: SparseAutoencoder, centred: torch.Tensor, k: int, cfg: TrainConfig, world: int) -> Codes:
        """The training latents of ``centred`` = x - b_dec [B, d] at this step's ``k``; ``world``
        processes hold the rest of the global batch."""
        raise NotImplementedError

    def after_step(self, sae: SparseAutoencoder, parts: dict, state: dict) -> None:
        """Update ``sae`` after each optimiser step (under no_grad), from the step's ``parts``
        (``Codes.extra`` among them) and the run's ``state`` (saved in checkpoints)."""


def _top_candidates(sae: SparseAutoencoder, centred: torch.Tensor, width: int, cfg: TrainConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``width`` largest pre-activations per token, ReLU'd (float32), and their latents."""
    with torch.autocast(centred.device.type, dtype=torch.bfloat16, enabled=cfg.autocast):
        pre_values, indices = sparse_encode(centred, sae.encoder.weight, sae.encoder.bias, width)
    return pre_values.float().relu(), indices


class TopK(Architecture):
    """OpenAI's TopK (Gao et al. 2024): z = relu(top_k(pre)), k per token."""

    saelens = "topk"
    at_most_k = matryoshka = auxk = True

    def activate(self, sae, values, indices):
        return values.relu()

    def encode(self, sae, x):
        values, indices = sae.encode_sparse(x)
        dense = torch.zeros(*values.shape[:-1], sae.cfg.num_latents, dtype=values.dtype, device=values.device)
        return dense.scatter(-1, indices, values)

    def train_encode(self, sae, centred, k, cfg, world):
        return Codes(*_top_candidates(sae, centred, k, cfg))


def _jump(pre: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    return torch.where(pre > threshold, pre, torch.zeros_like(pre)).relu()


class JumpReLU(Architecture):
    """Gemma Scope's JumpReLU: z = pre * (pre > threshold), a learned threshold [n] per latent,
    trained through straight-through estimators with an L0 penalty (Rajamanoharan et al. 2024)."""

    saelens = "jumprelu"  # (not at_most_k: any number of latents may pass their thresholds)

    def add_parameters(self, sae, device, dtype):
        sae.threshold = nn.Parameter(torch.full((sae.cfg.num_latents,), 1e-3, device=device, dtype=dtype))

    def activate(self, sae, values, indices):
        return _jump(values, sae.threshold[indices])

    def encode(self, sae, x):
        return _jump(sae.pre_activations(x), sae.threshold)

    def train_encode(self, sae, centred, k, cfg, world):
        pre = F.linear(centred, sae.encoder.weight, sae.encoder.bias)
        threshold = sae.threshold.clamp_min(1e-6)
        acts = _JumpReLUFunction.apply(pre, threshold, cfg.jumprelu_bandwidth)
        l0 = _StepFunction.apply(pre, threshold, cfg.jumprelu_bandwidth).sum(-1)
        return Codes(acts, penalty=l0.sum() * cfg.l0_coefficient / centred.shape[0])

    def after_step(self, sae, parts, state):
        sae.threshold.clamp_(min=1e-6)


class BatchTopK(JumpReLU):
    """BatchTopK (Bussmann et al. 2024): in training, the k * batch largest activations of the
    whole (global) batch; at inference a JumpReLU whose threshold, a buffer, follows the
    training batches' cut-off (an exponential moving average, not a gradient)."""

    matryoshka = auxk = True

    def add_parameters(self, sae, device, dtype):
        sae.register_buffer("threshold", torch.zeros(sae.cfg.num_latents, device=device, dtype=dtype))

    def train_encode(self, sae, centred, k, cfg, world):
        values, indices = _top_candidates(sae, centred, min(sae.cfg.num_latents, cfg.batchtopk_candidates * k), cfg)
        # the global batch's (k * batch)-th largest activation is the cut-off
        candidates = all_gather_cat(values.detach().reshape(-1))
        n_keep = min(candidates.numel(), k * centred.shape[0] * world)
        cut = candidates.topk(n_keep, sorted=False).values.min().clamp_min(torch.finfo(values.dtype).tiny)
        return Codes(values * (values.detach() >= cut), indices, extra={"cut": cut})

    def after_step(self, sae, parts, state):
        cut = parts["cut"].to(sae.threshold.dtype)
        if state["threshold_initialised"]:
            sae.threshold.mul_(0.99).add_(0.01 * cut)
        else:  # the first step (at the final k, when k anneals) sets it
            sae.threshold.fill_(float(cut))
            state["threshold_initialised"] = True


ARCHITECTURES: dict[str, type[Architecture]] = {"topk": TopK, "batchtopk": BatchTopK, "jumprelu": JumpReLU}


def get_architecture(name: str) -> Architecture:
    """The registered architecture ``name`` (a one-line error naming the others if there is none)."""
    if name not in ARCHITECTURES:
        raise MmsaeError(f"unknown SAE architecture {name!r}; use one of {', '.join(ARCHITECTURES)}")
    return ARCHITECTURES[name]()


def all_gather_cat(t: torch.Tensor) -> torch.Tensor:
    """``t`` of every process, concatenated (``t`` itself in a single process)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, t.contiguous())
        return torch.cat(parts)
    return t


# --- JumpReLU's straight-through estimators --------------------------------------------------------
def _rectangle(x: torch.Tensor) -> torch.Tensor:
    return ((x > -0.5) & (x < 0.5)).to(x.dtype)


class _JumpReLUFunction(torch.autograd.Function):
    """pre * (pre > threshold); the threshold's gradient through a rectangle kernel of ``bandwidth``."""

    @staticmethod
    def forward(ctx, pre, threshold, bandwidth: float):
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return pre * (pre > threshold)

    @staticmethod
    def backward(ctx, grad):
        pre, threshold = ctx.saved_tensors
        bw = ctx.bandwidth
        grad_pre = (pre > threshold) * grad
        grad_threshold = -(threshold / bw) * _rectangle((pre - threshold) / bw) * grad
        return grad_pre, grad_threshold.sum(0), None


class _StepFunction(torch.autograd.Function):
    """The L0 count (pre > threshold); gradient to the threshold only, as above."""

    @staticmethod
    def forward(ctx, pre, threshold, bandwidth: float):
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return (pre > threshold).to(pre.dtype)

    @staticmethod
    def backward(ctx, grad):
        pre, threshold = ctx.saved_tensors
        bw = ctx.bandwidth
        grad_threshold = -(1.0 / bw) * _rectangle((pre - threshold) / bw) * grad
        return None, grad_threshold.sum(0), None
