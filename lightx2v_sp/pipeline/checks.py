"""User-error checks that every rank agrees on, so a bad input never leaves ranks disagreeing.

`agreed(stage, fn)` runs `fn` on every rank, then exchanges the outcome (one small all_gather of
error strings): if any rank failed, every rank raises the same `AgreedError` naming the first
failing rank, and rank 0 prints it. Ranks may disagree for real reasons (a model directory that
exists on one node only, an output directory only rank 0 writes), and a rank that raised alone
would leave the others waiting in their next collective.
"""
from __future__ import annotations

import pickle
import traceback
from typing import Callable, TypeVar

import torch.distributed as dist

from lightx2v_sp.distributed.comm_stats import record_comm
from lightx2v_sp.distributed.groups import job_size_rank
from lightx2v_sp.distributed.peer_lost import is_peer_lost

T = TypeVar("T")


class AgreedError(ValueError):
    """An error known to every rank (printed once, by rank 0).

    `internal` is False for user errors (a ValueError on some rank) and True for failures such as
    an out-of-memory or an I/O error, which the failing rank also printed with its traceback.
    """

    def __init__(self, message: str, internal: bool = False):
        super().__init__(message)
        self.internal = internal


def all_gather_objects(value, world: int) -> list:
    """`value` of every rank, on every rank (small picklable control messages only)."""
    if world == 1:
        return [value]
    out: list = [None] * world
    # one small object per rank -> all_gather_object -> the list of all of them on every rank
    dist.all_gather_object(out, value)
    record_comm("all_gather_object", len(pickle.dumps(value)) * (world - 1))
    return out


def agreed(stage: str, fn: Callable[[], T]) -> T:
    world, rank = job_size_rank()
    result, error = None, None
    try:
        result = fn()
    except ValueError as e:
        error = (str(e), False)
    except Exception as e:  # noqa: BLE001 - reported on every rank instead of hanging the others
        if is_peer_lost(e):  # nobody left to agree with: exchanging would wait out another timeout
            raise
        traceback.print_exc()
        error = (f"{stage} failed on rank {rank}: {type(e).__name__}: {e}", True)
    for r, e in enumerate(all_gather_objects(error, world)):
        if e is not None:
            message, internal = e
            where = f" (on rank {r})" if r != 0 and f"on rank {r}:" not in message else ""
            raise AgreedError(message + where, internal)
    return result
