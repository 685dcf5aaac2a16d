"""Stages where the other ranks wait on rank 0 alone, without a collective timeout.

Waiting for a slow stage and detecting a dead peer are different things. A collective (barrier,
all_gather_object) started by ranks that wait for rank 0's decode and write times out after
`comm.timeout_s`, so that timeout would bound how long rank 0 may work: a healthy job with a big
video fails. `rank0_stage` instead lets rank 0 run the stage while a thread bumps a heartbeat
counter in the job's key-value store (the c10d store: torchrun's agent or rank 0 hosts it) once
a second; the other ranks poll the store and give up only when the counter has not moved for
`comm.timeout_s` (rank 0 stopped, dead, or hung with its interpreter frozen). Rank 0 then posts
its outcome (None or the error) under one key; every rank raises the same `AgreedError` for an
error, so the job still fails together with one `error:` line.
"""
from __future__ import annotations

import contextlib
import itertools
import pickle
import threading
import time
import traceback
from typing import Callable, Optional, TypeVar

import torch.distributed as dist

from lightx2v_sp.distributed.groups import job_size_rank
from lightx2v_sp.distributed.peer_lost import PeerLostError

from .checks import AgreedError, agreed

T = TypeVar("T")

HEARTBEAT_S = 1.0   # rank 0 bumps the counter this often (more often for timeouts under 5 s)
POLL_S = 0.2        # the others look this often
_stage_ids = itertools.count()  # every rank calls rank0_stage in the same order: same keys


def _outcome_of(stage: str, fn: Callable[[], T]) -> tuple[Optional[T], Optional[tuple[str, bool]]]:
    try:
        return fn(), None
    except ValueError as e:
        return None, (str(e), False)
    except Exception as e:  # noqa: BLE001 - reported on every rank instead of leaving them waiting
        traceback.print_exc()
        return None, (f"{stage} failed on rank 0: {type(e).__name__}: {e}", True)


def rank0_stage(stage: str, fn: Callable[[], T], timeout_s: float) -> Optional[T]:
    """Run `fn` on rank 0 only; the others wait for its outcome as long as rank 0 is alive.

    Returns fn's result on rank 0 and None elsewhere. A ValueError (or any failure) of `fn` is
    raised as the same `AgreedError` on every rank. A waiting rank raises `PeerLostError` when
    rank 0's heartbeat has not moved for `timeout_s` seconds.
    """
    world, rank = job_size_rank()
    if world == 1:
        return agreed(stage, fn)
    store = dist.PrefixStore(f"lightx2v_sp/rank0_stage/{next(_stage_ids)}/",
                             dist.distributed_c10d._get_default_store())
    if rank == 0:
        return _run_on_rank0(stage, fn, store, world - 1, timeout_s)
    return _wait_for_rank0(stage, store, timeout_s)


def _await_acks(store, waiters: int, timeout_s: float) -> None:
    """Until every waiter has read the outcome (at most `timeout_s`): when rank 0's process hosts the
    store (plain env:// init, not torchrun), exiting at once could take the store away unread."""
    deadline = time.monotonic() + timeout_s
    try:
        while store.add("acks", 0) < waiters and time.monotonic() < deadline:
            time.sleep(POLL_S / 4)
    except Exception:  # noqa: BLE001 - no store, nobody to wait for
        return


def heartbeat_interval(timeout_s: float) -> float:
    """Several beats per timeout, so a loaded but alive rank 0 is never mistaken for a dead one."""
    return min(HEARTBEAT_S, timeout_s / 5)


def _run_on_rank0(stage: str, fn: Callable[[], T], store, waiters: int, timeout_s: float) -> Optional[T]:
    stop = threading.Event()
    interval = heartbeat_interval(timeout_s)

    def beat():
        while not stop.wait(interval):
            try:
                store.add("heartbeat", 1)
            except Exception:  # noqa: BLE001 - the store is gone: the waiters will notice
                return

    thread = threading.Thread(target=beat, name="lightx2v_sp-heartbeat", daemon=True)
    thread.start()
    try:
        result, error = _outcome_of(stage, fn)
    except BaseException as e:  # SIGINT / SIGTERM: tell the waiters now instead of after the timeout
        with contextlib.suppress(Exception):
            store.set("outcome", pickle.dumps((f"{stage} was interrupted on rank 0 ({type(e).__name__})", True)))
        raise
    finally:
        stop.set()
        thread.join()
    store.set("outcome", pickle.dumps(error))
    _await_acks(store, waiters, timeout_s)
    if error is not None:
        raise AgreedError(*error)
    return result


def _wait_for_rank0(stage: str, store, timeout_s: float) -> None:
    beats, moved = -1, time.monotonic()
    while True:
        try:
            if store.check(["outcome"]):
                error = pickle.loads(store.get("outcome"))
                store.add("acks", 1)
                if error is not None:
                    message, internal = error
                    raise AgreedError(message, internal)
                return None
            now_beats = store.add("heartbeat", 0)
        except AgreedError:
            raise
        except Exception as e:  # noqa: BLE001 - a store that went away with rank 0
            raise PeerLostError(f"lost contact with rank 0 during '{stage}' ({type(e).__name__}: "
                                f"{str(e).splitlines()[0] if str(e) else ''}); rank 0 is dead") from None
        now = time.monotonic()
        if now_beats != beats:
            beats, moved = now_beats, now
        elif now - moved > timeout_s:
            raise PeerLostError(f"rank 0 sent no heartbeat for {now - moved:.0f}s during '{stage}' "
                                f"(comm.timeout_s={timeout_s:g}): it is stopped, hung or dead")
        time.sleep(POLL_S)
