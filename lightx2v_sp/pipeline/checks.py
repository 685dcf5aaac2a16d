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

from lightx2v_sp.distributed import valid_layouts
from lightx2v_sp.distributed.comm_stats import record_comm
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


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


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
    world, rank = _world()
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


def resolve_ulysses_degree(world_size: int, ulysses_degree: int, cfg_degree: int) -> int:
    """`parallel.ulysses_degree` 0 means "auto": every rank that cfg_degree leaves over."""
    if ulysses_degree == 0:
        return max(1, world_size // cfg_degree)
    return ulysses_degree


def check_layout(world_size: int, ulysses_degree: int, cfg_degree: int, num_heads: int) -> None:
    """The parallel layout fits the job and the model (pure arithmetic: no collectives)."""
    if num_heads < 1:  # before the text stage: a broken config.json fails in seconds
        raise ValueError(f"the DiT's config.json gives num_heads={num_heads}; it must be a positive integer "
                         "(the checkpoint's config is broken)")
    if ulysses_degree * cfg_degree != world_size:
        hint = ("; launch it with torchrun --nproc_per_node "
                f"{ulysses_degree * cfg_degree}" if world_size == 1 else "")
        raise ValueError(
            f"parallel.ulysses_degree x parallel.cfg_degree = {ulysses_degree} x {cfg_degree} = "
            f"{ulysses_degree * cfg_degree}, but the job has {world_size} rank(s){hint}. "
            f"Layouts that fit {world_size} rank(s) and {num_heads} heads: "
            f"{', '.join(valid_layouts(world_size, num_heads)) or 'none'}")
    if num_heads % ulysses_degree:
        raise ValueError(
            f"the DiT's {num_heads} attention heads cannot be split over parallel.ulysses_degree={ulysses_degree}; "
            f"layouts that work on {world_size} rank(s): "
            f"{', '.join(valid_layouts(world_size, num_heads)) or 'none'}")
