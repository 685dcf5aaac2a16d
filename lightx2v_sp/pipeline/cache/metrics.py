"""The few numbers a cache decision needs, summed over the whole token sequence.

Inside the DiT each rank of a Ulysses group holds a slice of the tokens, so a metric over the tokens
(the first block's residual change, a calibration's norm ratios) is a sum of per-rank partial sums.
`sequence_sums` exchanges them with one all_gather of a few float64 scalars per step and adds them up
in rank order: every rank computes the same additions on the same numbers, so every rank holds the
same bits and takes the same decision (an all_reduce would too on NCCL, but a tree or ring reduction
may add in a different order on different ranks, and one flipped ulp at the threshold would split
the group: one rank running the blocks' collectives, the other not).
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from lightx2v_sp.distributed.comm_stats import record_comm


def sequence_sums(partials: list[torch.Tensor], group, size: int) -> list[float]:
    """This rank's partial sums (0-d tensors) -> the totals over the sequence group, as Python floats."""
    local = torch.stack([p.double() for p in partials])
    if size > 1:
        parts = [torch.empty_like(local) for _ in range(size)]
        # [k] partial sums on each of the P ranks -> all_gather -> P x [k], added in rank order below
        dist.all_gather(parts, local, group=group)
        record_comm("all_gather", local.numel() * local.element_size() * (size - 1))
        local = parts[0]
        for part in parts[1:]:
            local = local + part
    return local.tolist()


def relative_l1(current: torch.Tensor, previous: torch.Tensor, group, size: int) -> float:
    """sum|current - previous| / sum|previous| over all tokens of the group (mean / mean, as TeaCache,
    MagCache and first-block caching define it: both means count the same elements)."""
    diff = (current - previous).abs().sum(dtype=torch.float32)
    base = previous.abs().sum(dtype=torch.float32)
    num, den = sequence_sums([diff, base], group, size)
    return num / den if den > 0 else float("inf")


def mean_norm_ratio(current: torch.Tensor, previous: torch.Tensor, group, size: int) -> float:
    """Mean over all tokens of ||current|| / ||previous|| (norms over the channels, fp32): MagCache's ratio."""
    ratio = current.float().norm(dim=-1) / previous.float().norm(dim=-1).clamp_min(1e-12)
    total, count = sequence_sums([ratio.sum(), torch.tensor(float(ratio.numel()), device=ratio.device)], group, size)
    return total / count
