"""Sparse encoder and decoder kernels with hand-written backward passes.

A TopK SAE touches only k of its n latents per token, so everything after the encoder's matmul
is O(batch * k * d) instead of O(batch * n * d):

* ``SparseEncode``: the encoder matmul (the one dense [batch, n] product) in row chunks into a
  reused buffer, immediately reduced to the top ``k`` pre-activations per row. Its backward
  never builds a dense [batch, n] gradient: the encoder's weight gradient is an ``index_add`` of
  ``k`` outer products per token.
* ``SparseDecode``: the decoder as a weighted sum of ``k`` decoder rows (``embedding_bag``);
  backward gathers the same rows for the value gradient and ``index_add``s the weight gradient.

Row chunking keeps temporaries (the [chunk, n] pre-activations, the [chunk, k, d] outer
products) small enough to stay in cache and avoids page-faulting a fresh huge tensor each step.
These run on CPU and GPU alike; on GPU they are plain PyTorch ops (no Triton needed).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# rows per chunk: about 8 MB of pre-activations per chunk at n = 32k (float32)
_ENCODE_CHUNK_ELEMENTS = 1 << 21
# rows per chunk for the [rows, k, d] temporaries of the backward passes
_BACKWARD_CHUNK_ELEMENTS = 1 << 20


def _rows_per_chunk(elements_per_row: int, budget: int, total: int) -> int:
    return max(1, min(total, budget // max(1, elements_per_row)))


def topk_preactivations(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top ``k`` of ``x @ weight.T + bias`` per row, without keeping the [rows, n] product.

    Returns (values [rows, k], indices [rows, k]) in no particular order within a row.
    """
    rows, n = x.shape[0], weight.shape[0]
    values = torch.empty(rows, k, dtype=x.dtype, device=x.device)
    indices = torch.empty(rows, k, dtype=torch.long, device=x.device)
    if rows == 0:
        return values, indices
    chunk = _rows_per_chunk(n, _ENCODE_CHUNK_ELEMENTS, rows) if x.device.type == "cpu" else rows
    compute = x.dtype
    if torch.is_autocast_enabled(x.device.type):
        # out= matmuls are not autocast; cast by hand (bf16 matmul, float32 results)
        compute = torch.get_autocast_dtype(x.device.type)
        x, weight, bias = x.to(compute), weight.to(compute), bias.to(compute)
    buffer = torch.empty(chunk, n, dtype=compute, device=x.device)
    top = (values, indices) if compute == values.dtype else (torch.empty(rows, k, dtype=compute, device=x.device), indices)
    w_t = weight.t()
    for start in range(0, rows, chunk):
        stop = min(rows, start + chunk)
        pre = buffer[: stop - start]
        torch.addmm(bias, x[start:stop], w_t, out=pre)
        torch.topk(pre, k, dim=-1, sorted=False, out=(top[0][start:stop], indices[start:stop]))
    if top[0] is not values:
        values.copy_(top[0])
    return values, indices


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
        ctx.mark_non_differentiable(indices)
        return values, indices

    @staticmethod
    def backward(ctx, grad_values: torch.Tensor, _grad_indices):
        x, weight, indices = ctx.saved_tensors
        grad_values = grad_values.contiguous()
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = F.embedding_bag(indices, weight, per_sample_weights=grad_values, mode="sum")
        if ctx.needs_input_grad[1]:
            grad_weight = torch.zeros_like(weight)
            _rowwise_outer_index_add(grad_weight, indices, grad_values, x)
        if ctx.needs_input_grad[2]:
            grad_bias = torch.zeros(weight.shape[0], dtype=grad_values.dtype, device=grad_values.device)
            grad_bias.index_add_(0, indices.reshape(-1), grad_values.reshape(-1))
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
        grad_out = grad_out.contiguous()
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
            grad_weight = torch.zeros_like(weight)
            _rowwise_outer_index_add(grad_weight, indices, values.to(grad_out.dtype), grad_out)
        return grad_values, None, grad_weight


def sparse_encode(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Differentiable top-k pre-activations of a linear encoder (see ``SparseEncode``)."""
    return SparseEncode.apply(x, weight, bias, k)


def sparse_decode(values: torch.Tensor, indices: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Differentiable sparse decode (see ``SparseDecode``); leading dims of values/indices are kept."""
    lead = values.shape[:-1]
    out = SparseDecode.apply(values.reshape(-1, values.shape[-1]), indices.reshape(-1, indices.shape[-1]), weight)
    return out.reshape(*lead, weight.shape[1])
