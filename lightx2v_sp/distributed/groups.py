"""One convention for process groups across the package.

`group=None` means no group: this process alone (size 1, rank 0), in every function that takes
a group. The whole job is `ParallelDims.world_group`, which is None only in a one-process job,
so passing `dims.sp_group` (None at ulysses 1) can never widen a collective to every rank.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

# the device types each backend's point-to-point (send/recv) carries: NCCL only GPU memory, gloo and
# MPI only host memory. A "cpu:gloo,cuda:nccl" backend string names one backend per device type.
_P2P_DEVICES = {"nccl": ("cuda",), "gloo": ("cpu",), "mpi": ("cpu",)}


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


def wire_device(backend: str, device: torch.device, cuda_index: Optional[int] = None) -> torch.device:
    """Where a tensor on `device` must be to travel through `backend`'s send/recv: `device` itself when the
    backend carries it, else this process's GPU (`cuda_index`, default the current one: NCCL) or the host.

    A CPU tensor sent over NCCL (a VAE decoded on the host, offload.vae=cpu) fails with "No backend
    type associated with device type cpu"; staged through the GPU it goes.
    """
    device = torch.device(device)
    carried: set[str] = set()
    for part in str(backend).lower().split(","):
        if ":" in part:
            carried.add(part.split(":", 1)[0])
        else:
            carried.update(_P2P_DEVICES.get(part, (device.type,)))  # unknown backend: trust the caller
    if device.type in carried:
        return device
    if "cuda" in carried:
        return torch.device("cuda", torch.cuda.current_device() if cuda_index is None else cuda_index)
    return torch.device("cpu")
