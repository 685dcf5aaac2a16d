"""ParallelDims: the parallel layout of a job and its named process groups.

Ranks are laid out as [cfg, ulysses] with Ulysses the inner (contiguous) axis, so one Ulysses
group sits on consecutive ranks: one node, one PCIe switch.
"""
from __future__ import annotations

import datetime

import torch.distributed as dist

from .groups import job_size_rank


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
    return ValueError(f"{num_heads} attention heads cannot be split over a Ulysses group of {group_size} "
                      f"(parallel.ulysses_degree={group_size}); layouts that work on {world_size} rank(s): "
                      f"{', '.join(valid_layouts(world_size, num_heads)) or 'none'}")


def resolve_ulysses_degree(world_size: int, ulysses_degree: int, cfg_degree: int) -> int:
    """`parallel.ulysses_degree` 0 means "auto": every rank that cfg_degree leaves over."""
    if ulysses_degree == 0:
        return max(1, world_size // cfg_degree)
    return ulysses_degree


def check_layout(world_size: int, ulysses_degree: int, cfg_degree: int, num_heads: int | None = None) -> None:
    """The layout fits the job (and the model's heads, when given): pure arithmetic, no collectives.

    The one place the layout is checked: preflight calls it before any collective, ParallelDims
    again when it builds the groups, and the heads once more wherever they are split.
    """
    if num_heads is not None and num_heads < 1:  # before the text stage: a broken config.json fails in seconds
        raise ValueError(f"the DiT's config.json gives num_heads={num_heads}; it must be a positive integer "
                         "(the checkpoint's config is broken)")
    for name, value in (("ulysses_degree", ulysses_degree), ("cfg_degree", cfg_degree)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"parallel.{name} must be a positive integer, got {value!r}")
    if cfg_degree not in (1, 2):
        raise ValueError(f"parallel.cfg_degree must be 1 or 2 (conditional + unconditional), got {cfg_degree}")
    if ulysses_degree * cfg_degree != world_size:
        hint = (f"; launch it with torchrun --nproc_per_node {ulysses_degree * cfg_degree}"
                if world_size == 1 else "")
        heads = f" and {num_heads} heads" if num_heads is not None else ""
        raise ValueError(
            f"ulysses_degree x cfg_degree = {ulysses_degree} x {cfg_degree} = {ulysses_degree * cfg_degree} "
            f"but the world size is {world_size}{hint}; the job cannot be laid out. Layouts that fit "
            f"{world_size} rank(s){heads}: {', '.join(valid_layouts(world_size, num_heads)) or 'none'}")
    if num_heads is not None and num_heads % ulysses_degree:
        raise heads_error(num_heads, ulysses_degree, world_size)


class ParallelDims:
    """Degrees of each parallel axis and the process groups that go with them.

    Must be built on every rank (group creation is collective) after `init_process_group`;
    without a process group it describes a single process. `timeout_s` bounds every collective on
    the new groups (None: torch's default, 30 minutes); without it a hung peer in the Ulysses or
    CFG group hangs the job for that long, whatever the world group's timeout.
    """

    def __init__(self, ulysses_degree: int = 1, cfg_degree: int = 1, timeout_s: float | None = None):
        self.world_size, self.rank = job_size_rank()
        ulysses_degree = resolve_ulysses_degree(self.world_size, ulysses_degree, cfg_degree)
        check_layout(self.world_size, ulysses_degree, cfg_degree)
        self.ulysses_degree = ulysses_degree
        self.cfg_degree = cfg_degree
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

    @property
    def sp_size(self) -> int:
        return self.ulysses_degree

    @property
    def cfg_size(self) -> int:
        return self.cfg_degree

    def check_heads(self, num_heads: int) -> None:
        """Ulysses splits heads over the group: they must divide evenly."""
        if num_heads % self.sp_size:
            raise heads_error(num_heads, self.sp_size, self.world_size)

    def __repr__(self) -> str:
        return (f"ParallelDims(world={self.world_size}, rank={self.rank}, cfg={self.cfg_degree}, "
                f"ulysses={self.ulysses_degree}, cfg_rank={self.cfg_rank}, sp_rank={self.sp_rank})")
