"""Where lightx2v_sp keeps what it builds once and reuses: the embedded tiny model, compiled kernels.

$LIGHTX2V_SP_CACHE, else ~/.cache/lightx2v_sp.
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
