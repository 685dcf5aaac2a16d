"""Copy checkpoint tensors into allocated weights, several at a time.

A memory-mapped checkpoint tensor is pageable host memory: copying it anywhere, to a GPU (through the
driver's staging buffer) or into host memory, runs at the speed of one CPU thread doing memcpy and
taking the page faults, well below what the PCIe link or the memory system can carry. So the copies
are dealt out to a few threads (torch releases the GIL while copying), biggest tensors first, in turn.

On CUDA each thread copies on its own stream (copies queued on one stream would run one after
another). The destinations belong to the caller's stream: it is synchronised first, so no earlier
kernel still uses their memory, and every thread synchronises its stream before it returns, so the
weights are complete for any stream when `copy_all` returns. Grad mode is per thread: the copies run
under no_grad (the destinations are usually parameters).
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Sequence

import torch

# a few readers: enough to overlap page faults and memcpy, not a thread per core; the variable is for A/B runs
WORKERS = max(1, int(os.environ.get("LIGHTX2V_SP_READ_THREADS", "4")))

MIN_PARALLEL_BYTES = 64 << 20  # below this (test models) starting threads costs more than it saves
Job = tuple[torch.Tensor, Callable[[], torch.Tensor]]  # (destination, read the source)


def _copy(jobs: Sequence[Job]) -> None:
    with torch.no_grad():
        for dst, read in jobs:
            dst.copy_(read())


def copy_all(jobs: Sequence[Job], workers: int | None = None) -> None:
    """`dst.copy_(read())` for every job; `workers` (default WORKERS) threads when there are several jobs."""
    if not jobs:
        return
    device = jobs[0][0].device
    workers = min(WORKERS if workers is None else workers, len(jobs))
    if workers <= 1 or sum(dst.numel() * dst.element_size() for dst, _ in jobs) < MIN_PARALLEL_BYTES:
        _copy(jobs)
        return
    order = sorted(jobs, key=lambda job: job[0].numel() * job[0].element_size(), reverse=True)
    shares = [order[w::workers] for w in range(workers)]
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.current_stream(device).synchronize()

    def work(share: Sequence[Job]) -> None:
        if not cuda:
            _copy(share)
            return
        torch.cuda.set_device(device)
        stream = torch.cuda.Stream(device)
        with torch.cuda.stream(stream):
            _copy(share)
        stream.synchronize()

    with ThreadPoolExecutor(workers, thread_name_prefix="lightx2v_sp-copy") as pool:
        for done in [pool.submit(work, share) for share in shares]:
            done.result()  # a read error (a truncated file) is raised here, in the caller's thread
