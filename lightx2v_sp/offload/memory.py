"""Peak device memory per pipeline stage, for the run's JSON summary (None where there is no CUDA).

    mem = StageMemory(device)
    with mem.stage("text"): ...
    with mem.stage("denoise"): ...
    summary["peak_memory"] = mem.as_dict()   # {"text": {"allocated_bytes": ..., "reserved_bytes": ...}, ...}
    summary["host_rss"] = mem.host_as_dict() # {"text": peak RSS bytes so far, ...}: on any device

The host figure is the process's peak resident set size (ru_maxrss) read at each stage's end. The
kernel keeps only a running maximum, so a stage's value is the peak of it and every stage before.
"""
from __future__ import annotations

import contextlib
import sys
from typing import Iterator, Optional

import torch


def _cuda(device: torch.device | str) -> Optional[torch.device]:
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    return device


def reset_peak_memory(device: torch.device | str) -> None:
    """Start a new peak window on `device` (no-op without CUDA)."""
    dev = _cuda(device)
    if dev is not None:
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)


def peak_memory_bytes(device: torch.device | str) -> Optional[int]:
    """Peak bytes allocated by tensors on `device` since the last reset; None without CUDA."""
    dev = _cuda(device)
    if dev is None:
        return None
    torch.cuda.synchronize(dev)
    return int(torch.cuda.max_memory_allocated(dev))


def peak_reserved_bytes(device: torch.device | str) -> Optional[int]:
    """Peak bytes held by the caching allocator (what nvidia-smi roughly sees); None without CUDA."""
    dev = _cuda(device)
    if dev is None:
        return None
    torch.cuda.synchronize(dev)
    return int(torch.cuda.max_memory_reserved(dev))


def host_peak_rss_bytes() -> Optional[int]:
    """Peak resident set size of this process so far, in bytes; None where the OS does not say."""
    try:
        import resource
    except ImportError:  # not POSIX
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024  # Linux reports KiB, macOS bytes


class StageMemory:
    """Peak allocated / reserved device memory of each named stage."""

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self.stages: dict[str, dict[str, Optional[int]]] = {}
        self.host_rss: dict[str, Optional[int]] = {}

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        reset_peak_memory(self.device)
        try:
            yield
        finally:
            self.stages[name] = {"allocated_bytes": peak_memory_bytes(self.device),
                                 "reserved_bytes": peak_reserved_bytes(self.device)}
            self.host_rss[name] = host_peak_rss_bytes()

    def as_dict(self) -> dict[str, dict[str, Optional[int]]]:
        return {name: dict(values) for name, values in self.stages.items()}

    def host_as_dict(self) -> dict[str, Optional[int]]:
        """Peak host RSS (bytes) of the process at the end of each stage: a running maximum."""
        return dict(self.host_rss)


def gib(nbytes: Optional[int]) -> Optional[float]:
    """Bytes as GiB rounded to 3 decimals; None stays None (for tables and JSON)."""
    return None if nbytes is None else round(nbytes / 2**30, 3)
