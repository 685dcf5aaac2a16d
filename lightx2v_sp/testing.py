"""Run a function on N gloo ranks on CPU: the multi-rank test and benchmark harness.

Each rank is a spawned process that joins a fresh process group on a free local port. Results
travel back serialized (torch.save), so tensors are fine. A rank that raises fails the call with
its traceback and the other ranks are killed; a hang ends at `timeout` seconds.
"""
from __future__ import annotations

import datetime
import io
import multiprocessing as mp
import os
import queue as queue_mod
import socket
import time
import traceback
from typing import Any, Callable

import torch


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, timeout: float, fn: Callable, args: tuple, results) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=timeout))
        value = fn(rank, world_size, *args)
        buf = io.BytesIO()
        torch.save(value, buf)
        results.put((rank, True, buf.getvalue()))
    except BaseException:  # noqa: BLE001 - every failure must reach the parent, not hang it
        results.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_on_ranks(fn: Callable, world_size: int, *args: Any, timeout: float = 120.0) -> list[Any]:
    """`fn(rank, world_size, *args)` on `world_size` gloo ranks; the per-rank return values."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, world_size, port, timeout, fn, args, results), daemon=True)
             for r in range(world_size)]
    for p in procs:
        p.start()
    out: dict[int, Any] = {}
    deadline = time.monotonic() + timeout + 30  # spawn + import time on top of the collective timeout
    try:
        while len(out) < world_size:
            try:
                rank, ok, payload = results.get(timeout=max(0.1, min(1.0, deadline - time.monotonic())))
            except queue_mod.Empty:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"run_on_ranks: {world_size - len(out)} of {world_size} ranks did not "
                                       f"finish in {timeout:.0f}s (ranks done: {sorted(out)})") from None
                dead = [i for i, p in enumerate(procs) if p.exitcode not in (None, 0) and i not in out]
                if dead:
                    raise RuntimeError(f"run_on_ranks: rank(s) {dead} died with exit code "
                                       f"{[procs[i].exitcode for i in dead]} before reporting")
                continue
            if not ok:
                raise RuntimeError(f"run_on_ranks: rank {rank} of {world_size} failed:\n{payload}")
            out[rank] = torch.load(io.BytesIO(payload), weights_only=False)
    finally:
        for p in procs:
            p.join(timeout=5 if len(out) == world_size else 0.1)
            if p.is_alive():
                p.kill()
                p.join()
    return [out[r] for r in range(world_size)]
