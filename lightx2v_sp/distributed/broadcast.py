"""Rank 0's tensor on every rank of the job (image conditions, CLIP tokens: encoded once)."""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from .comm_stats import record_comm
from .groups import job_size_rank


def from_rank0(value: Optional[torch.Tensor], shape, device: torch.device) -> torch.Tensor:
    """`value` (fp32, rank 0 only; None elsewhere) as a `device` tensor of `shape` on every rank."""
    world, rank = job_size_rank()
    if world == 1:
        return value.to(device)
    buf = value.to(device) if rank == 0 else torch.empty(tuple(shape), device=device)
    # [shape] fp32 on rank 0 -> broadcast (world) -> the same bits on every rank
    dist.broadcast(buf, src=0)
    record_comm("broadcast", buf.numel() * buf.element_size() * (world - 1) if rank == 0 else 0)
    return buf
