"""A CLT source's training decode with Triton: all its targets in one autograd node (GPU).

`source_decode(top_acts, top_indices, weights)` returns, for each target decoder W_t `[M, d]`,
the float32 `[N, d]` product of the sparse activations with W_t (no bias), and its backward gives
the gradients of the activations and of every W_t. Against sparsify's kernels, once per
(source, target) pair (392 pairs for a CLT-16 over 32 layers):

- forward: `triton_decode`'s kernel, programs over (row block, column block) with the row blocks
  fastest, so a column block of W_t stays in L2 while every row gathers from it;
- backward, weight gradient: the (row, slot) entries are sorted by latent once per source (the
  indices are shared by all its targets; sparsify sorts again for each pair), and one program
  per (latent, column block) sums its entries' gradient rows 16 at a time, where sparsify gives
  one program a latent's whole row and walks its entries one by one (the busiest latents set the
  time);
- backward, activation gradient: programs over (row block, column block) dot the gradient tile
  with each gathered W_t tile and add the partial sums atomically into one float32 `[N, k]`
  buffer shared by all the source's targets. Float atomics add in no fixed order, so this
  gradient (and training with it) is not bit-reproducible between runs on a GPU; sparsify's
  kernels and torch's `embedding_bag` paths are the ones to use when that matters.

`CrossLayerTranscoder.gpu_decoder = "triton"` (CLI `--gpu_decoder triton`) trains with it;
`bench --gpu` times it against stock sparsify's PLT. Runs on CUDA, or on the CPU through Triton's
interpreter (`TRITON_INTERPRET=1`, how `make test-triton` tests it).
"""

from __future__ import annotations

from functools import cache
from typing import Any

import torch
from torch import Tensor

from vlm_sparsify.triton_decode import BLOCK_D, MAX_BLOCK_R, decode_accumulate

BLOCK_E = 16
"""Entries (token rows of one latent) a weight-gradient program reads at a time."""


@cache
def _kernels() -> tuple[Any, Any]:
    import triton
    import triton.language as tl

    @triton.jit
    def weight_grad_kernel(
        dw_ptr,
        grad_ptr,
        order_ptr,
        starts_ptr,
        acts_ptr,
        n_cols,
        stride_grad,
        stride_dw,
        K: tl.constexpr,
        BLOCK_E: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        latent = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        col_mask = cols < n_cols
        begin = tl.load(starts_ptr + latent)
        end = tl.load(starts_ptr + latent + 1)
        acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
        for first in range(begin, end, BLOCK_E):
            e = first + tl.arange(0, BLOCK_E)
            e_mask = e < end
            entry = tl.load(order_ptr + e, mask=e_mask, other=0).to(tl.int64)
            act = tl.load(acts_ptr + entry, mask=e_mask, other=0.0).to(tl.float32)
            rows = entry // K
            mask = e_mask[:, None] & col_mask[None, :]
            g = tl.load(
                grad_ptr + rows[:, None] * stride_grad + cols[None, :], mask=mask, other=0.0
            )
            acc += tl.sum(act[:, None] * g.to(tl.float32), axis=0)
        tl.store(dw_ptr + latent * stride_dw + cols, acc, mask=col_mask)

    @triton.jit
    def acts_grad_kernel(
        dacts_ptr,
        grad_ptr,
        idx_ptr,
        w_ptr,
        n_rows,
        n_cols,
        stride_grad,
        stride_w,
        K: tl.constexpr,
        BLOCK_R: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        row_mask = rows < n_rows
        mask = row_mask[:, None] & (cols < n_cols)[None, :]
        rows = rows.to(tl.int64)
        g = tl.load(grad_ptr + rows[:, None] * stride_grad + cols[None, :], mask=mask, other=0.0)
        g = g.to(tl.float32)
        for j in tl.static_range(K):
            index = tl.load(idx_ptr + rows * K + j, mask=row_mask, other=0).to(tl.int64)
            w = tl.load(w_ptr + index[:, None] * stride_w + cols[None, :], mask=mask, other=0.0)
            partial = tl.sum(g * w.to(tl.float32), axis=1)
            tl.atomic_add(dacts_ptr + rows * K + j, partial, mask=row_mask)

    return weight_grad_kernel, acts_grad_kernel


class _SourceDecode(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, top_acts: Tensor, top_indices: Tensor, *weights: Tensor) -> Any:
        top_acts, top_indices = top_acts.contiguous(), top_indices.contiguous()
        rows = top_indices.shape[0]
        outs = []
        for weight in weights:
            out = torch.zeros(rows, weight.shape[1], dtype=torch.float32, device=weight.device)
            decode_accumulate(out, top_indices, top_acts, weight, None)
            outs.append(out)
        ctx.save_for_backward(top_acts, top_indices, *weights)
        return tuple(outs)

    @staticmethod
    def backward(ctx: Any, *grads: Tensor | None) -> Any:
        import triton

        top_acts, top_indices, *weights = ctx.saved_tensors
        rows, k = top_indices.shape
        weight_grad_kernel, acts_grad_kernel = _kernels()
        needs_acts = ctx.needs_input_grad[0]
        dacts = torch.zeros(rows, k, dtype=torch.float32, device=top_acts.device)
        flat = top_indices.reshape(-1)
        latents = weights[0].shape[0]
        # entries (row * k + slot) grouped by latent, once for all the source's targets
        order = torch.argsort(flat)
        starts = torch.zeros(latents + 1, dtype=torch.int64, device=flat.device)
        starts[1:] = torch.bincount(flat, minlength=latents).cumsum(0)
        block_r = min(MAX_BLOCK_R, triton.next_power_of_2(max(rows, 1)))
        weight_grads: list[Tensor | None] = []
        for i, (weight, grad) in enumerate(zip(weights, grads, strict=True)):
            if grad is None:
                weight_grads.append(None)
                continue
            grad = grad.contiguous()
            cols = weight.shape[1]
            if ctx.needs_input_grad[2 + i]:
                dw = torch.empty_like(weight)
                weight_grad_kernel[(latents, triton.cdiv(cols, BLOCK_D))](
                    dw, grad, order, starts, top_acts, cols, grad.stride(0), dw.stride(0),
                    K=k, BLOCK_E=BLOCK_E, BLOCK_D=BLOCK_D,
                )  # fmt: skip
                weight_grads.append(dw)
            else:
                weight_grads.append(None)
            if needs_acts:
                acts_grad_kernel[(triton.cdiv(rows, block_r), triton.cdiv(cols, BLOCK_D))](
                    dacts, grad, top_indices, weight, rows, cols, grad.stride(0),
                    weight.stride(0), K=k, BLOCK_R=block_r, BLOCK_D=BLOCK_D,
                )  # fmt: skip
        return (dacts.to(top_acts.dtype) if needs_acts else None, None, *weight_grads)


def source_decode(top_acts: Tensor, top_indices: Tensor, weights: list[Tensor]) -> list[Tensor]:
    """Each target's decode `[N, d]` float32 (no bias); see the module doc."""
    if any(weight.stride(1) != 1 for weight in weights):
        raise ValueError("source_decode needs decoder weights with unit column stride")
    return list(_SourceDecode.apply(top_acts, top_indices, *weights))
