"""One convention for process groups across the package.

`group=None` means no group: this process alone (size 1, rank 0), in every function that takes
a group. The whole job is `ParallelDims.world_group`, which is None only in a one-process job,
so passing `dims.sp_group` (None at ulysses 1) can never widen a collective to every rank.
"""
from __future__ import annotations

import torch.distributed as dist


def initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def group_size_rank(group) -> tuple[int, int]:
    """(size, this rank's index) in `group`; (1, 0) for None."""
    if group is None:
        return 1, 0
    return dist.get_world_size(group), dist.get_rank(group)


def job_size_rank() -> tuple[int, int]:
    """(world size, rank) of the whole job; (1, 0) when no process group was started."""
    if not initialized():
        return 1, 0
    return dist.get_world_size(), dist.get_rank()


def job_group():
    """The default group of a multi-process job, else None (this process alone)."""
    return dist.group.WORLD if job_size_rank()[0] > 1 else None
