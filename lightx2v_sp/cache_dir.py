"""Where lightx2v_sp keeps what it builds once and reuses: the embedded tiny model, compiled kernels.

$LIGHTX2V_SP_CACHE, else ~/.cache/lightx2v_sp: tiny-*/ (the tiny models), kernels/flash_attn_cute/
(FlashAttention-4, attention/kernel_cache.py) and inductor/ (model.compile). Deleting it is safe.
"""
from __future__ import annotations

import os


def cache_root() -> str:
    return os.environ.get("LIGHTX2V_SP_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "lightx2v_sp")


def writable_dir(path: str) -> bool:
    """Create `path` if needed; whether this process can write there."""
    try:
        os.makedirs(path, exist_ok=True)
    except OSError:
        return False
    return os.access(path, os.W_OK | os.X_OK)


def enable_compile_cache() -> str:
    """model.compile's caches under <cache>/inductor unless TORCHINDUCTOR_CACHE_DIR is set.

    Inductor's FX graph cache and AOTAutograd cache are on by default and persist across processes
    (a later run skips lowering and code generation, Triton kernels included), but in /tmp by default,
    which a reboot or a tmp cleaner empties. Returns the directory in use."""
    path = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if path is None:
        path = os.path.join(cache_root(), "inductor")
        if not writable_dir(path):
            return "inductor's default (the cache directory is not writable)"
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = path
    return path
