"""Which token positions an SAE leaves out: attention sinks and special tokens.

The first positions of a sequence (BOS, the chat template's first token) often carry a
residual-stream vector whose norm is tens of times the others' (an attention sink). One such
token holds more variance than hundreds of ordinary ones, so it dominates FVU and spliced loss.
``TokenExclusion`` is the one rule that harvest, train and evaluate share (their options
``exclude_token_ids`` and ``exclude_norm_above``), recorded in the store manifest and the SAE's
``cfg.json`` so later stages know what the SAE was trained on:

* ``token_ids``: leave out these token ids (e.g. BOS);
* ``norm_above``: leave out tokens whose norm is above this multiple of the median token norm of
  their own sequence (its image and text positions at the hooked layer). A multiple above 1
  never leaves out the median token, so this rule alone cannot empty a sequence.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import MmsaeError


@dataclass(frozen=True)
class TokenExclusion:
    """A rule that picks the tokens to leave out (see the module docstring); empty: keep all."""

    token_ids: tuple[int, ...] = ()
    norm_above: float | None = None

    def __post_init__(self):
        object.__setattr__(self, "token_ids", tuple(sorted({int(t) for t in self.token_ids or ()})))
        if any(t < 0 for t in self.token_ids):
            raise MmsaeError(f"--exclude-token-ids {' '.join(map(str, self.token_ids))}: token ids must be non-negative")
        if self.norm_above is not None and not (float(self.norm_above) > 1 and float(self.norm_above) < float("inf")):
            raise MmsaeError(f"--exclude-norm-above {self.norm_above} must be a finite multiple of the median token norm "
                             "above 1 (e.g. 10)")

    @classmethod
    def of(cls, cfg) -> TokenExclusion:
        """The rule a stage config names with ``exclude_token_ids`` and ``exclude_norm_above``."""
        return cls(tuple(getattr(cfg, "exclude_token_ids", None) or ()), getattr(cfg, "exclude_norm_above", None))

    @classmethod
    def from_dict(cls, d: dict | None) -> TokenExclusion:
        """The rule recorded in a store manifest's config or an SAE's cfg.json (absent keys: none)."""
        d = d or {}
        return cls(tuple(d.get("exclude_token_ids") or ()), d.get("exclude_norm_above"))

    def to_dict(self) -> dict:
        return {"exclude_token_ids": list(self.token_ids), "exclude_norm_above": self.norm_above}

    def __bool__(self) -> bool:
        return bool(self.token_ids) or self.norm_above is not None

    def union(self, other: TokenExclusion) -> TokenExclusion:
        """Both rules at once (the lower norm multiple)."""
        norms = [n for n in (self.norm_above, other.norm_above) if n is not None]
        return TokenExclusion(self.token_ids + other.token_ids, min(norms) if norms else None)

    def describe(self) -> str:
        """The options that give this rule, as typed on the command line."""
        parts = []
        if self.token_ids:
            ids = " ".join(map(str, self.token_ids[:8])) + (f" ... ({len(self.token_ids)} ids)" if len(self.token_ids) > 8 else "")
            parts.append("--exclude-token-ids " + ids)
        if self.norm_above is not None:
            parts.append(f"--exclude-norm-above {self.norm_above:g}")
        return " ".join(parts) or "no exclusion"

    def keep(self, norms: torch.Tensor, groups: torch.Tensor | None = None, token_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Bool [N]: which of N tokens the rule keeps.

        ``norms`` [N]: each token's activation norm; ``groups`` [N]: its sequence (sample id),
        None for one sequence; ``token_ids`` [N]: its token id (needed by ``token_ids`` rules).
        """
        keep = torch.ones(norms.shape[0], dtype=torch.bool, device=norms.device)
        if self.token_ids:
            if token_ids is None:
                raise MmsaeError(f"{self.describe()} needs token ids, which this data does not record (a store harvested "
                                 "by an older mmsae); harvest again, or exclude by --exclude-norm-above")
            keep &= ~torch.isin(token_ids.to(norms.device), torch.tensor(self.token_ids, device=norms.device))
        if self.norm_above is not None and norms.numel():
            keep &= norms <= self.norm_above * group_median(norms.float(), groups)
        return keep

    def check_kept(self, kept: int, where: str) -> None:
        """A rule that leaves nothing is a user error naming the options."""
        if kept == 0:
            raise MmsaeError(f"{self.describe()} leaves no token of {where}; exclude fewer tokens")


def group_median(values: torch.Tensor, groups: torch.Tensor | None = None) -> torch.Tensor:
    """[N]: for each element, the (lower) median of the values of its group (one group if None)."""
    if groups is None:
        groups = torch.zeros(values.shape[0], dtype=torch.long, device=values.device)
    by_value = torch.argsort(values)
    order = by_value[torch.argsort(groups[by_value], stable=True)]  # by group, then by value
    _, counts = torch.unique_consecutive(groups[order], return_counts=True)
    starts = counts.cumsum(0) - counts
    medians = values[order][starts + (counts - 1) // 2]
    out = torch.empty_like(values)
    out[order] = torch.repeat_interleave(medians, counts)
    return out


def sequence_keep(rule: TokenExclusion, hidden: torch.Tensor, positions: torch.Tensor, input_ids: torch.Tensor | None) -> torch.Tensor:
    """Bool [B, T]: the rule applied to a model batch; ``positions`` [B, T] marks each sequence's
    real tokens (its image and text positions), which alone set its median norm."""
    keep = torch.ones(positions.shape, dtype=torch.bool, device=positions.device)
    if not rule:
        return keep
    b, t = positions.nonzero(as_tuple=True)
    norms = hidden[b, t].float().norm(dim=-1)
    ids = input_ids[b, t] if input_ids is not None else None
    keep[b, t] = rule.keep(norms, b, ids)
    return keep
