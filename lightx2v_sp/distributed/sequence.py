"""Split a sequence into contiguous per-rank slices and put it back together, exactly (no padding)."""
from __future__ import annotations

import torch

from .groups import group_size_rank
from .varlen import all_gather_v


def split_sizes(total: int, parts: int) -> list[int]:
    """Sizes of `parts` contiguous slices of `total`: the first `total % parts` hold one more."""
    if parts < 1:
        raise ValueError(f"cannot split {total} items into {parts} parts")
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


def shard_sequence(x: torch.Tensor, dim: int = 1, group=None) -> tuple[torch.Tensor, list[int]]:
    """This rank's contiguous slice of `x` along `dim`, and every rank's slice length."""
    size, rank = group_size_rank(group)
    if size == 1:
        return x, [x.shape[dim]]
    sizes = split_sizes(x.shape[dim], size)
    offset = sum(sizes[:rank])
    return x.narrow(dim, offset, sizes[rank]), sizes


def gather_sequence(x: torch.Tensor, dim: int = 1, sizes: list[int] | None = None, group=None) -> torch.Tensor:
    """Inverse of `shard_sequence`: every rank gets the whole sequence (slices may differ in length)."""
    size, _ = group_size_rank(group)
    if size == 1:
        return x
    if sizes is None:
        # Guessing equal sizes from this rank's slice would mis-size the exchange after an uneven
        # shard and crash or hang the group; shard_sequence returns the sizes to pass here.
        raise ValueError(f"gather_sequence over a group of {size} needs sizes= (every rank's slice length, "
                         "as returned by shard_sequence)")
    return all_gather_v(x, dim, sizes, group)
