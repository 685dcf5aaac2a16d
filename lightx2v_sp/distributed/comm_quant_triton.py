"""Fused FP8 pack+quantize and unpack+dequantize for CUDA tensors (Triton).

One pass each way: a program reads a block of rows once, finds each row's amax, and writes the
e4m3 payload and the fp32 scale straight into the (strided) wire buffer; the unpack kernel reads
payload and scale once and writes the decoded rows. Same format and special-value rules as
`comm_quant` (a row with NaN/inf decodes to NaN; a zero row to zeros). The torch version is the
reference; a GPU test checks that both produce the same bytes.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .comm_quant import FP8_MAX as _FP8_MAX_PY, SCALE_BYTES

FP8_MAX = tl.constexpr(_FP8_MAX_PY)  # a jit'ed kernel reads globals only as constexpr


@triton.jit
def _quantize_kernel(x_ptr, out_ptr, n_rows, n1, n2, xs0, xs1, xs2, os0, os1, os2,
                     D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < n_rows
    i2 = rows % n2
    i1 = (rows // n2) % n1
    i0 = (rows // n2 // n1).to(tl.int64)
    x_off = i0 * xs0 + i1.to(tl.int64) * xs1 + i2.to(tl.int64) * xs2
    o_off = i0 * os0 + i1.to(tl.int64) * os1 + i2.to(tl.int64) * os2
    cols = tl.arange(0, BLOCK_D)
    mask = rmask[:, None] & (cols < D)[None, :]
    x = tl.load(x_ptr + x_off[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    amax = tl.max(tl.abs(x), axis=1)
    bad = (tl.max((x != x).to(tl.int32), axis=1) > 0) | (amax == float("inf"))
    scale = tl.where(amax == 0.0, 1.0, amax / FP8_MAX)
    scale = tl.where(bad, float("nan"), scale)
    y = tl.math.div_rn(x, scale[:, None])
    y = tl.minimum(tl.maximum(y, -FP8_MAX), FP8_MAX)
    y = tl.where(bad[:, None], float("nan"), y)
    payload = y.to(tl.float8e4nv).to(tl.uint8, bitcast=True)
    tl.store(out_ptr + o_off[:, None] + cols[None, :], payload, mask=mask)
    scale_ptr = (out_ptr + o_off + D).to(tl.pointer_type(tl.float32))
    tl.store(scale_ptr, scale, mask=rmask)


@triton.jit
def _dequantize_kernel(p_ptr, out_ptr, n_rows, n1, n2, ps0, ps1, ps2, os0, os1, os2,
                       D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < n_rows
    i2 = rows % n2
    i1 = (rows // n2) % n1
    i0 = (rows // n2 // n1).to(tl.int64)
    p_off = i0 * ps0 + i1.to(tl.int64) * ps1 + i2.to(tl.int64) * ps2
    o_off = i0 * os0 + i1.to(tl.int64) * os1 + i2.to(tl.int64) * os2
    cols = tl.arange(0, BLOCK_D)
    mask = rmask[:, None] & (cols < D)[None, :]
    payload = tl.load(p_ptr + p_off[:, None] + cols[None, :], mask=mask, other=0)
    scale = tl.load((p_ptr + p_off + D).to(tl.pointer_type(tl.float32)), mask=rmask, other=1.0)
    x = payload.to(tl.float8e4nv, bitcast=True).to(tl.float32) * scale[:, None]
    tl.store(out_ptr + o_off[:, None] + cols[None, :], x.to(out_ptr.dtype.element_ty), mask=mask)


def _as_rows3(t: torch.Tensor):
    """View [..., D] as three leading dims with strides (no copy), or None if that is impossible."""
    lead = t.shape[:-1]
    if t.stride(-1) != 1:
        return None
    if len(lead) > 3:
        try:
            t = t.view(-1, *lead[-2:], t.shape[-1])
        except RuntimeError:
            return None
        lead = t.shape[:-1]
    shape = (1,) * (3 - len(lead)) + tuple(lead)
    strides = (0,) * (3 - len(lead)) + tuple(t.stride()[:-1])
    return shape, strides


def supported(x: torch.Tensor, out: torch.Tensor) -> bool:
    d = x.shape[-1]
    return (x.is_cuda and d % 4 == 0 and out.data_ptr() % 4 == 0 and _as_rows3(x) is not None
            and _as_rows3(out) is not None)


def _launch(kernel, src, dst, d):
    (n0, n1, n2), ss = _as_rows3(src)
    _, ds = _as_rows3(dst)
    n_rows = n0 * n1 * n2
    if n_rows == 0:
        return
    block_d = triton.next_power_of_2(d)
    block_r = max(1, min(64, 4096 // block_d))
    grid = (triton.cdiv(n_rows, block_r),)
    kernel[grid](src, dst, n_rows, n1, n2, *ss, *ds, D=d, BLOCK_D=block_d, BLOCK_R=block_r, num_warps=4)


def quantize_into(x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    _launch(_quantize_kernel, x, out, x.shape[-1])
    return out


def dequantize_into(packed: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    _launch(_dequantize_kernel, packed, out, packed.shape[-1] - SCALE_BYTES)
    return out
