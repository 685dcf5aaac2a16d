"""FlashAttention-4's compiled kernels: kept on disk across processes, made ready before step 1.

FA4 (`flash_attn.cute`) compiles every kernel variant with the CuTe DSL on its first call, in every
process: seconds that each run paid again. It has a persistent cache, off by default upstream:
with FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED=1 each compiled kernel is exported as an object file
into FLASH_ATTENTION_CUTE_DSL_CACHE_DIR (under a fingerprint of FA4's sources and the CUTLASS DSL,
tvm-ffi and Python versions; the GPU architecture is in each kernel's key), and a later process
loads it instead of compiling. Both variables are read once, when `flash_attn.cute` is imported, so
`enable_fa4_disk_cache()` sets them before backends.py imports it: the directory is
`<cache>/kernels/flash_attn_cute` (cache_dir.py), unless the user set either variable
(ENABLED=0 keeps it off) or the directory is not writable.

`prepare_kernel()` runs in the loader thread (pipeline/prefetch.py, during the text stage): it calls
the run's kernel once per attention shape of the run, so the compilation (first process) or the
load from disk (later ones) happens there rather than in the first denoise step, and compares the
result with SDPA on the same inputs. A kernel that fails or disagrees (FA4's issue 2566 reports
cached kernels that fail to launch in another process) is an error when it was asked for by name,
and under `auto` the next kernel of the preference takes its place, with a warning.
"""
from __future__ import annotations

import importlib.util
import logging
import os
import sys
import time
from typing import Optional, Sequence

import torch

from lightx2v_sp.cache_dir import cache_root, writable_dir

log = logging.getLogger("lightx2v_sp")

FA4_ENABLED = "FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED"
FA4_DIR = "FLASH_ATTENTION_CUTE_DSL_CACHE_DIR"
FA4_MODULE = "flash_attn.cute"
# kernels compiled inside the process on first use (the `flash_attn` alias may resolve to FA4)
JIT_KERNELS = ("flash_attn4", "flash_attn")
# bf16 kernels against SDPA on random inputs agree to ~3e-3 relative L2 (BENCHMARKS.md, FA4 vs cuDNN)
MAX_REL_ERROR = 2e-2


def fa4_cache_dir() -> str:
    return os.environ.get(FA4_DIR) or os.path.join(cache_root(), "kernels", "flash_attn_cute")


def enable_fa4_disk_cache() -> Optional[str]:
    """Turn FA4's persistent kernel cache on (before `flash_attn.cute` is imported); the directory,
    or None when it stays off (FA4 is not installed, the user said so, it is too late, or the directory is
    not writable)."""
    if os.environ.get(FA4_ENABLED, "1") != "1" or FA4_MODULE in sys.modules:
        return None
    if importlib.util.find_spec("flash_attn") is None:  # not installed (CPU, CI): nothing to cache
        return None
    path = fa4_cache_dir()
    if not writable_dir(path):
        return None
    os.environ[FA4_ENABLED] = "1"
    os.environ[FA4_DIR] = path
    return path


def _cached_files() -> int:
    path = fa4_cache_dir()
    return sum(len([f for f in files if f.endswith(".o")]) for _, _, files in os.walk(path)) \
        if os.environ.get(FA4_ENABLED) == "1" and os.path.isdir(path) else 0


def _check_once(fn, reference, sq: int, sk: int, head_dim: int, device, dtype) -> float:
    """Relative L2 distance of `fn` from `reference` on one head of [1, sq | sk, 1, head_dim] inputs."""
    gen = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(1, sq, 1, head_dim, device=device, dtype=dtype, generator=gen)
    k = torch.randn(1, sk, 1, head_dim, device=device, dtype=dtype, generator=gen)
    v = torch.randn(1, sk, 1, head_dim, device=device, dtype=dtype, generator=gen)
    try:
        out = fn(q, k, v)
    except Exception as e:  # noqa: BLE001
        # FA4 keeps a kernel in memory before it exports it to disk: when only the export failed, the
        # second call runs it (and this process keeps it; later processes compile again)
        out = fn(q, k, v)
        log.warning("warning: the attention kernel ran on its second call; its first failed (%s: %s), "
                    "likely writing FlashAttention-4's disk cache %s", type(e).__name__, e, fa4_cache_dir())
    out, ref = out.float(), reference(q, k, v).float()
    return float((out - ref).norm() / ref.norm().clamp_min(1e-12)) if bool(torch.isfinite(out).all()) else float("inf")


def prepare_kernel(name: str, requested: str, device: torch.device, dtype: torch.dtype, head_dim: int,
                   shapes: Sequence[tuple[int, int]], need_lse: bool = False) -> str:
    """The kernel the run will use: `name`, compiled and checked on every (query, key) sequence length
    in `shapes`; under `auto`, the next kernel when it fails (one with a log-sum-exp when `need_lse`:
    ring attention). Nothing to do for kernels without JIT.

    One head: the compile key of a dense non-causal FA4 call holds the dtype, the head dim and the
    sequence lengths' tiling choices, not the head count, so one head compiles the run's kernels.
    """
    from .backends import auto_fallback, kernel_info

    if name not in JIT_KERNELS:  # (these run on CUDA only; tests register stand-ins on the CPU)
        return name
    start, before = time.perf_counter(), _cached_files()
    try:
        errors = [_check_once(kernel_info(name).fn, kernel_info("sdpa").fn, sq, sk, head_dim, device, dtype)
                  for sq, sk in shapes]
        worst = max(errors, default=0.0)
        if not worst <= MAX_REL_ERROR:
            raise RuntimeError(f"its output differs from SDPA's by {worst:.3g} (relative L2; expected "
                               f"<= {MAX_REL_ERROR})")
    except Exception as e:  # noqa: BLE001 - a kernel that cannot run here: fall back or say so
        why = f"attention backend {name} failed its first call on {device} ({type(e).__name__}: {e})"
        if requested != "auto":
            raise ValueError(f"{why}; use attention.backend=auto or sdpa (FlashAttention-4's kernel cache is "
                             f"{fa4_cache_dir()}: removing it forces a fresh compilation)") from None
        fallback = auto_fallback(device, dtype, head_dim, failed=name, need_lse=need_lse)
        log.warning("warning: %s; auto uses %s instead", why, fallback)
        return fallback
    new = _cached_files() - before
    where = (f"compiled {new} kernel(s), kept in {fa4_cache_dir()} for later runs" if new > 0 else
             f"from the kernel cache {fa4_cache_dir()}" if os.environ.get(FA4_ENABLED) == "1" else
             "compiled; no disk cache (FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED is not 1), later runs compile again")
    log.info("attention kernel %s ready in %.2fs (%s)", name, time.perf_counter() - start, where)
    return name


def attention_shapes(num_tokens: int, ulysses: int, text_len: int) -> list[tuple[int, int]]:
    """(query, key) sequence lengths of the run's attention calls on one rank: self-attention sees the
    whole sequence (Ulysses splits heads), cross-attention this rank's tokens against the text."""
    local = -(-num_tokens // max(1, ulysses))
    return [(num_tokens, num_tokens), (local, text_len)]
