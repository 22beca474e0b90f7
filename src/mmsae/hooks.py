"""Reading and editing a layer's output, and stopping the forward pass early.

All of them work with plain forward passes and with ``generate`` (the prefill call sees the whole
prompt [B, T, d], each decode step one new token [B, 1, d]), with padded batches, and always
remove their hook, also when the forward pass raises. ``run_sites`` captures any sites
(``lm:L``, ``vision:L``, ``projector``, a module path; see ``mmsae.models.sites``) in one pass.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

import torch

from .errors import MmsaeError
from .models.base import ModelAdapter, ModelInputs
from .models.sites import Site


def _hidden(output) -> torch.Tensor:
    """The hidden states inside a module output (a tensor, or the first element of a tuple)."""
    return output[0] if isinstance(output, (tuple, list)) else output


def _replace_hidden(output, hidden: torch.Tensor):
    if isinstance(output, tuple):
        return (hidden,) + tuple(output[1:])
    if isinstance(output, list):
        return [hidden] + list(output[1:])
    return hidden


class Capture:
    """The outputs a hooked module produced, one tensor [B, T, d] per call."""

    def __init__(self) -> None:
        self.outputs: list[torch.Tensor] = []

    @property
    def last(self) -> torch.Tensor:
        return self.outputs[-1]

    def concat(self) -> torch.Tensor:
        """All calls joined along the sequence: with generate, [B, prompt + new tokens, d]."""
        return torch.cat(self.outputs, dim=1)

    def __len__(self) -> int:
        return len(self.outputs)


@contextmanager
def capture(module: torch.nn.Module, detach: bool = True) -> Iterator[Capture]:
    """Record ``module``'s output hidden states on every call while the context is open.

    ``detach=False`` keeps the autograd graph (for attribution).
    """
    record = Capture()

    def hook(mod, args, output):
        hidden = _hidden(output)
        record.outputs.append(hidden.detach() if detach else hidden)

    handle = module.register_forward_hook(hook)
    try:
        yield record
    finally:
        handle.remove()


@contextmanager
def edit(module: torch.nn.Module, fn: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[None]:
    """Replace ``module``'s output hidden states by ``fn(hidden)`` on every call.

    The edit runs before the module's other forward hooks, so they all see the edited output.
    ``fn`` gets [B, T, d] (T = 1 on generate's decode steps) and returns the same shape; the
    rest of a tuple output is kept.
    """

    def hook(mod, args, output):
        hidden = _hidden(output)
        new = fn(hidden)
        if new.shape != hidden.shape:
            raise ValueError(f"edit fn changed the hidden shape from {tuple(hidden.shape)} to {tuple(new.shape)}")
        return _replace_hidden(output, new)

    # first among the module's hooks: transformers records hidden_states (which LLaVA's projector
    # reads from the tower) with forward hooks of its own, and those must see the edited output
    handle = module.register_forward_hook(hook, prepend=True)
    try:
        yield
    finally:
        handle.remove()


class _StopForward(Exception):
    """Raised by run_until's hook to end the forward pass after the wanted layer."""


def run_until(adapter: ModelAdapter, layer: int, inputs: ModelInputs | dict, grad: bool = False) -> torch.Tensor:
    """The residual stream [B, T, d] after decoder ``layer``, without running the later layers
    (``run_sites`` at the one site ``lm:layer``)."""
    site = Site.lm(layer)
    return run_sites(adapter, [site], inputs, grad)[site]


def run_sites(adapter: ModelAdapter, sites: Iterable[Site | str | int], inputs: ModelInputs | dict, grad: bool = False) -> dict[Site, torch.Tensor]:
    """Each site's activation for one batch, without running the model past the last of them.

    ``sites`` are :class:`Site` objects or names (``adapter.resolve_site`` reads them); the result
    maps each canonical Site to the output of its module on its first call: [B, T, d] for
    ``lm:L``, the tower's own shape for ``vision:L`` ([tiles, tokens, d], or Qwen2-VL's
    [patches, d]) and the projector's for ``projector`` (``adapter.site_rows`` says which rows
    are which patches). The forward pass stops as soon as every site has its output, so with
    only vision sites the language model does not run.
    """
    wanted = {}
    for site in sites:
        site = adapter.resolve_site(site)
        wanted[site] = adapter.site_module(site)
    if not wanted:
        raise MmsaeError("run_sites needs at least one site")
    batch = inputs.inputs if isinstance(inputs, ModelInputs) else inputs
    record: dict[Site, torch.Tensor] = {}

    def hook_for(site: Site):
        def hook(mod, args, output):
            record.setdefault(site, _hidden(output))
            if len(record) == len(wanted):
                raise _StopForward
        return hook

    handles = [module.register_forward_hook(hook_for(site)) for site, module in wanted.items()]
    try:
        with torch.set_grad_enabled(grad):
            adapter.model(**batch, use_cache=False)
    except _StopForward:
        pass
    finally:
        for handle in handles:
            handle.remove()
    missing = [str(site) for site in wanted if site not in record]
    if missing:
        raise MmsaeError(f"{', '.join(missing)} of {adapter.model_id} never ran on this batch (a vision or projector site needs a batch with images)")
    return {site: record[site] for site in wanted}
