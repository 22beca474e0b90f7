"""Sparse encoder and decoder kernels with hand-written backward passes.

A TopK SAE touches only k of its n latents per token, so everything after the encoder's matmul
is O(batch * k * d) instead of O(batch * n * d):

* ``SparseEncode``: the encoder matmul (the one dense [batch, n] product) in column blocks,
  each immediately reduced to its top ``k`` pre-activations per row.
* ``SparseDecode``: the decoder as a weighted sum of ``k`` decoder rows (``embedding_bag``).

Both backward passes see the active set as a sparse [n, batch] matrix in CSR form
(rows = latents, built once per call by sorting the batch's k * batch indices). Then a weight
gradient is one sparse-dense product (``grad.addmm_(S, rows)``: each latent's row sums its
tokens' vectors, no [batch, k, d] outer products), and the decoder's value gradient, the dot
of each active latent's decoder row with its token's output gradient, is one sampled product
(``sampled_addmm``), with no gathered copy of the rows. Measured against one-shot outer
products with ``index_add_`` and gathered rows with ``bmm`` (bench/gpu_check.py), the sparse
products were faster on a 2-core CPU and on an H200 alike (weight gradient at d=4096: 0.9 ms
against 10 ms on the H200).

Weight gradients of leaf parameters are added straight into ``param.grad`` (the backward then
returns None for them): a training step allocates no fresh [n, d] gradient tensors, which on a
busy CPU cost more in page faults than the arithmetic does. These run on CPU and GPU alike as
plain PyTorch ops (MKL / cuSPARSE under the sparse products; no Triton needed), and none of them
waits for the GPU (no ``bincount`` or boolean indexing, whose output sizes the host must read).
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

# elements of the [rows, block] pre-activation buffer (64 MB in float32)
_ENCODE_CHUNK_ELEMENTS = 1 << 24


def _csr_warning_free(crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    with warnings.catch_warnings():  # "sparse CSR support is in beta": we use its stable core only
        warnings.filterwarnings("ignore", message=".*Sparse CSR tensor support is in beta.*")
        warnings.filterwarnings("ignore", message=".*Sparse invariant checks are implicitly disabled.*")
        return torch.sparse_csr_tensor(crow, col, values, size, check_invariants=False)


class ActiveSet:
    """The (token, latent) pairs of a batch's top-k indices [B, k], sorted by latent into the
    pattern of a sparse [n, B] CSR matrix, for the backward passes.

    ``add_weight_grad`` adds coeffs[b, j] * vectors[b] to row indices[b, j] of a gradient and
    ``row_dots`` gives weight[indices[b, j]] . vectors[b], each as one sparse product.

    ``bags`` [B, k] (with ``n_bags``) puts pair (b, j) in column bags[b, j] instead of b: the
    vectors are then one per bag (the Matryoshka decode's bag is a (token, group) pair).
    """

    def __init__(self, indices: torch.Tensor, n: int, bags: torch.Tensor | None = None, n_bags: int | None = None):
        batch, k = indices.shape
        self.shape = (n, batch, k)
        self.n_columns = batch if bags is None else n_bags
        flat = indices.reshape(-1)
        self.order = torch.argsort(flat, stable=True)
        if bags is None:
            self.tokens = torch.div(self.order, k, rounding_mode="floor")
        else:
            self.tokens = bags.reshape(-1)[self.order]
        # row pointers: how many pairs have a latent below each row (bincount would sync a GPU)
        self.crow = torch.searchsorted(flat[self.order], torch.arange(n + 1, device=indices.device))

    def _matrix(self, coeffs: torch.Tensor) -> torch.Tensor:
        return _csr_warning_free(self.crow, self.tokens, coeffs.reshape(-1)[self.order], (self.shape[0], self.n_columns))

    def add_weight_grad(self, target: torch.Tensor, coeffs: torch.Tensor, vectors: torch.Tensor) -> None:
        """target[indices[b, j]] += coeffs[b, j] * vectors[b] (vectors[bags[b, j]] with bags) for every active pair."""
        dtype = _sparse_dtype(target.dtype)
        into = target if dtype == target.dtype else torch.zeros_like(target, dtype=dtype)
        into.addmm_(self._matrix(coeffs.to(dtype)), vectors.to(dtype))
        if into is not target:
            target.add_(into.to(target.dtype))

    def row_dots(self, weight: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
        """[B, k]: weight[indices[b, j]] . vectors[b] (vectors[bags[b, j]] with bags) for every active pair."""
        dtype = _sparse_dtype(weight.dtype)
        pattern = self._matrix(torch.zeros(self.order.numel(), dtype=dtype, device=weight.device))
        sampled = torch.sparse.sampled_addmm(pattern, weight.to(dtype), vectors.to(dtype).t(), beta=0).values()
        out = torch.empty_like(sampled)
        out[self.order] = sampled
        return out.view(self.shape[1], self.shape[2]).to(weight.dtype)


def _sparse_dtype(dtype: torch.dtype) -> torch.dtype:
    """The sparse products take float32 and float64 only: half-precision weights go through float32."""
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


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
        grad_values = grad_values.contiguous()
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = F.embedding_bag(indices, weight, per_sample_weights=grad_values.to(weight.dtype), mode="sum").to(x.dtype)
        if ctx.needs_input_grad[1]:
            target, in_place = _grad_target(weight)
            ActiveSet(indices, weight.shape[0]).add_weight_grad(target, grad_values, x)
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
        grad_values, grad_weight = _decode_grads(ctx, ActiveSet(indices, weight.shape[0]), values, weight,
                                                 grad_out.contiguous())
        return grad_values, None, grad_weight


def _decode_grads(ctx, active: "ActiveSet", values: torch.Tensor, weight: torch.Tensor, grad_out: torch.Tensor):
    """Gradients of a sparse decode for the values and the weight (each None unless needed)."""
    grad_values = grad_weight = None
    if ctx.needs_input_grad[0]:
        grad_values = active.row_dots(weight, grad_out).to(values.dtype)
    if ctx.needs_input_grad[2]:
        target, in_place = _grad_target(weight)
        active.add_weight_grad(target, values, grad_out)
        grad_weight = None if in_place else target
    return grad_values, grad_weight


class SparseGroupDecode(torch.autograd.Function):
    """(values [B, k], indices [B, k], weight [n, d], ends [G]) -> [B, G, d]: for each token, the
    decode of its active latents in each group (group g = latents ends[g-1] <= i < ends[g]).

    One pass over the k active rows per token, as in ``SparseDecode``: each token's pairs are
    sorted by latent, so every group's pairs are contiguous and form one bag of ``embedding_bag``.
    The backward is ``SparseDecode``'s with one sparse column per (token, group) bag.
    """

    @staticmethod
    def forward(ctx, values: torch.Tensor, indices: torch.Tensor, weight: torch.Tensor, ends: torch.Tensor):
        batch, k = indices.shape
        groups = ends.numel()
        sorted_indices, perm = indices.sort(dim=1)
        sorted_values = values.gather(1, perm)
        # bag (b, g) starts where token b's sorted latents reach the end of group g - 1
        starts = torch.searchsorted(sorted_indices, ends[:-1].expand(batch, groups - 1).contiguous())
        starts = torch.cat([torch.zeros(batch, 1, dtype=starts.dtype, device=starts.device), starts], dim=1)
        offsets = (starts + torch.arange(batch, device=indices.device).unsqueeze(1) * k).reshape(-1)
        out = F.embedding_bag(sorted_indices.reshape(-1), weight, offsets, mode="sum",
                              per_sample_weights=sorted_values.reshape(-1).to(weight.dtype))
        ctx.save_for_backward(values, indices, weight, ends)
        return out.view(batch, groups, weight.shape[1])

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        values, indices, weight, ends = ctx.saved_tensors
        batch, groups = grad_out.shape[:2]
        bags = torch.bucketize(indices, ends, right=True) + torch.arange(batch, device=indices.device).unsqueeze(1) * groups
        active = ActiveSet(indices, weight.shape[0], bags, batch * groups)
        grad_values, grad_weight = _decode_grads(ctx, active, values, weight, grad_out.reshape(batch * groups, -1).contiguous())
        return grad_values, None, grad_weight, None


def sparse_decode_groups(values: torch.Tensor, indices: torch.Tensor, weight: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """Differentiable per-group sparse decode [B, G, d] (see ``SparseGroupDecode``); ``ends`` [G]
    are the groups' end latents (the last is n). Its cumulative sum over groups gives the
    reconstructions from each prefix of the groups (Matryoshka)."""
    return SparseGroupDecode.apply(values, indices, weight, ends)


def sparse_encode(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Differentiable top-k pre-activations of a linear encoder (see ``SparseEncode``)."""
    return SparseEncode.apply(x, weight, bias, k)


def sparse_decode(values: torch.Tensor, indices: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Differentiable sparse decode (see ``SparseDecode``); leading dims of values/indices are kept."""
    lead = values.shape[:-1]
    out = SparseDecode.apply(values.reshape(-1, values.shape[-1]), indices.reshape(-1, indices.shape[-1]), weight)
    return out.reshape(*lead, weight.shape[1])
