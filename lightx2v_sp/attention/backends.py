"""Local attention kernels, registered by name. Layout everywhere: [B, S, H, D], non-causal.

`sdpa` is always there (PyTorch picks flash / cuDNN / efficient / math inside). `flash_attn`
(v3 `flash_attn_interface` on Hopper, else v2 `flash_attn`) and `sage` register when their
packages import. `auto` picks the best one that accepts the inputs and logs its choice once.
"""
from __future__ import annotations

import importlib
import logging
from typing import Callable

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

Kernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
_KERNELS: dict[str, Kernel] = {}
_SUPPORTS: dict[str, Callable[[torch.Tensor], bool]] = {}
_AUTO_ORDER = ("flash_attn", "sage", "sdpa")
_auto_choice: dict[tuple, str] = {}


def register_backend(name: str, kernel: Kernel, supports: Callable[[torch.Tensor], bool] = lambda q: True) -> None:
    _KERNELS[name] = kernel
    _SUPPORTS[name] = supports


def available_backends() -> list[str]:
    return sorted(_KERNELS)


def _sdpa(q, k, v):
    # [B, S, H, D] -> [B, H, S, D] views; SDPA takes strided inputs.
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)


register_backend("sdpa", _sdpa)


def _sdpa_pinned(backend):
    """SDPA restricted to one of PyTorch's implementations (for benchmarks and explicit choice)."""
    from torch.nn.attention import sdpa_kernel

    def kernel(q, k, v):
        with sdpa_kernel([backend]):
            return _sdpa(q, k, v)
    return kernel


def _register_sdpa_variants() -> None:
    try:
        from torch.nn.attention import SDPBackend
    except ImportError:  # older torch: plain sdpa only
        return
    for name, member, supports in (("sdpa_cudnn", "CUDNN_ATTENTION", lambda q: _half_on_cuda(q)),
                                   ("sdpa_flash", "FLASH_ATTENTION", lambda q: _half_on_cuda(q)),
                                   ("sdpa_efficient", "EFFICIENT_ATTENTION", lambda q: q.is_cuda),
                                   ("sdpa_math", "MATH", lambda q: True)):
        if hasattr(SDPBackend, member):
            register_backend(name, _sdpa_pinned(getattr(SDPBackend, member)), supports)


def _half_on_cuda(q: torch.Tensor) -> bool:
    return q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)


def _try_register_flash() -> None:
    try:  # FlashAttention-3 (Hopper)
        fa3 = importlib.import_module("flash_attn_interface")

        def _fa3(q, k, v):
            out = fa3.flash_attn_func(q, k, v)
            return out[0] if isinstance(out, tuple) else out

        def _hopper(q):
            return _half_on_cuda(q) and torch.cuda.get_device_capability(q.device)[0] == 9

        register_backend("flash_attn3", _fa3, _hopper)
    except Exception:  # noqa: BLE001 - optional dependency, absent or broken build
        pass
    try:
        fa2 = importlib.import_module("flash_attn")
        register_backend("flash_attn2", lambda q, k, v: fa2.flash_attn_func(q, k, v), _half_on_cuda)
    except Exception:  # noqa: BLE001
        pass
    versions = [n for n in ("flash_attn3", "flash_attn2") if n in _KERNELS]
    if versions:
        def _flash(q, k, v):
            return next(_KERNELS[n] for n in versions if _SUPPORTS[n](q))(q, k, v)

        register_backend("flash_attn", _flash, lambda q: any(_SUPPORTS[n](q) for n in versions))


def _try_register_sage() -> None:
    try:
        sage = importlib.import_module("sageattention")
    except Exception:  # noqa: BLE001
        return
    register_backend("sage", lambda q, k, v: sage.sageattn(q, k, v, tensor_layout="NHD", is_causal=False),
                     _half_on_cuda)


_register_sdpa_variants()
_try_register_flash()
_try_register_sage()


def get_backend(name: str, q: torch.Tensor) -> Kernel:
    """The kernel called `name` (or the `auto` pick for tensors like `q`)."""
    if name == "auto":
        key = (q.device.type, q.dtype)
        choice = _auto_choice.get(key)
        if choice is None:
            choice = next(n for n in _AUTO_ORDER if n in _KERNELS and _SUPPORTS[n](q))
            _auto_choice[key] = choice
            logger.info("attention backend auto -> %s for %s %s", choice, q.device.type, q.dtype)
        return _KERNELS[choice]
    if name not in _KERNELS:
        known = {"flash_attn": "pip install flash-attn (CUDA only)", "sage": "pip install sageattention (CUDA only)"}
        hint = f"; {known[name]}" if name in known else ""
        raise ValueError(f"attention backend {name!r} is not available here (available: "
                         f"{['auto'] + available_backends()}){hint}")
    if not _SUPPORTS[name](q):
        raise ValueError(f"attention backend {name!r} cannot run {q.dtype} tensors on {q.device}; "
                         f"use backend=auto or sdpa")
    return _KERNELS[name]


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """Full (non-causal) attention of one rank's tensors: [B, S, H, D] in, [B, S, H, D] out."""
    return get_backend(backend, q)(q, k, v)


def resolve_backend(name: str, device: torch.device | str, dtype: torch.dtype, head_dim: int = 128) -> str:
    """The registered kernel that `name` runs as for such inputs (`auto` resolved), or a ValueError."""
    q = torch.empty(1, 1, 1, head_dim, device=device, dtype=dtype)
    get_backend(name, q)  # the same choice (and the same log line) as the first real call
    return _auto_choice[(q.device.type, q.dtype)] if name == "auto" else name
