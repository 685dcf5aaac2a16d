"""Local attention kernels, registered by name. Layout everywhere: [B, S, H, D], non-causal.

Every kernel is registered with a `supports(device, dtype, head_dim)` predicate and an `exact`
flag. `sdpa` (and `sdpa_*`, which pin one of PyTorch's implementations) is always there. The
optional packages register only when the function we call exists and accepts the device:

- `flash_attn4`: FlashAttention-4 (`flash_attn.cute.flash_attn_func`, CuTe DSL; sm80-sm120)
- `flash_attn3`: FlashAttention-3 (`flash_attn_interface.flash_attn_func`; Hopper only)
- `flash_attn2`: FlashAttention-2 (`flash_attn.flash_attn_func`; sm80+). Installing FA4 alone
  creates a `flash_attn` namespace package without `flash_attn_func`, which must not register.
- `flash_attn`: the best installed FlashAttention for the device (4, 3, then 2).
- `sage`: SageAttention, int8/fp8 quantized, so **lossy**: it runs only when named.

A kernel may also carry an `lse` form (lse.py) that returns its log-sum-exp with the output:
ring attention needs it to merge blocks of keys. Every SDPA implementation and FlashAttention
build with the keyword has one; `resolve_backend(..., need_lse=True)` picks `auto` among those.

`auto` picks the first exact kernel of a fixed preference for the GPU generation (AUTO_PREFERENCE)
that is installed and accepts the inputs, logs the choice once and reports it through
`resolve_backend`. External kernels are wrapped as opaque `torch.library` custom ops with a fake
implementation, so `torch.compile` (model.compile) keeps them in the graph without tracing them.
"""
from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from . import lse as lse_kernels
from .kernel_cache import enable_fa4_disk_cache

logger = logging.getLogger(__name__)

KernelFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
Supports = Callable[[torch.device, torch.dtype, int], bool]


@dataclass(frozen=True)
class Kernel:
    name: str
    fn: KernelFn
    supports: Supports
    exact: bool = True     # False: an approximation (quantized); `auto` never picks it
    source: str = "torch"  # the package it comes from, for logs and the run summary
    lse: Optional[lse_kernels.LseFn] = None  # the same kernel returning (out, log-sum-exp): lse.py


_KERNELS: dict[str, Kernel] = {}
_auto_choice: dict[tuple, str] = {}

# `auto`, by GPU generation (compute capability major): FlashAttention-4 measured fastest on the
# H100 (BENCHMARKS.md), then FA3, cuDNN SDPA, FA2, plain SDPA. Exact kernels only.
AUTO_PREFERENCE: dict[str, tuple[str, ...]] = {
    "hopper_blackwell": ("flash_attn4", "flash_attn3", "sdpa_cudnn", "flash_attn2", "sdpa"),
    "ampere_ada": ("flash_attn2", "flash_attn4", "sdpa"),
    "other": ("sdpa",),
}

INSTALL_HINTS = {
    "flash_attn4": "pip install flash-attn-4 (CUDA sm80+)",
    "flash_attn3": "build FlashAttention-3 from its hopper/ directory (sm90 only)",
    "flash_attn2": "pip install flash-attn (CUDA sm80+)",
    "flash_attn": "pip install flash-attn-4, or flash-attn (CUDA only)",
    "sage": "pip install sageattention (CUDA only; lossy, opt-in)",
}


def register_backend(name: str, kernel: KernelFn, supports: Optional[Supports] = None, *, exact: bool = True,
                     source: str = "user", lse: Optional[lse_kernels.LseFn] = None) -> None:
    """Add (or replace) a kernel. `supports(device, dtype, head_dim)` defaults to everything; `lse`
    is its form that also returns the log-sum-exp (ring attention runs only kernels that have one)."""
    _KERNELS[name] = Kernel(name, kernel, supports or (lambda device, dtype, head_dim: True), exact, source, lse)
    _auto_choice.clear()


def unregister_backend(name: str) -> None:
    _KERNELS.pop(name, None)
    _auto_choice.clear()


def available_backends() -> list[str]:
    return sorted(_KERNELS)


def kernel_info(name: str) -> Kernel:
    return _KERNELS[name]


def _capability(device: torch.device) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device)


def _half_on_cuda(device: torch.device, dtype: torch.dtype) -> bool:
    return device.type == "cuda" and dtype in (torch.float16, torch.bfloat16)


def generation(device: torch.device) -> str:
    if device.type != "cuda":
        return "other"
    major = _capability(device)[0]
    return "hopper_blackwell" if major >= 9 else "ampere_ada" if major == 8 else "other"


def _sdpa(q, k, v):
    # [B, S, H, D] -> [B, H, S, D] views; SDPA takes strided inputs.
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)


def _sdpa_pinned(backend):
    """SDPA restricted to one of PyTorch's implementations (for benchmarks and explicit choice)."""
    from torch.nn.attention import sdpa_kernel

    def kernel(q, k, v):
        with sdpa_kernel([backend]):
            return _sdpa(q, k, v)
    return kernel


def _register_sdpa() -> None:
    register_backend("sdpa", _sdpa, source="torch", lse=lse_kernels.sdpa_lse)
    try:
        from torch.nn.attention import SDPBackend
    except ImportError:  # older torch: plain sdpa only
        return
    half = lambda device, dtype, head_dim: _half_on_cuda(device, dtype)  # noqa: E731
    cuda = lambda device, dtype, head_dim: device.type == "cuda"  # noqa: E731
    lk = lse_kernels
    for name, member, supports, lse in (("sdpa_cudnn", "CUDNN_ATTENTION", half, lk.torch_cudnn_lse),
                                        ("sdpa_flash", "FLASH_ATTENTION", half, lk.torch_flash_lse),
                                        ("sdpa_efficient", "EFFICIENT_ATTENTION", cuda, lk.torch_efficient_lse),
                                        ("sdpa_math", "MATH", None, lk.math_lse)):
        if hasattr(SDPBackend, member):
            register_backend(name, _sdpa_pinned(getattr(SDPBackend, member)), supports, source="torch", lse=lse)


_OPAQUE_IMPLS: dict[str, KernelFn] = {}
_OPAQUE_OPS: dict[str, KernelFn] = {}


def _opaque(name: str, call: KernelFn) -> KernelFn:
    """`call` as a torch.library custom op: eager runs it as is; dynamo sees one node with a fake.

    The op is defined once per name (torch.library refuses a second definition); re-discovery
    only swaps the implementation it dispatches to.
    """
    _OPAQUE_IMPLS[name] = call
    if name not in _OPAQUE_OPS:
        def impl(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            return _OPAQUE_IMPLS[name](q, k, v).contiguous()

        op = torch.library.custom_op(f"lightx2v_sp::{name}", impl, mutates_args=())
        op.register_fake(lambda q, k, v: q.new_empty(q.shape))
        _OPAQUE_OPS[name] = op
    return _OPAQUE_OPS[name]


def _first(out):
    return out[0] if isinstance(out, tuple) else out


def _module_function(module: str, function: str):
    """`module.function` if both exist, else None (a namespace package has no function)."""
    try:
        mod = importlib.import_module(module)
    except Exception:  # noqa: BLE001 - absent, or a build that fails to import
        return None
    fn = getattr(mod, function, None)
    return fn if callable(fn) else None


def _flash_supports(majors: tuple[int, ...]) -> Supports:
    def supports(device, dtype, head_dim):
        return (_half_on_cuda(device, dtype) and _capability(device)[0] in majors
                and head_dim % 8 == 0 and head_dim <= 256)
    return supports


def _register_flash() -> None:
    found = []
    for name, module, majors in (("flash_attn4", "flash_attn.cute", (8, 9, 10, 11, 12)),
                                 ("flash_attn3", "flash_attn_interface", (9,)),
                                 ("flash_attn2", "flash_attn", (8, 9, 10, 11, 12))):
        fn = _module_function(module, "flash_attn_func")
        if fn is None:
            continue
        register_backend(name, _opaque(name, lambda q, k, v, fn=fn: _first(fn(q, k, v))), _flash_supports(majors),
                         source=module, lse=lse_kernels.flash_lse(fn))
        found.append(name)
    if found:
        def best(device, dtype, head_dim):
            return next((n for n in found if _KERNELS[n].supports(device, dtype, head_dim)), None)

        def flash(q, k, v):
            return _KERNELS[best(q.device, q.dtype, q.shape[-1])].fn(q, k, v)

        def flash_lse(q, k, v):
            return _KERNELS[best(q.device, q.dtype, q.shape[-1])].lse(q, k, v)

        every_lse = all(_KERNELS[n].lse is not None for n in found)
        register_backend("flash_attn", flash, lambda d, t, h: best(d, t, h) is not None, source="flash_attn",
                         lse=flash_lse if every_lse else None)


def _register_sage() -> None:
    fn = _module_function("sageattention", "sageattn")
    if fn is None:
        return
    register_backend("sage", _opaque("sage", lambda q, k, v: fn(q, k, v, tensor_layout="NHD", is_causal=False)),
                     lambda d, t, h: _half_on_cuda(d, t), exact=False, source="sageattention")


def discover() -> None:
    """(Re)build the registry from what is importable now (tests call it after faking packages)."""
    for name in [n for n, k in _KERNELS.items() if k.source != "user"]:
        unregister_backend(name)
    _register_sdpa()
    _register_flash()
    _register_sage()


def resolve_backend(name: str, device: torch.device | str, dtype: torch.dtype, head_dim: int = 128,
                    need_lse: bool = False) -> str:
    """The registered kernel that `name` runs as for such inputs (`auto` resolved), or a ValueError.

    `need_lse`: the kernel must also return its log-sum-exp (ring attention); `auto` then picks the
    first of its preference that does.
    """
    device = torch.device(device)
    if name == "auto":
        key = (device.type, device.index, dtype, head_dim, need_lse)
        choice = _auto_choice.get(key)
        if choice is None:
            order = AUTO_PREFERENCE[generation(device)]
            choice = next(n for n in order + ("sdpa",)
                          if n in _KERNELS and _KERNELS[n].exact and _KERNELS[n].supports(device, dtype, head_dim)
                          and (_KERNELS[n].lse is not None or not need_lse))
            _auto_choice[key] = choice
            logger.info("attention backend auto%s -> %s (%s; %s %s, head_dim %d)",
                        " (with log-sum-exp, for ring attention)" if need_lse else "", choice,
                        _KERNELS[choice].source, device, dtype, head_dim)
        return choice
    if name not in _KERNELS:
        hint = f"; {INSTALL_HINTS[name]}" if name in INSTALL_HINTS else ""
        raise ValueError(f"attention backend {name!r} is not available here (available: "
                         f"{['auto'] + available_backends()}){hint}")
    if not _KERNELS[name].supports(device, dtype, head_dim):
        raise ValueError(f"attention backend {name!r} cannot run {dtype} tensors with head_dim {head_dim} on "
                         f"{device}; use attention.backend=auto or sdpa")
    if need_lse:
        require_lse(name)
    return name


def require_lse(name: str) -> None:
    """ValueError when the kernel called `name` cannot return its log-sum-exp (`auto` always can)."""
    if name == "auto" or name not in _KERNELS or _KERNELS[name].lse is not None:
        return
    with_lse = [n for n in available_backends() if _KERNELS[n].lse is not None]
    raise ValueError(f"attention backend {name!r} does not return its log-sum-exp, which ring attention "
                     f"(parallel.ring_degree > 1) needs to merge blocks of keys; use attention.backend=auto or "
                     f"one of {with_lse}")


def auto_fallback(device: torch.device | str, dtype: torch.dtype, head_dim: int, failed: str,
                  need_lse: bool = False) -> str:
    """`auto`'s next choice after `failed` could not run (kernel_cache.prepare_kernel); from now on
    `auto` resolves to it for such inputs (and to the next one with a log-sum-exp, for a ring)."""
    device = torch.device(device)
    order = AUTO_PREFERENCE[generation(device)] + ("sdpa",)
    for lse in (False, True):
        _auto_choice[(device.type, device.index, dtype, head_dim, lse)] = next(
            n for n in order if n != failed and n in _KERNELS and _KERNELS[n].exact
            and _KERNELS[n].supports(device, dtype, head_dim) and (_KERNELS[n].lse is not None or not lse))
    return _auto_choice[(device.type, device.index, dtype, head_dim, need_lse)]


def get_backend(name: str, q: torch.Tensor) -> KernelFn:
    """The kernel called `name` (or the `auto` pick for tensors like `q`)."""
    return _KERNELS[resolve_backend(name, q.device, q.dtype, q.shape[-1])].fn


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """Full (non-causal) attention of one rank's tensors: [B, S, H, D] in, [B, S, H, D] out."""
    return get_backend(backend, q)(q, k, v)


def get_lse_backend(name: str, q: torch.Tensor) -> lse_kernels.LseFn:
    """The LSE form of the kernel called `name` (`auto`: the fastest exact kernel that has one)."""
    return _KERNELS[resolve_backend(name, q.device, q.dtype, q.shape[-1], need_lse=True)].lse


def attention_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str = "auto"):
    """(out [B, S_q, H, D], lse [B, H, S_q] fp32) of q against one block of keys k, v [B, S_k, H, D]."""
    return get_lse_backend(backend, q)(q, k, v)


enable_fa4_disk_cache()  # before discover() imports flash_attn.cute, which reads the setting once
discover()
