"""FP8 (e4m3) linear layers: the one in-memory form of quantized weights, and its matmul.

An `Fp8Linear` holds `weight` float8_e4m3fn [out, in] and `weight_scale` fp32 [out, 1]: row r of the
real weight is weight[r] * weight_scale[r] (one scale per output channel; LightX2V's file layout). A
file with one scale per tensor (ComfyUI) or none (plain fp8 casts: scale 1) is the same thing with
every row's scale equal. The bias stays in the compute dtype.

Two matmul paths (`Fp8Linear.matmul`, chosen per layer by `matmul_path`):
- "fp8": the activation is quantized per token (one fp32 scale per row of x, amax / 448, computed on
  the fly), then `torch._scaled_mm` with row-wise scales multiplies e4m3 by e4m3 with an fp32
  accumulator (unless model.fp8_accum=fast: the tensor cores' own, `fast_accum`) and writes bias +
  output in bf16. CUDA sm89+ (Ada, Hopper, Blackwell), compute dtype
  bf16, in and out features multiples of 16 (the FP8 tensor-core GEMM's alignment).
- "weight_only": the weight is dequantized to the compute dtype for the call (one layer at a time,
  in fp32 and rounded once), then an ordinary F.linear: exactly a run of the dequantized weights.
Under `model.compile` the per-token quantization fuses into one kernel with its neighbours.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lightx2v_sp.distributed.fp8_format import FP8_DTYPE, FP8_MAX, MIN_SCALE

MATMUL_PATHS = ("fp8", "weight_only")
# e4m3fn has no infinity; its NaNs are the bit patterns s.1111.111 (0x7F, 0xFF)
_NAN_BITS = 0x7F


def row_scales(amax: torch.Tensor) -> torch.Tensor:
    """fp32 scale per row from its max |value|: amax / 448; 1 for an all-zero row."""
    return (amax / FP8_MAX).clamp_min(MIN_SCALE).masked_fill(amax == 0, 1.0)


def quantize_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[rows, in] float -> (e4m3 [rows, in], fp32 scale [rows, 1]) with w[r] ~ q[r] * scale[r]."""
    wf = w.float()
    scale = row_scales(wf.abs().amax(dim=1, keepdim=True))
    return (wf / scale).clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), scale


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """e4m3 [rows, in] x fp32 [rows, 1] -> `dtype` [rows, in], computed in fp32 and rounded once."""
    return (q.float() * scale).to(dtype)


def fp8_is_finite(q: torch.Tensor) -> torch.Tensor:
    """0-d bool: no NaN byte in an e4m3fn tensor (torch.isfinite has no fp8 kernel)."""
    return ((q.view(torch.uint8) & _NAN_BITS) != _NAN_BITS).all()


def quantize_tokens(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[M, K] activations -> (e4m3 [M, K], fp32 scale [M, 1]): one dynamic scale per token."""
    xf = x.float()
    scale = (xf.abs().amax(dim=1, keepdim=True) / FP8_MAX).clamp_min(MIN_SCALE)
    return (xf / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), scale


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
               bias: torch.Tensor | None, fast_accum: bool = False) -> torch.Tensor:
    """x [..., in] (compute dtype) @ (weight * weight_scale).T + bias, as one scaled FP8 GEMM.
    `fast_accum`: accumulate in the tensor cores' own accumulator, without the periodic promotion to fp32
    (model.fp8_accum=fast: faster, less exact; bench_fp8.py measures both)."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    if x2.shape[0] == 0:  # a rank may hold no tokens
        return x.new_empty(*lead, weight.shape[0])
    q, scale = quantize_tokens(x2)
    # [M, K] e4m3 (row-major) x [K, N] e4m3 (column-major: the weight's transpose) -> [M, N] x.dtype;
    # scale_a [M, 1] per token, scale_b [1, N] per output channel
    out = torch._scaled_mm(q, weight.t(), scale_a=scale, scale_b=weight_scale.view(1, -1), bias=bias,
                           out_dtype=x.dtype, use_fast_accum=fast_accum)
    return out.view(*lead, weight.shape[0])


def fp8_gemm_supported(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether `device` runs the FP8 GEMM path for compute dtype `dtype` (CUDA sm89+, bf16)."""
    if device.type != "cuda" or dtype != torch.bfloat16 or not torch.cuda.is_available():
        return False
    return torch.cuda.get_device_capability(device) >= (8, 9) and hasattr(torch, "_scaled_mm")


def matmul_path(layer: "Fp8Linear", device: torch.device, dtype: torch.dtype, allow_fp8: bool = True) -> str:
    """"fp8" where the GEMM can run this layer, else "weight_only"."""
    aligned = layer.in_features % 16 == 0 and layer.out_features % 16 == 0
    return "fp8" if allow_fp8 and aligned and fp8_gemm_supported(device, dtype) else "weight_only"


class Fp8Linear(nn.Module):
    """y = x @ (weight * weight_scale).T + bias with e4m3 `weight` and per-output-channel fp32 scales."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, dtype: torch.dtype = torch.float32,
                 device=None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=FP8_DTYPE, device=device),
                                   requires_grad=False)
        self.weight_scale = nn.Parameter(torch.ones(out_features, 1, dtype=torch.float32, device=device),
                                         requires_grad=False)
        self.bias = (nn.Parameter(torch.empty(out_features, dtype=dtype, device=device), requires_grad=False)
                     if bias else None)
        self.matmul = "weight_only"
        self.fast_accum = False

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "Fp8Linear":
        """A quantized copy of `linear` (per-row scales); on the meta device: an empty one."""
        w = linear.weight
        out = cls(linear.in_features, linear.out_features, linear.bias is not None, w.dtype, device=w.device)
        if w.device.type != "meta":
            out.set_weight(w.detach())
            if linear.bias is not None:
                out.bias.data.copy_(linear.bias.detach())
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.matmul == "fp8":
            return fp8_linear(x, self.weight, self.weight_scale, self.bias, self.fast_accum)
        return F.linear(x, dequantize(self.weight, self.weight_scale, x.dtype), self.bias)

    @torch.no_grad()
    def dequantized(self, dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
        return dequantize(self.weight.to(device), self.weight_scale.to(device), dtype)

    @torch.no_grad()
    def set_weight(self, w: torch.Tensor) -> None:
        """Quantize a full-precision weight into this layer with fresh per-row scales."""
        q, scale = quantize_rows(w)
        self.weight.data.copy_(q)
        self.weight_scale.data.copy_(scale)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, matmul={self.matmul}")
