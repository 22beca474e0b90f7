"""Synthetic activations with known features, and how well an SAE recovers them.

Each token is a sparse sum of ``k_true`` of ``m`` planted unit directions in R^d, with
heavy-tailed (log-normal) magnitudes, a shared mean offset and Gaussian noise. Feature
frequencies follow a mild power law, as real features do. The recovery score is the mean over
planted directions of the best cosine with any decoder row, and the fraction above 0.9.

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
    """The m unit directions [m, d] (deterministic in the seed)."""
    gen = torch.Generator().manual_seed(cfg.seed)
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
