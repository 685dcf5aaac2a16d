"""ParallelDims: the parallel layout of a job and its named process groups.

Ranks are laid out as [cfg, ulysses] with Ulysses the inner (contiguous) axis, so one Ulysses
group sits on consecutive ranks: one node, one PCIe switch.
"""
from __future__ import annotations

import datetime

import torch.distributed as dist


def valid_layouts(world_size: int, num_heads: int | None = None) -> list[str]:
    """Layouts `cfg x ulysses` that fit `world_size` (and divide `num_heads`, when given)."""
    out = []
    for cfg in (1, 2):
        if world_size % cfg:
            continue
        uly = world_size // cfg
        if num_heads is None or num_heads % uly == 0:
            out.append(f"cfg_degree={cfg} x ulysses_degree={uly}")
    return out


def heads_error(num_heads: int, group_size: int, world_size: int) -> ValueError:
    """The error for heads that a Ulysses group of `group_size` cannot split evenly."""
    return ValueError(f"{num_heads} attention heads cannot be split over a Ulysses group of {group_size}; "
                      f"layouts that work on {world_size} ranks: "
                      f"{', '.join(valid_layouts(world_size, num_heads)) or 'none'}")


class ParallelDims:
    """Degrees of each parallel axis and the process groups that go with them.

    Must be built on every rank (group creation is collective) after `init_process_group`;
    without a process group it describes a single process. `timeout_s` bounds every collective on
    the new groups (None: torch's default, 30 minutes); without it a hung peer in the Ulysses or
    CFG group hangs the job for that long, whatever the world group's timeout.
    """

    def __init__(self, ulysses_degree: int = 1, cfg_degree: int = 1, timeout_s: float | None = None):
        initialized = dist.is_available() and dist.is_initialized()
        self.world_size = dist.get_world_size() if initialized else 1
        self.rank = dist.get_rank() if initialized else 0
        for name, value in (("ulysses_degree", ulysses_degree), ("cfg_degree", cfg_degree)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if cfg_degree not in (1, 2):
            raise ValueError(f"cfg_degree must be 1 or 2 (conditional + unconditional), got {cfg_degree}")
        if ulysses_degree * cfg_degree != self.world_size:
            raise ValueError(
                f"ulysses_degree x cfg_degree = {ulysses_degree} x {cfg_degree} = {ulysses_degree * cfg_degree} "
                f"but the world size is {self.world_size}; the job cannot be laid out. "
                f"Layouts that fit: {', '.join(valid_layouts(self.world_size))}")
        self.ulysses_degree = ulysses_degree
        self.cfg_degree = cfg_degree
        self.sp_size = ulysses_degree
        self.cfg_size = cfg_degree
        self.cfg_rank, self.sp_rank = divmod(self.rank, ulysses_degree)
        self.world_group = dist.group.WORLD if self.world_size > 1 else None
        self.sp_group = None
        self.cfg_group = None
        self.sp_ranks = [self.rank]
        self.cfg_ranks = [self.rank]
        if self.world_size == 1:
            return
        timeout = None if timeout_s is None else datetime.timedelta(seconds=timeout_s)
        # new_group is collective over the world: every rank creates every group, keeps its own.
        for c in range(cfg_degree):
            ranks = list(range(c * ulysses_degree, (c + 1) * ulysses_degree))
            group = dist.new_group(ranks, timeout=timeout) if ulysses_degree > 1 else None
            if c == self.cfg_rank:
                self.sp_group = group
                self.sp_ranks = ranks
        for s in range(ulysses_degree):
            ranks = [c * ulysses_degree + s for c in range(cfg_degree)]
            group = dist.new_group(ranks, timeout=timeout) if cfg_degree > 1 else None
            if s == self.sp_rank:
                self.cfg_group = group
                self.cfg_ranks = ranks

    def check_heads(self, num_heads: int) -> None:
        """Ulysses splits heads over the group: they must divide evenly."""
        if num_heads % self.sp_size:
            raise heads_error(num_heads, self.sp_size, self.world_size)

    def __repr__(self) -> str:
        return (f"ParallelDims(world={self.world_size}, rank={self.rank}, cfg={self.cfg_degree}, "
                f"ulysses={self.ulysses_degree}, cfg_rank={self.cfg_rank}, sp_rank={self.sp_rank})")
