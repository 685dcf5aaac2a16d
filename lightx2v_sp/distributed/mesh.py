"""ParallelDims: the parallel layout of a job and its named process groups.

Ranks are laid out as [cfg, ring, ulysses] with Ulysses the inner (contiguous) axis, so one
Ulysses group sits on consecutive ranks (one node, one PCIe switch), and a ring group takes one
rank of each of `ring_degree` Ulysses groups: the ring crosses the slower links, where it sends to
one neighbour at a time. The sequence group (ring x ulysses ranks of one CFG branch) splits the
tokens; CFG is outermost, so on two nodes with cfg 2 only its one exchange per step crosses them.
"""
from __future__ import annotations

import datetime

import torch.distributed as dist

from .groups import job_size_rank


def _fmt(cfg: int, uly: int, ring: int) -> str:
    return f"cfg_degree={cfg} x ulysses_degree={uly}" + (f" x ring_degree={ring}" if ring > 1 else "")


def valid_layouts(world_size: int, num_heads: int | None = None) -> list[str]:
    """Layouts `cfg x ulysses [x ring]` that fit `world_size` (Ulysses dividing `num_heads`, when given).

    Per cfg degree the largest Ulysses degree that fits, the ring taking the rest; layouts without
    a ring first (they need no log-sum-exp merge).
    """
    out = []
    for cfg in (1, 2):
        if world_size % cfg:
            continue
        seq = world_size // cfg
        uly = max(u for u in range(1, seq + 1) if seq % u == 0 and (num_heads is None or num_heads % u == 0))
        out.append((seq // uly, cfg, uly))
    return [_fmt(cfg, uly, ring) for ring, cfg, uly in sorted(out)]


def heads_error(num_heads: int, group_size: int, world_size: int) -> ValueError:
    """The error for heads that a Ulysses group of `group_size` cannot split evenly."""
    return ValueError(f"{num_heads} attention heads cannot be split over a Ulysses group of {group_size} "
                      f"(parallel.ulysses_degree={group_size}); layouts that work on {world_size} rank(s): "
                      f"{', '.join(valid_layouts(world_size, num_heads)) or 'none'}")


def resolve_ulysses_degree(world_size: int, ulysses_degree: int, cfg_degree: int, ring_degree: int = 1) -> int:
    """`parallel.ulysses_degree` 0 means "auto": every rank that cfg_degree and ring_degree leave over."""
    if ulysses_degree == 0:
        return max(1, world_size // (cfg_degree * max(1, ring_degree)))
    return ulysses_degree


def check_layout(world_size: int, ulysses_degree: int, cfg_degree: int, num_heads: int | None = None,
                 ring_degree: int = 1) -> None:
    """The layout fits the job (and the model's heads, when given): pure arithmetic, no collectives.

    The one place the layout is checked: preflight calls it before any collective, ParallelDims
    again when it builds the groups, and the heads once more wherever they are split.
    """
    if num_heads is not None and num_heads < 1:  # before the text stage: a broken config.json fails in seconds
        raise ValueError(f"the DiT's config.json gives num_heads={num_heads}; it must be a positive integer "
                         "(the checkpoint's config is broken)")
    for name, value in (("ulysses_degree", ulysses_degree), ("cfg_degree", cfg_degree), ("ring_degree", ring_degree)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"parallel.{name} must be a positive integer, got {value!r}")
    if cfg_degree not in (1, 2):
        raise ValueError(f"parallel.cfg_degree must be 1 or 2 (conditional + unconditional), got {cfg_degree}")
    product = ulysses_degree * cfg_degree * ring_degree
    if product != world_size:
        hint = f"; launch it with torchrun --nproc_per_node {product}" if world_size == 1 else ""
        heads = f" and {num_heads} heads" if num_heads is not None else ""
        names, values = "ulysses_degree x cfg_degree", f"{ulysses_degree} x {cfg_degree}"
        if ring_degree > 1:
            names, values = names + " x ring_degree", values + f" x {ring_degree}"
        fit = ", ".join(valid_layouts(world_size, num_heads)) or "none"
        raise ValueError(f"{names} = {values} = {product} but the world size is {world_size}{hint}; the job cannot be "
                         f"laid out. Layouts that fit {world_size} rank(s){heads}: {fit}")
    if num_heads is not None and num_heads % ulysses_degree:
        raise heads_error(num_heads, ulysses_degree, world_size)


def group_ranks(cfg_degree: int, ring_degree: int, ulysses_degree: int) -> dict[str, list[list[int]]]:
    """Every group of the layout as lists of global ranks: rank = (c * ring + r) * ulysses + u.

    ulysses: consecutive ranks; ring: one rank of each Ulysses group of a CFG branch (same u);
    sequence: the ring x ulysses ranks of one CFG branch (consecutive); cfg: the same place in each
    branch.
    """
    seq = ring_degree * ulysses_degree
    return {
        "ulysses": [[(c * ring_degree + r) * ulysses_degree + u for u in range(ulysses_degree)]
                    for c in range(cfg_degree) for r in range(ring_degree)],
        "ring": [[(c * ring_degree + r) * ulysses_degree + u for r in range(ring_degree)]
                 for c in range(cfg_degree) for u in range(ulysses_degree)],
        "sequence": [list(range(c * seq, (c + 1) * seq)) for c in range(cfg_degree)],
        "cfg": [[c * seq + s for c in range(cfg_degree)] for s in range(seq)],
    }


class ParallelDims:
    """Degrees of each parallel axis and the process groups that go with them.

    Must be built on every rank (group creation is collective) after `init_process_group`;
    without a process group it describes a single process. `timeout_s` bounds every collective on
    the new groups (None: torch's default, 30 minutes); without it a hung peer in the Ulysses or
    CFG group hangs the job for that long, whatever the world group's timeout.

    Groups (None where the axis has one rank): `ulysses_group` (the all-to-all), `ring_group` (the
    K/V ring), `sp_group` (the sequence group: tokens are split and gathered over it; the Ulysses
    group itself when ring_degree is 1), `cfg_group`.
    """

    def __init__(self, ulysses_degree: int = 1, cfg_degree: int = 1, timeout_s: float | None = None,
                 ring_degree: int = 1):
        self.world_size, self.rank = job_size_rank()
        ulysses_degree = resolve_ulysses_degree(self.world_size, ulysses_degree, cfg_degree, ring_degree)
        check_layout(self.world_size, ulysses_degree, cfg_degree, ring_degree=ring_degree)
        self.ulysses_degree = ulysses_degree
        self.cfg_degree = cfg_degree
        self.ring_degree = ring_degree
        self.cfg_rank, self.sp_rank = divmod(self.rank, ulysses_degree * ring_degree)
        self.ring_rank, self.ulysses_rank = divmod(self.sp_rank, ulysses_degree)
        self.world_group = dist.group.WORLD if self.world_size > 1 else None
        self.sp_group = self.ulysses_group = self.ring_group = self.cfg_group = None
        self.sp_ranks = self.ulysses_ranks = self.ring_ranks = self.cfg_ranks = [self.rank]
        if self.world_size == 1:
            return
        timeout = None if timeout_s is None else datetime.timedelta(seconds=timeout_s)
        layout = group_ranks(cfg_degree, ring_degree, ulysses_degree)
        # new_group is collective over the world: every rank creates every group, keeps its own.
        # A sequence group equal to the Ulysses (or ring) group is that group, not a second one.
        for axis in ("ulysses", "ring", "sequence", "cfg"):
            name = "sp" if axis == "sequence" else axis
            if axis == "sequence" and (ring_degree == 1 or ulysses_degree == 1):
                same = "ulysses" if ring_degree == 1 else "ring"
                self.sp_group, self.sp_ranks = getattr(self, f"{same}_group"), getattr(self, f"{same}_ranks")
                continue
            for ranks in layout[axis]:
                group = dist.new_group(ranks, timeout=timeout) if len(ranks) > 1 else None
                if self.rank in ranks:
                    setattr(self, f"{name}_group", group)
                    setattr(self, f"{name}_ranks", ranks)

    @property
    def sp_size(self) -> int:
        """Ranks that split the tokens of one CFG branch: ulysses x ring."""
        return self.ulysses_degree * self.ring_degree

    @property
    def cfg_size(self) -> int:
        return self.cfg_degree

    def check_heads(self, num_heads: int) -> None:
        """Ulysses splits heads over its group: they must divide evenly (the ring splits tokens only)."""
        if num_heads % self.ulysses_degree:
            raise heads_error(num_heads, self.ulysses_degree, self.world_size)

    def __repr__(self) -> str:
        return (f"ParallelDims(world={self.world_size}, rank={self.rank}, cfg={self.cfg_degree}, "
                f"ulysses={self.ulysses_degree}, ring={self.ring_degree}, cfg_rank={self.cfg_rank}, "
                f"sp_rank={self.sp_rank})")
