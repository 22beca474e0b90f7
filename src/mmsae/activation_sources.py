"""Where training activations come from: a harvested store, a synthetic generator, or a model live.

Every source yields float32 [local_batch, d] batches whose order is a pure function of
(seed, step), takes ``rank``'s slice of each global batch, and can start at any step
(``skip``) so a resumed run sees exactly the batches an uninterrupted one would have.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch

from .errors import MmsaeError
from .exclusion import TokenExclusion
from .runtime import resolve_device


class ActivationSource:
    d: int
    n_tokens: int | None = None  # None: unknown (live)
    model: str | None = None
    layer: int | None = None
    hook_point: str | None = None
    site: str | None = None  # the site the activations come from ("lm:L", "vision:L", ...)
    # the tokens left out of what this source yields (at harvest and here): recorded in the SAE cfg
    exclusion: TokenExclusion = TokenExclusion()

    def batches(self, local_batch: int, seed: int, rank: int, world: int, skip: int = 0) -> Iterator[torch.Tensor]:
        raise NotImplementedError

    def sample(self, n: int, seed: int) -> torch.Tensor:
        """About ``n`` tokens (the same on every rank) for initialisation."""
        raise NotImplementedError

    def locate_nonfinite(self) -> str | None:
        return None

    def describe(self) -> str:
        raise NotImplementedError


class TensorSource(ActivationSource):
    """An in-memory [N, d] tensor (synthetic data, tests). Epoch e uses permutation(seed, e)."""

    def __init__(self, acts: torch.Tensor, name: str = "tensor"):
        if acts.ndim != 2:
            raise MmsaeError(f"activations must be [tokens, d], got shape {tuple(acts.shape)}")
        self.acts = acts.float()
        self.d = acts.shape[1]
        self.n_tokens = acts.shape[0]
        self.name = name

    def batches(self, local_batch, seed, rank, world, skip=0):
        global_batch = local_batch * world
        per_epoch = self.n_tokens // global_batch
        if per_epoch == 0:
            raise MmsaeError(f"{self.name}: {self.n_tokens} tokens is fewer than one batch of {global_batch}")
        step = skip
        epoch, perm = -1, None
        while True:
            e, b = divmod(step, per_epoch)
            if e != epoch:
                epoch, perm = e, torch.randperm(self.n_tokens, generator=torch.Generator().manual_seed(seed * 100_003 + e))
            start = b * global_batch + rank * local_batch
            yield self.acts[perm[start:start + local_batch]]
            step += 1

    def sample(self, n, seed):
        gen = torch.Generator().manual_seed(seed + 7777)
        return self.acts[torch.randperm(self.n_tokens, generator=gen)[:n]]

    def locate_nonfinite(self):
        bad = (~torch.isfinite(self.acts)).any(1).nonzero()
        return f"{self.name} row {int(bad[0])}" if len(bad) else None

    def describe(self):
        return self.name


class StoreSource(ActivationSource):
    """A harvested ``ActivationStore`` (rank r reads its slice of each global batch)."""

    def __init__(self, path: str, tokens: str = "all", exclude: TokenExclusion = TokenExclusion()):
        from .activations import ActivationStore

        if not (Path(path) / "manifest.json").exists() and not any(Path(path).glob("progress-*.json")):
            raise MmsaeError(f"{path} is not an activation store (no manifest.json); run `mmsae harvest` first")
        self.store = ActivationStore(path)
        self.tokens = tokens
        self.d = self.store.d
        self.exclude = exclude or None  # applied here, on top of what the harvest left out
        self.n_tokens = self.store.count(tokens, self.exclude)
        if exclude:
            exclude.check_kept(self.n_tokens, f"store {path}" + (f" (--tokens {tokens})" if tokens != "all" else ""))
        cfg = self.store.cfg
        self.exclusion = exclude.union(TokenExclusion.from_dict(cfg["harvest"]))
        self.model, self.layer, self.hook_point = cfg.get("model"), cfg.get("layer"), cfg.get("hook_point")
        self.site = cfg.get("site")

    def batches(self, local_batch, seed, rank, world, skip=0):
        return self.store.batches(local_batch, shuffle=True, seed=seed, rank=rank, world=world, epochs=None,
                                  start_batch=skip, tokens=self.tokens, drop_last=True, exclude=self.exclude)

    def sample(self, n, seed):
        n = max(1, min(n, self.n_tokens))
        return next(iter(self.store.batches(n, shuffle=True, seed=seed + 7777, rank=0, world=1, tokens=self.tokens,
                                            exclude=self.exclude)))

    def describe(self):
        return str(self.store.path)


class LiveSource(ActivationSource):
    """Harvest on the fly: run the model over the data and shuffle tokens in a buffer.

    Rank r runs the samples whose id % world == r. Each time the buffer holds ``capacity``
    tokens it is permuted (a generator seeded by seed and rank) and its first half served.
    """

    def __init__(self, model: str, layer: int, data: str, capacity: int, model_batch: int,
                 max_samples: int | None, prompt: str | None, device: str, exclude: TokenExclusion = TokenExclusion()):
        from .data.sources import DEFAULT_PROMPT, open_source
        from .models import load_adapter

        self.adapter = load_adapter(model, device=device)
        self.site = str(self.adapter.resolve_site(layer))
        self.data = open_source(data, prompt=prompt or DEFAULT_PROMPT)
        self.data_spec = data
        self.d = self.adapter.site_width(self.site)
        self.model, self.layer, self.hook_point = model, layer, self.adapter.hook_point(layer)
        self.capacity, self.model_batch, self.max_samples = capacity, model_batch, max_samples
        self.exclusion = exclude

    def _token_rows(self, rank: int, world: int) -> Iterator[torch.Tensor]:
        from .hooks import run_until

        while True:  # epochs over the data
            batch, produced, kept = [], False, 0
            for sample in self.data.samples(rank=rank, world=world, stop=self.max_samples):
                batch.append(sample)
                if len(batch) == self.model_batch:
                    produced = True
                    rows = self._run(batch, run_until)
                    kept += len(rows)
                    yield rows
                    batch = []
            if batch:
                produced = True
                rows = self._run(batch, run_until)
                kept += len(rows)
                yield rows
            if not produced:
                raise MmsaeError(f"data {self.data_spec} gave no samples for rank {rank}")
            if self.exclusion:
                self.exclusion.check_kept(kept, f"data {self.data_spec}")

    def _run(self, batch, run_until) -> torch.Tensor:
        inputs = self.adapter.build_inputs([s.image for s in batch], [s.text for s in batch])
        hidden = run_until(self.adapter, self.layer, inputs)
        ids = inputs.inputs.get("input_ids")
        rows = []
        for i, layout in enumerate(inputs.layouts):
            pos = torch.cat([layout.positions.long(), layout.text_positions.long()]).to(hidden.device)
            if self.exclusion:  # the median norm is over the sequence's image and text positions
                pos = pos[self.exclusion.keep(hidden[i, pos].float().norm(dim=-1), None,
                                              ids[i].to(pos.device)[pos] if ids is not None else None)]
            rows.append(hidden[i].index_select(0, pos))
        return torch.cat(rows).float().cpu()

    def batches(self, local_batch, seed, rank, world, skip=0):
        gen = torch.Generator().manual_seed(seed * 100_003 + rank)
        capacity = max(self.capacity, 2 * local_batch)
        buffer = torch.zeros(0, self.d)
        step = 0
        for rows in self._token_rows(rank, world):
            buffer = torch.cat([buffer, rows])
            if buffer.shape[0] < capacity:
                continue
            buffer = buffer[torch.randperm(buffer.shape[0], generator=gen)]
            half = buffer.shape[0] // 2
            served = 0
            while served + local_batch <= half:
                if step >= skip:
                    yield buffer[served:served + local_batch]
                served += local_batch
                step += 1
            buffer = buffer[served:]

    def sample(self, n, seed):
        rows, total = [], 0
        for part in self._token_rows(0, 1):
            rows.append(part)
            total += part.shape[0]
            if total >= n:
                break
        return torch.cat(rows)[:n]

    def describe(self):
        return f"live:{self.model}@{self.layer}:{self.data_spec}"


def open_activation_source(cfg) -> ActivationSource:
    """The source a ``TrainConfig`` (or ``EvaluateConfig``) names."""
    exclude = TokenExclusion.of(cfg)
    if cfg.activations and str(cfg.activations).startswith("synthetic:"):
        if exclude:
            raise MmsaeError(f"{exclude.describe()} needs an activation store or a live model; synthetic activations have no sequences")
        from .sae.synthetic import SyntheticConfig, generate

        acts, _ = generate(SyntheticConfig.from_spec(cfg.activations))
        return TensorSource(acts, name=cfg.activations)
    if cfg.activations:
        path = Path(cfg.activations)
        if not path.exists():
            raise MmsaeError(f"activation store {path} does not exist; run `mmsae harvest` first or fix --activations")
        return StoreSource(str(path), getattr(cfg, "tokens", "all"), exclude)
    if getattr(cfg, "model", None) and getattr(cfg, "layer", None) is not None and getattr(cfg, "data", None):
        device = resolve_device(cfg.device)
        if cfg.steps is None and cfg.max_tokens is None:
            raise MmsaeError("live training (--model/--layer/--data) needs --steps or --max-tokens")
        return LiveSource(cfg.model, cfg.layer, cfg.data, cfg.shuffle_buffer, cfg.model_batch_size, cfg.max_samples,
                          cfg.prompt, device, exclude)
    raise MmsaeError("give --activations STORE (or synthetic:...), or --model, --layer and --data for live training")
