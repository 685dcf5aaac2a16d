"""Split a sequence into contiguous per-rank slices and put it back together, exactly (no padding)."""
from __future__ import annotations

import torch
import torch.distributed as dist

from .comm_stats import record_comm


def split_sizes(total: int, parts: int) -> list[int]:
    """Sizes of `parts` contiguous slices of `total`: the first `total % parts` hold one more."""
    if parts < 1:
        raise ValueError(f"cannot split {total} items into {parts} parts")
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


def group_size_rank(group) -> tuple[int, int]:
    if group is None:
        return 1, 0
    return dist.get_world_size(group), dist.get_rank(group)


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
    size, rank = group_size_rank(group)
    if size == 1:
        return x
    sizes = sizes if sizes is not None else [x.shape[dim]] * size
    if len(sizes) != size or sizes[rank] != x.shape[dim]:
        raise ValueError(f"gather_sequence: rank {rank} holds {x.shape[dim]} items along dim {dim}, "
                         f"but sizes={sizes} for a group of {size}")
    moved = x.movedim(dim, 0)
    rest = moved.shape[1:]
    out = torch.empty((sum(sizes), *rest), dtype=x.dtype, device=x.device)
    # gloo's all_gather needs equal sizes, so every rank sends its slice to every rank instead:
    # [P * S_r, ...] (my slice once per destination) -> all_to_all_single -> [S, ...] (slice i from rank i)
    send = moved.unsqueeze(0).expand(size, *moved.shape).contiguous().view(size * moved.shape[0], *rest)
    dist.all_to_all_single(out, send, sizes, [moved.shape[0]] * size, group=group)
    record_comm("all_gather", moved.numel() * moved.element_size() * (size - 1))
    return out.movedim(0, dim)
