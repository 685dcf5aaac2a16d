"""Fused FP8 pack+quantize and unpack+dequantize for CUDA tensors (Triton).

One pass each way: a program reads a block of rows once, finds each row's amax, and writes the
e4m3 payload and the fp32 scale straight into the (strided) wire buffer; the unpack kernel reads
payload and scale once and writes the decoded rows. Same format and special-value rules as
`comm_quant` (a row with NaN/inf decodes to NaN; a zero row to zeros). The torch version is the
reference; a GPU test checks that both produce the same bytes.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .fp8_format import FP8_MAX as _FP8_MAX_PY, MIN_SCALE as _MIN_SCALE_PY, SCALE_BYTES

FP8_MAX = tl.constexpr(_FP8_MAX_PY)  # a jit'ed kernel reads globals only as constexpr
MIN_SCALE = tl.constexpr(_MIN_SCALE_PY)


@triton.jit
def _row_offsets(rows, n1, n2, base, s0, s1, s2, ALIGN: tl.constexpr):
    i2 = rows % n2
    i1 = (rows // n2) % n1
    i0 = (rows // n2 // n1).to(tl.int64)
    off = base + i0 * s0 + i1.to(tl.int64) * s1 + i2.to(tl.int64) * s2
    # Pointers are the start of the allocation (aligned) and row starts share the alignment of the
    # storage offset and strides: the hint lets loads/stores go 4-16 bytes wide (a packed row of
    # D + 4 bytes is only 4-byte aligned, which Triton cannot see by itself).
    return tl.multiple_of(off, ALIGN)


@triton.jit
def _quantize_kernel(x_ptr, out_ptr, n_rows, n1, n2, x_base, xs0, xs1, xs2, o_base, os0, os1, os2,
                     D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr,
                     SRC_ALIGN: tl.constexpr, DST_ALIGN: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < n_rows
    x_off = _row_offsets(rows, n1, n2, x_base, xs0, xs1, xs2, SRC_ALIGN)
    o_off = _row_offsets(rows, n1, n2, o_base, os0, os1, os2, DST_ALIGN)
    cols = tl.arange(0, BLOCK_D)
    mask = rmask[:, None] & (cols < D)[None, :]
    x = tl.load(x_ptr + x_off[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    amax = tl.max(tl.abs(x), axis=1)
    bad = (tl.max((x != x).to(tl.int32), axis=1) > 0) | (amax == float("inf"))
    scale = tl.where(amax == 0.0, 1.0, tl.maximum(amax / FP8_MAX, MIN_SCALE))
    scale = tl.where(bad, float("nan"), scale)
    inv = tl.math.div_rn(tl.full(scale.shape, 1.0, tl.float32), scale)  # one IEEE division per row
    y = x * inv[:, None]
    y = tl.minimum(tl.maximum(y, -FP8_MAX), FP8_MAX)
    y = tl.where(bad[:, None], float("nan"), y)
    payload = y.to(tl.float8e4nv).to(tl.uint8, bitcast=True)
    tl.store(out_ptr + o_off[:, None] + cols[None, :], payload, mask=mask)
    scale_ptr = (out_ptr + o_off + D).to(tl.pointer_type(tl.float32))
    tl.store(scale_ptr, scale, mask=rmask)


@triton.jit
def _dequantize_kernel(p_ptr, out_ptr, n_rows, n1, n2, p_base, ps0, ps1, ps2, o_base, os0, os1, os2,
                       D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr,
                       SRC_ALIGN: tl.constexpr, DST_ALIGN: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < n_rows
    p_off = _row_offsets(rows, n1, n2, p_base, ps0, ps1, ps2, SRC_ALIGN)
    o_off = _row_offsets(rows, n1, n2, o_base, os0, os1, os2, DST_ALIGN)
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
            and x.untyped_storage().data_ptr() % 16 == 0 and out.untyped_storage().data_ptr() % 16 == 0
            and _as_rows3(out) is not None)


def _alignment(t: torch.Tensor, strides) -> int:
    """Largest power of two (elements, at most 16 bytes) dividing every row start of `t` in its storage."""
    size = t.element_size()
    g = math.gcd(t.storage_offset(), *[s for s in strides if s])
    align = 1
    while g % (align * 2) == 0 and (align * 2) * size <= 16:
        align *= 2
    return align


def _launch(kernel, src, dst, d):
    (n0, n1, n2), ss = _as_rows3(src)
    _, ds = _as_rows3(dst)
    n_rows = n0 * n1 * n2
    if n_rows == 0:
        return
    block_d = triton.next_power_of_2(d)
    block_r = max(1, min(64, 4096 // block_d))
    grid = (triton.cdiv(n_rows, block_r),)
    # the allocation's start (16-byte aligned by the caching allocator) + element offsets
    src_root, dst_root = (t.as_strided((1,), (1,), 0) for t in (src, dst))
    kernel[grid](src_root, dst_root, n_rows, n1, n2, src.storage_offset(), *ss, dst.storage_offset(), *ds,
                 D=d, BLOCK_D=block_d, BLOCK_R=block_r,
                 SRC_ALIGN=_alignment(src, ss), DST_ALIGN=_alignment(dst, ds), num_warps=4)


def quantize_into(x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    _launch(_quantize_kernel, x, out, x.shape[-1])
    return out


def dequantize_into(packed: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    _launch(_dequantize_kernel, packed, out, packed.shape[-1] - SCALE_BYTES)
    return out
