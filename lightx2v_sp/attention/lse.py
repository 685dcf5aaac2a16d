"""Local attention kernels that also return their log-sum-exp, for ring attention's block merge.

An LSE kernel maps q, k, v [B, S, H, D] (non-causal, scale 1/sqrt(D)) to (out [B, S, H, D] in the
input dtype, lse [B, H, S] fp32), where lse[b, h, i] = log(sum_j exp(q_i . k_j / sqrt(D))) in
natural log: what a kernel that sees only one block of keys needs to hand over so that blocks
can be merged exactly (ring.py). backends.py registers one of these with every kernel that can
produce it:

- PyTorch's SDPA implementations, through their aten ops (which return the LSE, where the public
  `scaled_dot_product_attention` drops it): `_scaled_dot_product_flash_attention` (CUDA, half),
  `_scaled_dot_product_efficient_attention` (CUDA; its LSE is padded to a multiple of 32 queries),
  `_scaled_dot_product_cudnn_attention` (CUDA, half), `_scaled_dot_product_flash_attention_for_cpu`;
- FlashAttention-4 (`return_lse=True`), -3 and -2 (`return_attn_probs=True`): detected from the
  installed function's signature, so a build without the keyword registers without the capability;
- `math_lse`: the fp32 reference on any device (scores materialised: tests and small inputs).
"""
from __future__ import annotations

import inspect
from typing import Callable, Optional

import torch

LseFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], "tuple[torch.Tensor, torch.Tensor]"]


def _heads_first(*tensors: torch.Tensor):
    return [t.transpose(1, 2) for t in tensors]  # [B, S, H, D] -> [B, H, S, D] views


def _lse_of(lse: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Any kernel's LSE ([B, H, S], [B, H, S, 1] or [B, H, S padded]) -> [B, H, S] fp32."""
    b, s, h, _ = q.shape
    return lse.reshape(b, h, -1)[:, :, :s].float()


def math_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    """The reference: fp32 scores, their logsumexp, softmax times v."""
    qf, kf, vf = _heads_first(q.float(), k.float(), v.float())
    scores = (qf @ kf.transpose(-1, -2)) * q.shape[-1] ** -0.5  # [B, H, S_q, S_k]
    lse = torch.logsumexp(scores, dim=-1)
    out = torch.exp(scores - lse.unsqueeze(-1)) @ vf
    return out.transpose(1, 2).to(q.dtype), lse


def torch_flash_lse(q, k, v):
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention(*_heads_first(q, k, v))[:2]
    return out.transpose(1, 2), _lse_of(lse, q)


def torch_efficient_lse(q, k, v):
    out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(*_heads_first(q, k, v), None, True)[:2]
    return out.transpose(1, 2), _lse_of(lse, q)


def torch_cudnn_lse(q, k, v):
    out, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(*_heads_first(q, k, v), None, True)[:2]
    return out.transpose(1, 2), _lse_of(lse, q)


def _cpu_flash_lse(q, k, v):
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(*_heads_first(q, k, v))
    return out.transpose(1, 2), _lse_of(lse, q)


_HAS_CPU_FLASH = hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu")


def sdpa_lse(q, k, v):
    """Plain `sdpa` with its LSE: the flash op for half CUDA inputs it takes, else efficient; on the
    CPU the CPU flash op (fp32 accumulation), or the math reference where this torch lacks it."""
    if q.is_cuda:
        d = q.shape[-1]
        if q.dtype in (torch.float16, torch.bfloat16) and d % 8 == 0 and d <= 256:
            return torch_flash_lse(q, k, v)
        return torch_efficient_lse(q, k, v)
    if _HAS_CPU_FLASH:
        return _cpu_flash_lse(q, k, v)
    return math_lse(q, k, v)


def flash_lse(fn) -> Optional[LseFn]:
    """The LSE form of a FlashAttention `flash_attn_func`, or None if this build has no LSE keyword."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return None
    keyword = next((k for k in ("return_lse", "return_attn_probs") if k in params), None)
    if keyword is None:
        return None

    def call(q, k, v):
        res = fn(q, k, v, **{keyword: True})  # FA4: (out, lse); FA3: (out, lse); FA2: (out, lse, probs)
        return res[0], _lse_of(res[1], q)
    return call
