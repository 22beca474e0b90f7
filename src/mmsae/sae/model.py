"""The sparse autoencoder; what TopK, BatchTopK and JumpReLU do differently is in ``architectures``.

Parameters use EleutherAI sparsify's names so a state dict saves as-is: ``encoder.weight``
[n, d], ``encoder.bias`` [n], ``W_dec`` [n, d], ``b_dec`` [d] (plus ``threshold`` [n] for
JumpReLU and BatchTopK). Encoding subtracts ``b_dec`` first (the pre-encoder bias):

    pre = encoder(x - b_dec)
    topk:      z = relu(top_k(pre))                   (k per token)
    batchtopk: training: relu of the top k * batch pre-activations over the whole batch;
               inference: relu(pre) where pre > threshold (a JumpReLU with the learned cut-off)
    jumprelu:  z = pre * (pre > threshold)
    recon = z @ W_dec + b_dec

Matryoshka (``matryoshka_groups``, with topk or batchtopk) changes only the training loss: the
latents form nested groups and every prefix of groups must reconstruct alone (see
``mmsae.train``). At inference it is exactly the TopK / BatchTopK SAE above.

Weights are always in the units of the raw activations: when training normalises its inputs
(mean squared norm = d), the scale is folded into the biases afterwards (see ``fold_scale``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import MmsaeError
from .architectures import ARCHITECTURES, get_architecture
from .kernels import sparse_decode, sparse_encode


@dataclass
class SaeConfig:
    """Shape and kind of an SAE, plus where it was trained (recorded in ``cfg.json``)."""

    d_in: int
    num_latents: int = 0  # 0: d_in * expansion_factor
    k: int = 32  # active latents per token (TopK / BatchTopK average); the encode_sparse width
    expansion_factor: int = 32
    architecture: str = "topk"  # a name in architectures.ARCHITECTURES
    normalize_decoder: bool = True
    model: str | None = None
    layer: int | None = None
    hook_point: str | None = None
    # the site the SAE was trained at (mmsae.models.sites: "lm:L", "vision:L", ...); None in
    # SAEs saved before sites were recorded (their hook_point / layer say it)
    site: str | None = None
    # the scale that training multiplied inputs by (already folded into the weights; a record)
    input_scale: float = 1.0
    # Matryoshka: sizes of the nested latent groups (summing to num_latents), or None. Training
    # makes every prefix of the groups reconstruct alone; encoding and decoding ignore it.
    matryoshka_groups: list[int] | None = None
    # the tokens training left out (mmsae.exclusion.TokenExclusion.to_dict()); None: none were
    token_exclusion: dict | None = None

    def __post_init__(self):
        if self.num_latents <= 0:
            self.num_latents = self.d_in * self.expansion_factor
        else:
            self.expansion_factor = max(1, round(self.num_latents / self.d_in))
        arch = get_architecture(self.architecture)  # (an unknown name is an error)
        if self.d_in <= 0:
            raise MmsaeError(f"SAE input width d_in={self.d_in} must be positive")
        if not 0 < self.k <= self.num_latents:
            raise MmsaeError(f"k={self.k} must be between 1 and the number of latents ({self.num_latents}); lower --k or raise --expansion")
        if self.matryoshka_groups is not None:
            groups = self.matryoshka_groups = [int(g) for g in self.matryoshka_groups]
            if not arch.matryoshka:
                names = " or ".join(name for name, a in ARCHITECTURES.items() if a.matryoshka)
                raise MmsaeError(f"--matryoshka-groups needs --architecture {names} (not {self.architecture})")
            if min(groups, default=0) <= 0 or sum(groups) != self.num_latents:
                raise MmsaeError(f"--matryoshka-groups {' '.join(map(str, groups))} must be positive and sum to the number of latents "
                                 f"({self.num_latents}) (they sum to {sum(groups)}); fix the sizes or use --matryoshka-fractions")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class SparseAutoencoder(nn.Module):
    """A sparse autoencoder over one hook point's activations (see the module docstring)."""

    def __init__(self, cfg: SaeConfig, device: str | torch.device | None = None, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.cfg = cfg
        d, n = cfg.d_in, cfg.num_latents
        self.encoder = nn.Linear(d, n, device=device, dtype=dtype)
        self.W_dec = nn.Parameter(torch.empty(n, d, device=device, dtype=dtype))
        self.b_dec = nn.Parameter(torch.zeros(d, device=device, dtype=dtype))
        self.arch = get_architecture(cfg.architecture)
        self.arch.add_parameters(self, device, dtype)  # e.g. JumpReLU's and BatchTopK's threshold [n]
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Random unit-norm decoder rows; encoder = decoder transpose; zero biases."""
        w = torch.randn(self.W_dec.shape, generator=generator, dtype=torch.float32).to(self.W_dec)
        self.W_dec.copy_(w / w.norm(dim=1, keepdim=True))
        self.encoder.weight.copy_(self.W_dec)
        self.encoder.bias.zero_()
        self.b_dec.zero_()

    @property
    def d_in(self) -> int:
        return self.cfg.d_in

    @property
    def num_latents(self) -> int:
        return self.cfg.num_latents

    @property
    def device(self) -> torch.device:
        return self.W_dec.device

    # --- encoding ----------------------------------------------------------------------------
    def _flat(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.cfg.d_in:
            raise MmsaeError(f"activations have width {x.shape[-1]} but the SAE expects d_in={self.cfg.d_in}; use the SAE trained for this hook point")
        return x.reshape(-1, self.cfg.d_in).to(self.W_dec.dtype)

    def pre_activations(self, x: torch.Tensor) -> torch.Tensor:
        """Dense encoder pre-activations [..., n] (before TopK / threshold)."""
        return F.linear(x.to(self.W_dec.dtype) - self.b_dec, self.encoder.weight, self.encoder.bias)

    def encode_sparse(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Active latents per token: (values [..., k], indices [..., k]).

        TopK returns exactly its k latents (values >= 0). Threshold architectures (JumpReLU,
        BatchTopK at inference) return their k largest activations, zero where fewer fired.
        """
        lead = x.shape[:-1]
        flat = self._flat(x) - self.b_dec
        values, indices = sparse_encode(flat, self.encoder.weight, self.encoder.bias, self.cfg.k)
        values = self.arch.activate(self, values, indices)
        return values.reshape(*lead, self.cfg.k), indices.reshape(*lead, self.cfg.k)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Dense latent activations [..., n] (mostly zeros)."""
        return self.arch.encode(self, x)

    # --- decoding ----------------------------------------------------------------------------
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Reconstruction [..., d] from dense latents [..., n]."""
        return latents.to(self.W_dec.dtype) @ self.W_dec + self.b_dec

    def decode_sparse(self, values: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """Reconstruction [..., d] from (values [..., k], indices [..., k])."""
        return sparse_decode(values.to(self.W_dec.dtype), indices, self.W_dec) + self.b_dec

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Reconstruction of ``x`` (same shape)."""
        if self.arch.at_most_k:
            return self.decode_sparse(*self.encode_sparse(x)).reshape(x.shape)
        return self.decode(self.encode(x)).reshape(x.shape)

    # --- decoder norm ------------------------------------------------------------------------
    @torch.no_grad()
    def set_decoder_norm_to_unit_norm(self) -> None:
        norms = self.W_dec.norm(dim=1, keepdim=True).clamp_min(torch.finfo(self.W_dec.dtype).eps)
        self.W_dec.div_(norms)

    @torch.no_grad()
    def remove_gradient_parallel_to_decoder_directions(self) -> None:
        """Project out the radial part of the decoder gradient (rows stay unit norm to first order)."""
        if self.W_dec.grad is None:
            return
        # row-wise dots as a batched [1, d] x [d, 1] product: no [n, d] temporary
        parallel = torch.bmm(self.W_dec.grad.unsqueeze(1), self.W_dec.unsqueeze(2)).view(-1, 1)
        self.W_dec.grad.addcmul_(parallel, self.W_dec, value=-1)

    @torch.no_grad()
    def fold_scale(self, scale: float) -> None:
        """Turn an SAE trained on ``x * scale`` into one on raw ``x`` with identical latents / scale.

        pre(x*s) = W(x*s - b_dec) + b_enc = s * (W(x - b_dec/s) + b_enc/s), so dividing both
        biases and the thresholds by s gives latents (and reconstructions) in raw units, with
        the same active set and unit-norm decoder rows.
        """
        self.b_dec.div_(scale)
        self.encoder.bias.div_(scale)
        if hasattr(self, "threshold"):
            self.threshold.div_(scale)
        self.cfg.input_scale = float(self.cfg.input_scale * scale)

    # --- files -------------------------------------------------------------------------------
    def save(self, path, layout: Literal["sparsify", "saelens"] = "sparsify") -> None:
        """Write ``cfg.json`` plus weights in sparsify's (default) or SAELens' layout."""
        from .formats import save_sae

        save_sae(self, path, layout=layout)
