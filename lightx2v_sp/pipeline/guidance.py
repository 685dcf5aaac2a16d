"""Classifier-free guidance, sequential or CFG-parallel.

With `parallel.cfg_degree=2` the ranks form two groups: cfg rank 0 runs the conditional pass and
cfg rank 1 the unconditional one, at the same time. One all_gather per step over `dims.cfg_group`
(2 ranks with equal sp_rank) hands each rank its partner's prediction; every rank then forms the
same guided prediction, so the scheduler steps stay identical everywhere.

The sequential path rounds its predictions the same way (model output dtype, then fp32), so the
two paths give bit-identical guided predictions for the same per-pass outputs.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist

from lightx2v_sp.distributed.comm_stats import record_comm


def combine(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """uncond + scale * (cond - uncond), in fp32."""
    cond, uncond = cond.float(), uncond.float()
    return uncond + scale * (cond - uncond)


def exchange_cfg(local: torch.Tensor, dims) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's pass (cond on cfg rank 0, uncond on cfg rank 1) -> (cond, uncond) on both."""
    assert dims.cfg_size == 2 and dims.cfg_group is not None, dims
    local = local.contiguous()
    parts = [torch.empty_like(local) for _ in range(dims.cfg_size)]
    # [B, C, F, H, W] on each cfg rank -> all_gather -> 2 x [B, C, F, H, W] (index = cfg rank)
    dist.all_gather(parts, local, group=dims.cfg_group)
    record_comm("all_gather", local.numel() * local.element_size() * (dims.cfg_size - 1))
    return parts[0], parts[1]


def guided_prediction(forward: Callable[[torch.Tensor], torch.Tensor], context: torch.Tensor,
                      uncond_context: torch.Tensor | None, scale: float, dims) -> torch.Tensor:
    """The guided velocity for one step; `forward(context)` runs the DiT once (fp32 result).

    scale 1.0 (or no negative context): the conditional pass only.
    """
    if scale == 1.0 or uncond_context is None:
        return forward(context).float()
    if dims.cfg_size == 2:
        mine = forward(context if dims.cfg_rank == 0 else uncond_context)
        cond, uncond = exchange_cfg(mine, dims)
    else:
        cond = forward(context)
        uncond = forward(uncond_context)
    return combine(cond, uncond, scale)
