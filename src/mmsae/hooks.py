"""Reading and editing a layer's output, and stopping the forward pass early.

All three work with plain forward passes and with ``generate`` (the prefill call sees the whole
prompt [B, T, d], each decode step one new token [B, 1, d]), with padded batches, and always
remove their hook, also when the forward pass raises.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

from .models.base import ModelAdapter, ModelInputs


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

    ``fn`` gets [B, T, d] (T = 1 on generate's decode steps) and returns the same shape; the
    rest of a tuple output is kept.
    """

    def hook(mod, args, output):
        hidden = _hidden(output)
        new = fn(hidden)
        if new.shape != hidden.shape:
            raise ValueError(f"edit fn changed the hidden shape from {tuple(hidden.shape)} to {tuple(new.shape)}")
        return _replace_hidden(output, new)

    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


class _StopForward(Exception):
    """Raised by run_until's hook to end the forward pass after the wanted layer."""


def run_until(adapter: ModelAdapter, layer: int, inputs: ModelInputs | dict, grad: bool = False) -> torch.Tensor:
    """The residual stream [B, T, d] after decoder ``layer``, without running the later layers.

    The forward pass is stopped by an exception raised from the layer's hook and caught here,
    so later layers, the final norm and the LM head cost nothing.
    """
    module = adapter.layer_module(layer)
    batch = inputs.inputs if isinstance(inputs, ModelInputs) else inputs
    record: list[torch.Tensor] = []

    def hook(mod, args, output):
        record.append(_hidden(output))
        raise _StopForward

    handle = module.register_forward_hook(hook)
    try:
        with torch.set_grad_enabled(grad):
            adapter.model(**batch, use_cache=False)
    except _StopForward:
        pass
    finally:
        handle.remove()
    if not record:
        raise RuntimeError(f"layer {layer} of {adapter.model_id} was never called during the forward pass")
    return record[0]
