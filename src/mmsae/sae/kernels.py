"""Sparse encoder and decoder kernels with hand-written backward passes.

A TopK SAE touches only k of its n latents per token, so everything after the encoder's matmul
is O(batch * k * d) instead of O(batch * n * d):

* ``SparseEncode``: the encoder matmul (the one dense [batch, n] product) in column blocks,
  each immediately reduced to its top ``k`` pre-activations per row. Its backward
  never builds a dense [batch, n] gradient: the encoder's weight gradient is an ``index_add`` of
  ``k`` outer products per token.
* ``SparseDecode``: the decoder as a weighted sum of ``k`` decoder rows (``embedding_bag``);
  backward gathers the same rows for the value gradient and ``index_add``s the weight gradient.

Weight gradients of leaf parameters are added straight into ``param.grad`` (the backward then
returns None for them): a training step allocates no fresh [n, d] gradient tensors, which on a
busy CPU cost more in page faults than the arithmetic does.

Row chunking keeps temporaries (the [chunk, n] pre-activations, the [chunk, k, d] outer
products) small enough to stay in cache and avoids page-faulting a fresh huge tensor each step.
These run on CPU and GPU alike; on GPU they are plain PyTorch ops (no Triton needed).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F

# elements of the [rows, block] pre-activation buffer (64 MB in float32)
_ENCODE_CHUNK_ELEMENTS = 1 << 24
# rows per chunk for the [rows, k, d] temporaries of the backward passes (4 MB: cache-sized)
_BACKWARD_CHUNK_ELEMENTS = 1 << 20


@contextmanager
def _one_thread(device: torch.device):
    """Run the scatter/gather loops on one CPU thread.

    They are memory-bound; splitting small, cache-sized chunks over threads costs more in
    hand-offs than it gains, and on a shared, oversubscribed CPU far more (measured 7x slower
    with 2 threads than with 1 for the weight-gradient scatter on a busy 2-core machine).
    """
    if device.type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _rows_per_chunk(elements_per_row: int, budget: int, total: int) -> int:
    return max(1, min(total, budget // max(1, elements_per_row)))


def topk_preactivations(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top ``k`` of ``x @ weight.T + bias`` per row, without keeping the [rows, n] product.

    The latents are taken in column blocks: each block's [rows, block] product (at most 64 MB)
    is reduced to its top k at once, and the blocks' candidates are merged at the end. Every
    row of the weight is read once per call (row chunks would re-read the whole weight per
    chunk). Returns (values [rows, k], indices [rows, k]) in no particular order within a row.
    """
    rows, n = x.shape[0], weight.shape[0]
    out_dtype = x.dtype
    if rows == 0:
        return torch.empty(0, k, dtype=out_dtype, device=x.device), torch.empty(0, k, dtype=torch.long, device=x.device)
    if torch.is_autocast_enabled(x.device.type):
        # out= matmuls are not autocast; cast by hand (bf16 matmul, float32 results)
        compute = torch.get_autocast_dtype(x.device.type)
        x, weight, bias = x.to(compute), weight.to(compute), bias.to(compute)
    block = n if x.device.type != "cpu" else max(k, min(n, _ENCODE_CHUNK_ELEMENTS // rows))
    if block >= n:
        pre = torch.addmm(bias, x, weight.t())
        values, indices = pre.topk(k, dim=-1, sorted=False)
        return values.to(out_dtype), indices
    n_blocks = -(-n // block)
    cand_values = torch.full((rows, n_blocks * k), float("-inf"), dtype=x.dtype, device=x.device)
    cand_indices = torch.zeros(rows, n_blocks * k, dtype=torch.long, device=x.device)
    buffer = torch.empty(rows * block, dtype=x.dtype, device=x.device)
    for j, start in enumerate(range(0, n, block)):
        stop = min(n, start + block)
        pre = buffer[: rows * (stop - start)].view(rows, stop - start)
        torch.addmm(bias[start:stop], x, weight[start:stop].t(), out=pre)
        top = pre.topk(min(k, stop - start), dim=-1, sorted=False)
        cand_values[:, j * k: j * k + top.values.shape[1]] = top.values
        cand_indices[:, j * k: j * k + top.values.shape[1]] = top.indices + start
    values, pos = cand_values.topk(k, dim=-1, sorted=False)
    return values.to(out_dtype), cand_indices.gather(1, pos)


def _grad_target(param: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """Where a weight gradient goes: straight into a leaf parameter's ``.grad`` (no fresh
    [n, d] tensor per step, no extra accumulation pass), else a new zero tensor to return."""
    if param.is_leaf and param.requires_grad:
        if param.grad is None:
            param.grad = torch.zeros_like(param)
        return param.grad, True
    return torch.zeros_like(param), False


def _rowwise_outer_index_add(target: torch.Tensor, indices: torch.Tensor, coeffs: torch.Tensor, rows_vec: torch.Tensor) -> None:
    """target[indices[b, j]] += coeffs[b, j] * rows_vec[b], in row chunks (no [B, k, d] tensor)."""
    batch, k = indices.shape
    d = rows_vec.shape[1]
    chunk = _rows_per_chunk(k * d, _BACKWARD_CHUNK_ELEMENTS, batch)
    for start in range(0, batch, chunk):
        stop = min(batch, start + chunk)
        src = coeffs[start:stop, :, None] * rows_vec[start:stop, None, :]
        target.index_add_(0, indices[start:stop].reshape(-1), src.reshape(-1, d))


class SparseEncode(torch.autograd.Function):
    """(x [B, d], weight [n, d], bias [n], k) -> top-k pre-activations (values [B, k], indices [B, k])."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, k: int):
        values, indices = topk_preactivations(x, weight, bias, k)
        ctx.save_for_backward(x, weight, indices)
        ctx.bias = bias
        ctx.mark_non_differentiable(indices)
        return values, indices

    @staticmethod
    def backward(ctx, grad_values: torch.Tensor, _grad_indices):
        x, weight, indices = ctx.saved_tensors
        with _one_thread(x.device):
            return SparseEncode._backward(ctx, x, weight, indices, grad_values.contiguous())

    @staticmethod
    def _backward(ctx, x, weight, indices, grad_values):
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = F.embedding_bag(indices, weight, per_sample_weights=grad_values, mode="sum")
        if ctx.needs_input_grad[1]:
            target, in_place = _grad_target(weight)
            _rowwise_outer_index_add(target, indices, grad_values.to(target.dtype), x.to(target.dtype))
            grad_weight = None if in_place else target
        if ctx.needs_input_grad[2]:
            bias = ctx.bias
            target, in_place = _grad_target(bias)
            target.index_add_(0, indices.reshape(-1), grad_values.reshape(-1).to(target.dtype))
            grad_bias = None if in_place else target
        return grad_x, grad_weight, grad_bias, None


class SparseDecode(torch.autograd.Function):
    """(values [B, k], indices [B, k], weight [n, d]) -> sum_j values[:, j] * weight[indices[:, j]]."""

    @staticmethod
    def forward(ctx, values: torch.Tensor, indices: torch.Tensor, weight: torch.Tensor):
        ctx.save_for_backward(values, indices, weight)
        return F.embedding_bag(indices, weight, per_sample_weights=values.to(weight.dtype), mode="sum")

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        values, indices, weight = ctx.saved_tensors
        with _one_thread(weight.device):
            return SparseDecode._backward(ctx, values, indices, weight, grad_out.contiguous())

    @staticmethod
    def _backward(ctx, values, indices, weight, grad_out):
        grad_values = grad_weight = None
        if ctx.needs_input_grad[0]:
            batch, k = indices.shape
            d = weight.shape[1]
            grad_values = torch.empty_like(values)
            chunk = _rows_per_chunk(k * d, _BACKWARD_CHUNK_ELEMENTS, batch)
            for start in range(0, batch, chunk):
                stop = min(batch, start + chunk)
                rows = weight[indices[start:stop]]  # [chunk, k, d]
                grad_values[start:stop] = torch.bmm(rows, grad_out[start:stop, :, None]).squeeze(-1)
        if ctx.needs_input_grad[2]:
            target, in_place = _grad_target(weight)
            _rowwise_outer_index_add(target, indices, values.to(target.dtype), grad_out.to(target.dtype))
            grad_weight = None if in_place else target
        return grad_values, None, grad_weight


def sparse_encode(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Differentiable top-k pre-activations of a linear encoder (see ``SparseEncode``)."""
    return SparseEncode.apply(x, weight, bias, k)


def sparse_decode(values: torch.Tensor, indices: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Differentiable sparse decode (see ``SparseDecode``); leading dims of values/indices are kept."""
    lead = values.shape[:-1]
    out = SparseDecode.apply(values.reshape(-1, values.shape[-1]), indices.reshape(-1, indices.shape[-1]), weight)
    return out.reshape(*lead, weight.shape[1])
