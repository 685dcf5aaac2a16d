"""Round-robin pairing by the circle method: in each round every rank has at most one partner.

Even N: N - 1 rounds, each a perfect matching. Odd N: a phantom rank makes it even, so there are
N rounds and whoever meets the phantom idles that round. Every pair meets exactly once.
"""
from __future__ import annotations

from functools import lru_cache


@lru_cache(maxsize=None)
def round_robin_rounds(world_size: int) -> tuple[tuple[tuple[int, int], ...], ...]:
    """All rounds, each a tuple of (a, b) pairs with a < b (idle ranks are left out)."""
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    slots = list(range(world_size)) + ([None] if world_size % 2 else [])
    m = len(slots)
    rounds = []
    for _ in range(m - 1):
        pairs = []
        for i in range(m // 2):
            a, b = slots[i], slots[m - 1 - i]
            if a is not None and b is not None:
                pairs.append((min(a, b), max(a, b)))
        rounds.append(tuple(sorted(pairs)))
        slots = [slots[0], slots[-1]] + slots[1:-1]  # rotate all but the first
    return tuple(rounds)


@lru_cache(maxsize=None)
def partners(world_size: int, rank: int) -> tuple[int | None, ...]:
    """This rank's partner in each round (None: idle), computed once per (world size, rank)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside a group of {world_size}")
    out = []
    for pairs in round_robin_rounds(world_size):
        partner = None
        for a, b in pairs:
            if rank in (a, b):
                partner = b if rank == a else a
        out.append(partner)
    return tuple(out)
