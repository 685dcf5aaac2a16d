"""The ring merge's weighted sum in one pass (Triton, CUDA): out = sum_j w_j o_j, fp32 inside.

A program takes a block of rows (one row = one (batch, token, head) of D values), reads each
block's partial output once and its weight, accumulates in fp32 registers and writes the rounded
result once. The partials arrive as a tuple of tensors (one pointer each, no stacking copy); each
number of blocks compiles once. ring_merge.merge_torch is the reference (tests/test_ring.py checks
both on a GPU).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _merge_kernel(parts, w_ptr, out_ptr, n_rows, D: tl.constexpr, BLOCK_D: tl.constexpr, NUM: tl.constexpr,
                  BLOCK_R: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < n_rows
    cols = tl.arange(0, BLOCK_D)
    mask = rmask[:, None] & (cols < D)[None, :]
    offs = rows.to(tl.int64)[:, None] * D + cols[None, :]
    acc = tl.zeros((BLOCK_R, BLOCK_D), dtype=tl.float32)
    for j in tl.static_range(NUM):
        w = tl.load(w_ptr + j * n_rows + rows, mask=rmask, other=0.0)
        x = tl.load(parts[j] + offs, mask=mask, other=0.0).to(tl.float32)
        acc += w[:, None] * x
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


def merge(parts: list[torch.Tensor], weights: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """parts: n x [B, S, H, D]; weights [n, B, S, H] fp32 contiguous -> [B, S, H, D] in `dtype`."""
    parts = tuple(p.contiguous() for p in parts)  # the kernels' outputs already are: no copy
    b, s, h, d = parts[0].shape
    n_rows = b * s * h
    assert weights.shape == (len(parts), b, s, h) and weights.is_contiguous(), weights.shape
    out = torch.empty((b, s, h, d), dtype=dtype, device=parts[0].device)
    if n_rows == 0:
        return out
    block_d = triton.next_power_of_2(d)
    block_r = max(1, 4096 // block_d)
    grid = (triton.cdiv(n_rows, block_r),)
    _merge_kernel[grid](parts, weights, out, n_rows, D=d, BLOCK_D=block_d, NUM=len(parts), BLOCK_R=block_r)
    return out
