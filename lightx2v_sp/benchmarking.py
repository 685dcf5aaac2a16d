"""Timing for the bench_*.py scripts: warm up, then the median of device-event (or host) timings."""
from __future__ import annotations

import statistics
import time
from typing import Callable

import torch


def time_once(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds one call takes on `device`: CUDA events around it, else the host clock."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def median_seconds(fn: Callable[[], object], device: torch.device, warmup: int = 3, iters: int = 20) -> float:
    for _ in range(warmup):
        fn()
    return statistics.median(time_once(fn, device) for _ in range(iters))
