"""A Triton kernel that decodes a CLT source straight into its targets' pending sums (GPU).

`decode_accumulate(out, top_indices, top_acts, weight, bias)` computes, in one launch,

    out[r, c] += bias[c] + sum_j top_acts[r, j] * weight[top_indices[r, j], c]

for the rows r and columns c of `out`, a float32 `[N, C]` view with unit column stride (the
replacement model's ring slots of the source's targets, side by side): the decode, the bias and
the accumulation with no float32 temporary. Programs tile (row block, column block) with the row
blocks varying fastest, so the programs that run at the same time gather from the same columns of
`weight`: a column block (M x BLOCK_D) stays in L2 while every row of the prefill reads it.
sparsify's kernel gives each row one single-warp program that holds the whole row, and torch's
`embedding_bag` one warp per (row, 32 columns); both re-read `weight` from memory for each row.

Triton is imported on first use (GPU machines have it; the CPU code path never calls this). With
`TRITON_INTERPRET=1` the kernel runs on CPU tensors (how its tests run without a GPU).
"""

from __future__ import annotations

import importlib.util
import os
from functools import cache
from typing import Any

import torch
from torch import Tensor

BLOCK_D = 128
"""Columns per program: 128 bf16 values = 256 bytes of each gathered row."""

MAX_BLOCK_R = 16
"""Rows per program (fewer when the call has fewer rows: a decoding step's batch)."""


@cache
def _kernel() -> Any:
    import triton
    import triton.language as tl

    @triton.jit
    def decode_accumulate_kernel(
        out_ptr,
        idx_ptr,
        acts_ptr,
        w_ptr,
        bias_ptr,
        n_rows,
        n_cols,
        stride_out,
        stride_w,
        K: tl.constexpr,
        BLOCK_R: tl.constexpr,
        BLOCK_D: tl.constexpr,
        HAS_BIAS: tl.constexpr,
    ):
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        row_mask = rows < n_rows
        col_mask = cols < n_cols
        mask = row_mask[:, None] & col_mask[None, :]
        rows = rows.to(tl.int64)
        acc = tl.zeros((BLOCK_R, BLOCK_D), dtype=tl.float32)
        for j in tl.static_range(K):
            index = tl.load(idx_ptr + rows * K + j, mask=row_mask, other=0).to(tl.int64)
            act = tl.load(acts_ptr + rows * K + j, mask=row_mask, other=0.0).to(tl.float32)
            w = tl.load(w_ptr + index[:, None] * stride_w + cols[None, :], mask=mask, other=0.0)
            acc += act[:, None] * w.to(tl.float32)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + cols, mask=col_mask, other=0.0)[None, :]
        out_ptrs = out_ptr + rows[:, None] * stride_out + cols[None, :]
        acc += tl.load(out_ptrs, mask=mask, other=0.0)
        tl.store(out_ptrs, acc, mask=mask)

    return decode_accumulate_kernel


def runs_on(device: torch.device) -> bool:
    """Whether Triton kernels run on `device`'s tensors: CUDA, or the CPU under Triton's
    interpreter (`TRITON_INTERPRET=1`: tests). Does not check that triton is installed."""
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def available(device: torch.device) -> bool:
    """Whether the kernel can run on `device`: triton installed and `runs_on(device)`."""
    return runs_on(device) and importlib.util.find_spec("triton") is not None


def check_available(device: torch.device) -> None:
    """Raise a clear error unless the kernel can run on `device` (CUDA, or the interpreter)."""
    try:
        import triton  # noqa: F401
    except ImportError as error:
        raise RuntimeError(
            "the triton CLT decoder needs the triton package (it comes with CUDA builds of "
            "torch); use decoder='fused' on this machine"
        ) from error
    if not runs_on(device):
        raise RuntimeError(
            f"the triton CLT decoder runs on a CUDA GPU (the coders are on {device}); "
            "use decoder='fused' here, or set TRITON_INTERPRET=1 to run the kernel on the CPU"
        )


def decode_accumulate(
    out: Tensor, top_indices: Tensor, top_acts: Tensor, weight: Tensor, bias: Tensor | None
) -> None:
    """`out += bias + sparse(top_indices, top_acts) @ weight`, in place; see the module doc.

    `out` `[N, C]` float32 with unit column stride, `top_indices` / `top_acts` `[N, k]`,
    `weight` `[M, C]` with unit column stride (a column slice of a wider matrix is fine),
    `bias` `[C]` float32 or None.
    """
    import triton

    rows, k = top_indices.shape
    cols = out.shape[1]
    if out.stride(1) != 1 or weight.stride(1) != 1 or weight.shape[1] != cols:
        raise ValueError(
            f"decode_accumulate needs unit column strides and equal widths: out {tuple(out.shape)} "
            f"stride {out.stride()}, weight {tuple(weight.shape)} stride {weight.stride()}"
        )
    if rows == 0:
        return
    block_r = min(MAX_BLOCK_R, triton.next_power_of_2(rows))
    grid = (triton.cdiv(rows, block_r), triton.cdiv(cols, BLOCK_D))
    _kernel()[grid](
        out,
        top_indices.contiguous(),
        top_acts.contiguous(),
        weight,
        bias if bias is not None else out,  # unused without HAS_BIAS
        rows,
        cols,
        out.stride(0),
        weight.stride(0),
        K=k,
        BLOCK_R=block_r,
        BLOCK_D=BLOCK_D,
        HAS_BIAS=bias is not None,
    )
