"""FP8 (e4m3) codec for the wire: one fp32 scale per row of D values, packed with the payload.

A packed row is D payload bytes followed by the 4 bytes of its scale, so a block of rows is one
contiguous uint8 buffer and FP8 needs no second collective for the scales. Bytes per row:
D + 4 instead of 2 D (bf16), 0.516 of bf16 at D = 128.

Error bound: e4m3 keeps 3 mantissa bits, so every decoded value x' of a row with max |x| = amax
satisfies |x' - x| <= amax / 16 (round-to-nearest: half a step of 2^-3 relative at the top of
the range, and finer steps below it; subnormals are spaced amax / 448 / 512 apart).

Special values, deliberately:
- a zero row gets scale 1 and decodes to exact zeros;
- a row holding NaN or +-inf decodes to all NaN (e4m3fn has no infinity, and torch's cast would
  saturate inf to 448: a silent finite value). NaN is never turned into zeros;
- huge finite values (up to the fp32 maximum) are scaled into range, not clipped;
- rows of tiny magnitude (amax / 448 below fp32's smallest normal, 1.2e-38) use that smallest
  normal as their scale, so nothing overflows; values under about 1e-41 may then flush to zero
  (an absolute error below 2e-41, where the relative bound above no longer applies).
"""
from __future__ import annotations

import torch

from .fp8_format import FP8_DTYPE, FP8_MAX, MIN_SCALE, SCALE_BYTES, packed_row_bytes

__all__ = ["FP8_DTYPE", "FP8_MAX", "MIN_SCALE", "SCALE_BYTES", "dequantize", "dequantize_into",
           "packed_row_bytes", "quantize", "quantize_into"]

_fused_module = None


def _fused(x: torch.Tensor, out: torch.Tensor, impl: str):
    """The Triton kernels for CUDA tensors they can take, else None (torch path)."""
    global _fused_module
    if impl == "torch" or not x.is_cuda:
        return None
    if _fused_module is None:
        try:  # optional (Triton, CUDA): imported on the first CUDA tensor, not with this module
            from . import comm_quant_triton as module
        except ImportError:
            module = False
        _fused_module = module
    if _fused_module and _fused_module.supported(x, out):
        return _fused_module
    if impl == "triton":
        raise ValueError(f"the Triton FP8 kernels cannot take {tuple(x.shape)} {x.dtype} on {x.device}")
    return None


def quantize_into(x: torch.Tensor, out: torch.Tensor, impl: str = "auto") -> torch.Tensor:
    """Quantize `x` [..., D] into `out` uint8 [..., D + 4] (a view into a wire buffer is fine).

    impl: "auto" (fused Triton kernel on CUDA, torch otherwise), "torch" or "triton".
    """
    d = x.shape[-1]
    assert out.shape[-1] == d + SCALE_BYTES and out.dtype == torch.uint8, (out.shape, out.dtype)
    fused = _fused(x, out, impl)
    if fused is not None:
        return fused.quantize_into(x, out)
    xf = x.float()
    amax = xf.abs().amax(dim=-1, keepdim=True)
    # the smallest normal fp32 floor keeps 1 / scale finite for rows of subnormal magnitude
    scale = (amax / FP8_MAX).clamp_min_(MIN_SCALE).masked_fill_(amax == 0, 1.0)
    scale = scale.nan_to_num_(nan=float("nan"), posinf=float("nan"))
    payload = (xf * scale.reciprocal()).clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    out[..., :d].copy_(payload.view(torch.uint8))
    out[..., d:].copy_(scale.view(torch.uint8).reshape(*scale.shape[:-1], SCALE_BYTES))
    return out


def quantize(x: torch.Tensor) -> torch.Tensor:
    out = torch.empty((*x.shape[:-1], packed_row_bytes(x.shape[-1])), dtype=torch.uint8, device=x.device)
    return quantize_into(x, out)


def dequantize_into(packed: torch.Tensor, out: torch.Tensor, impl: str = "auto") -> torch.Tensor:
    """uint8 [..., D + 4] -> `out` [..., D] (any float dtype; a view is fine)."""
    d = packed.shape[-1] - SCALE_BYTES
    assert out.shape[-1] == d and packed.dtype == torch.uint8, (packed.shape, out.shape)
    fused = _fused(packed, out, impl)
    if fused is not None:
        return fused.dequantize_into(packed, out)
    payload = packed[..., :d].view(FP8_DTYPE)
    scale = packed[..., d:].contiguous().view(torch.float32)
    out.copy_(payload.float() * scale)
    return out


def dequantize(packed: torch.Tensor, dtype: torch.dtype, impl: str = "auto") -> torch.Tensor:
    """uint8 [..., D + 4] -> `dtype` [..., D]."""
    out = torch.empty((*packed.shape[:-1], packed.shape[-1] - SCALE_BYTES), dtype=dtype, device=packed.device)
    return dequantize_into(packed, out, impl)
