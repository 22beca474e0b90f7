"""Synthetic activations with known features, and how well an SAE recovers them.

Each token is a sparse sum of ``k_true`` of ``m`` planted unit directions in R^d, with
heavy-tailed (log-normal) magnitudes, a shared mean offset and Gaussian noise. Feature
frequencies follow a mild power law, as real features do. The recovery score is the mean over
planted directions of the best cosine with any decoder row, and the fraction above 0.9.

``generate_hierarchical`` plants a hierarchy instead (parents, and children that fire only with
their parent and add their own direction to it): the ground truth for Matryoshka SAEs.

Spec string (usable as ``mmsae train --activations synthetic:d=64,m=256,k=4,tokens=200000``):
keys ``d, m, k, tokens, noise, seed``.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from ..errors import MmsaeError


@dataclass
class SyntheticConfig:
    d: int = 64
    m: int = 256  # planted directions
    k: int = 4  # active directions per token
    tokens: int = 100_000
    noise: float = 0.02  # noise std relative to a unit direction
    seed: int = 0

    @classmethod
    def from_spec(cls, spec: str) -> "SyntheticConfig":
        body = spec.split(":", 1)[1] if ":" in spec else ""
        known = {f.name: f.type for f in fields(cls)}
        values = {}
        for item in filter(None, body.split(",")):
            key, _, value = item.partition("=")
            key = key.strip()
            if key not in known:
                raise MmsaeError(f"synthetic activation spec {spec!r}: unknown key {key!r}; use {', '.join(known)}")
            try:
                values[key] = float(value) if key == "noise" else int(value)
            except ValueError as e:
                raise MmsaeError(f"synthetic activation spec {spec!r}: {key}={value!r} is not a number") from e
        cfg = cls(**values)
        if not 0 < cfg.k <= cfg.m or cfg.d <= 0 or cfg.tokens <= 0:
            raise MmsaeError(f"synthetic activation spec {spec!r}: need 0 < k <= m, d > 0, tokens > 0")
        return cfg


def planted_directions(cfg: SyntheticConfig) -> torch.Tensor:
    """The m unit directions [m, d] (deterministic in the seed).

    Their stream is offset from the seed itself: an SAE initialised from ``manual_seed(seed)``
    would otherwise start with the planted directions as its decoder rows.
    """
    gen = torch.Generator().manual_seed(cfg.seed + (1 << 30))
    w = torch.randn(cfg.m, cfg.d, generator=gen)
    return w / w.norm(dim=1, keepdim=True)


def generate(cfg: SyntheticConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(activations [tokens, d], planted directions [m, d])."""
    directions = planted_directions(cfg)
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    # power-law feature frequencies (rank^-0.5), k distinct features per token
    freq = torch.arange(1, cfg.m + 1, dtype=torch.float32).pow(-0.5)
    freq = freq[torch.randperm(cfg.m, generator=gen)]
    active = torch.multinomial(freq.expand(cfg.tokens, cfg.m), cfg.k, replacement=False, generator=gen)
    magnitudes = torch.exp(0.5 * torch.randn(cfg.tokens, cfg.k, generator=gen)) * 2.0
    x = torch.nn.functional.embedding_bag(active, directions, per_sample_weights=magnitudes, mode="sum")
    offset = torch.randn(cfg.d, generator=gen) * 0.5
    x = x + offset + cfg.noise * torch.randn(cfg.tokens, cfg.d, generator=gen)
    return x, directions


def recovery_score(directions: torch.Tensor, decoder_rows: torch.Tensor, threshold: float = 0.9) -> dict:
    """Mean over planted directions of the best cosine with a decoder row, and the fraction > threshold."""
    a = directions / directions.norm(dim=1, keepdim=True)
    b = decoder_rows.detach().to(a) / decoder_rows.detach().to(a).norm(dim=1, keepdim=True).clamp_min(1e-12)
    best = (a @ b.t()).max(dim=1).values
    return {"mean_best_cosine": float(best.mean()), "fraction_recovered": float((best > threshold).float().mean()),
            "threshold": threshold, "planted": int(a.shape[0])}


def generate_hierarchical(d: int = 64, parents: int = 4, children: int = 4, tokens: int = 40_000, parent_rate: float = 0.3,
                          child_rate: float = 0.75, child_scale: float = 1.0, noise: float = 0.01, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Activations with planted hierarchical features: (x [tokens, d], parents [P, d], children [P*C, d]).

    Each parent fires independently (probability ``parent_rate``); when it fires, one of its
    ``children`` does too with probability ``child_rate``, and the token gets the child-specific
    direction on top of the parent's (a child's full direction is parent + child-specific part).
    Parents and child-specific parts are orthonormal, then each parent's parts are centred so that
    they average to zero: the best single direction for a parent's tokens is the parent itself.
    Returned children are the unit child-specific parts; ``child_scale`` scales their magnitudes.
    """
    if parents * (children + 1) > d or children < 2:
        raise MmsaeError(f"hierarchical synthetic data needs parents * (children + 1) <= d and children >= 2 (got {parents}, {children}, d={d})")
    # a stream of its own: an SAE initialised with torch.randn from the same seed must not start
    # with the planted directions as its decoder rows
    gen = torch.Generator().manual_seed(seed + (1 << 20))
    basis, _ = torch.linalg.qr(torch.randn(d, parents * (children + 1), generator=gen, dtype=torch.float64))
    basis = basis.t().float()
    parent_dirs = basis[:parents]
    parts = basis[parents:].view(parents, children, d)
    parts = parts - parts.mean(1, keepdim=True)
    parts = (parts / parts.norm(dim=-1, keepdim=True)).reshape(parents * children, d)
    on = torch.rand(tokens, parents, generator=gen) < parent_rate
    parent_mag = torch.exp(0.3 * torch.randn(tokens, parents, generator=gen)) * on
    child = torch.randint(children, (tokens, parents), generator=gen) + torch.arange(parents) * children
    child_on = on & (torch.rand(tokens, parents, generator=gen) < child_rate)
    child_mag = torch.exp(0.3 * torch.randn(tokens, parents, generator=gen)) * child_on * child_scale
    x = parent_mag @ parent_dirs + torch.nn.functional.embedding_bag(child, parts, per_sample_weights=child_mag, mode="sum")
    return x + noise * torch.randn(tokens, d, generator=gen), parent_dirs, parts
