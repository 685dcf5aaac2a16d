"""Variable-length all-gather and reduce-scatter: exact-size buffers, no padding to the longest.

`sizes[i]` is rank i's length along `dim` and must be the same list on every rank. The gathered
buffer holds exactly sum(sizes) rows along `dim` (seed 000: pad-to-max-times-N buffers waste
memory), and reduce-scatter hands each rank the sum over ranks of its own slice (seed 001:
reduce-scatter + all-gather in place of one all-reduce, so work between them runs on 1/N of the
tokens).

Backends: equal sizes use the single-buffer collectives (`all_gather_into_tensor`,
`reduce_scatter_tensor`), which NCCL and current gloo both implement. Unequal sizes: NCCL takes
`all_gather` into views of the one output buffer; gloo refuses unequal all_gather, so one
`all_to_all_single` in which every rank sends its slice to every rank fills the buffer instead. Unequal reduce-scatter is one `all_to_all_single` with
split sizes plus a local sum, on any backend.

With `symmetric=True` (comm.symmetric_memory, see symmetric_memory.py) the buffers these functions
allocate come from NCCL symmetric memory and both collectives run in place; off, that costs one
boolean check. `group=None` is this process alone (groups.py): the call returns its input.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.distributed as dist

from . import symmetric_memory
from .comm_stats import record_comm
from .groups import group_size_rank, wire_device

# torch >= 2.13 renames the single-buffer collectives; older releases only have the old names
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor

# backend name -> whether it implements the equal-size single-buffer collectives (probed once)
_TENSOR_COLLECTIVES: dict[str, bool] = {"nccl": True}


def _row_bytes(t: torch.Tensor) -> int:
    """Bytes of one index along dim 0."""
    return math.prod(t.shape[1:]) * t.element_size()


def _check_sizes(fn: str, sizes, size: int) -> list[int]:
    sizes = [int(s) for s in sizes]
    if len(sizes) != size or any(s < 0 for s in sizes):
        raise ValueError(f"{fn}: sizes={sizes} must hold one non-negative length per rank of the group "
                         f"({size} ranks); the collective cannot be laid out")
    return sizes


def _tensor_collective(group, call: Callable[[], None]) -> bool:
    """Run an equal-size single-buffer collective; False when the backend lacks it.

    gloo gained all_gather_into_tensor / reduce_scatter_tensor only in recent torch releases. A
    backend that lacks one refuses it on every rank before sending anything, so every rank
    falls back together; after one success, errors propagate.
    """
    backend = str(dist.get_backend(group))
    known = _TENSOR_COLLECTIVES.get(backend)
    if known is False:
        return False
    if known:
        call()
        return True
    try:
        call()
    except (RuntimeError, NotImplementedError) as e:
        if not isinstance(e, NotImplementedError) and "support" not in str(e).lower():
            raise
        _TENSOR_COLLECTIVES[backend] = False
        return False
    _TENSOR_COLLECTIVES[backend] = True
    return True


def all_gather_v(x: torch.Tensor, dim: int, sizes, group=None, symmetric: bool = False) -> torch.Tensor:
    """This rank's slice (x.shape[dim] == sizes[rank]) -> the concatenation of all slices along `dim`."""
    size, rank = group_size_rank(group)
    if size == 1:
        return x
    sizes = _check_sizes("all_gather_v", sizes, size)
    if x.shape[dim] != sizes[rank]:
        raise ValueError(f"all_gather_v: rank {rank} holds {x.shape[dim]} rows along dim {dim}, "
                         f"but sizes={sizes} says {sizes[rank]}")
    moved = x.movedim(dim, 0)
    rest = tuple(moved.shape[1:])
    total = sum(sizes)
    if symmetric:
        out = symmetric_memory.empty((total, *rest), x.dtype, x.device, group)
    else:
        out = torch.empty((total, *rest), dtype=x.dtype, device=x.device)
    if total == 0:
        return out.movedim(0, dim)
    parts = list(out.split(sizes, dim=0))
    parts[rank].copy_(moved)  # in place: this rank's slice already sits in the gathered buffer
    record_comm("all_gather", sizes[rank] * _row_bytes(out) * (size - 1))
    # [S/N, ...] on each rank -> all_gather_single (into_tensor) -> [S, ...] on every rank
    if len(set(sizes)) == 1 and _tensor_collective(
            group, lambda: _all_gather_single(out, parts[rank], group=group)):
        return out.movedim(0, dim)
    if str(dist.get_backend(group)) == "nccl":
        # [S_r, ...] on rank r -> all_gather (views of one buffer, unequal) -> [sum S_r, ...]
        dist.all_gather(parts, parts[rank].clone(), group=group)
    else:
        # gloo refuses unequal all_gather: one all_to_all_single in which every rank sends its
        # slice to every rank does the same in one call.
        # [N * S_r, ...] (my slice once per destination) -> all_to_all_single -> [sum S_i, ...]
        send = moved.unsqueeze(0).expand(size, *moved.shape).contiguous().view(size * sizes[rank], *rest)
        dist.all_to_all_single(out, send, output_split_sizes=sizes, input_split_sizes=[sizes[rank]] * size,
                               group=group)
    return out.movedim(0, dim)


def reduce_scatter_v(x: torch.Tensor, dim: int, sizes, group=None, symmetric: bool = False) -> torch.Tensor:
    """Partial sums x (x.shape[dim] == sum(sizes)) -> this rank's slice of their sum over ranks."""
    size, rank = group_size_rank(group)
    if size == 1:
        return x
    sizes = _check_sizes("reduce_scatter_v", sizes, size)
    if x.shape[dim] != sum(sizes):
        raise ValueError(f"reduce_scatter_v: rank {rank} holds {x.shape[dim]} rows along dim {dim}, "
                         f"but sizes={sizes} sum to {sum(sizes)}")
    moved = x.movedim(dim, 0)
    rest = tuple(moved.shape[1:])
    mine = sizes[rank]
    if sum(sizes) == 0:
        return moved[:0].movedim(0, dim)
    record_comm("reduce_scatter", (sum(sizes) - mine) * _row_bytes(moved))
    if len(set(sizes)) == 1:
        if symmetric:
            # stage the partial sums in symmetric memory and reduce in place (NCCL: recvbuff =
            # sendbuff + rank * count), so both buffers of the collective sit in the window
            send = symmetric_memory.empty((sum(sizes), *rest), x.dtype, x.device, group)
            send.copy_(moved)
            out = send[rank * mine:(rank + 1) * mine]
        else:
            send = moved.contiguous()
            out = torch.empty((mine, *rest), dtype=x.dtype, device=x.device)
        # [S, ...] partial sums on each rank -> reduce_scatter_single (tensor) -> [S/N, ...] summed
        if _tensor_collective(group, lambda: _reduce_scatter_single(out, send, group=group)):
            return out.movedim(0, dim)
    recv = torch.empty((size * mine, *rest), dtype=x.dtype, device=x.device)
    # [sum S_j, ...] (slice j -> rank j) -> all_to_all_single -> [N * S_r, ...] (every rank's
    # partial sum of my slice, stacked by source rank)
    dist.all_to_all_single(recv, moved.contiguous(), output_split_sizes=[mine] * size,
                           input_split_sizes=sizes, group=group)
    stacked = recv.view(size, mine, *rest)
    if x.dtype in (torch.float16, torch.bfloat16):
        out = stacked.sum(0, dtype=torch.float32).to(x.dtype)  # accumulate half inputs in fp32
    else:
        out = stacked.sum(0)
    return out.movedim(0, dim)


def gather_v(x: torch.Tensor, dim: int, sizes, dst: int = 0, group=None,
             out_device: torch.device | str | None = None) -> torch.Tensor | None:
    """This rank's slice (x.shape[dim] == sizes[rank]) -> the concatenation along `dim` on rank
    `dst` only (None on the others), built in `out_device` memory (default: x's device).

    One point-to-point transfer per sending rank, received into one slice-sized buffer at a time,
    so `dst` never holds N padded slices on the device (a decoded video can be most of a GPU).
    Slices travel on the device the group's backend carries (groups.wire_device): CPU slices over
    NCCL are staged through this rank's GPU, one slice at a time.
    """
    size, rank = group_size_rank(group)
    out_device = torch.device(out_device) if out_device is not None else x.device
    if size == 1:
        return x.to(out_device)
    sizes = _check_sizes("gather_v", sizes, size)
    if x.shape[dim] != sizes[rank]:
        raise ValueError(f"gather_v: rank {rank} holds {x.shape[dim]} rows along dim {dim}, "
                         f"but sizes={sizes} says {sizes[rank]}")

    def global_rank(r: int) -> int:
        return dist.get_global_rank(group, r)

    wire = wire_device(dist.get_backend(group), x.device)
    if rank != dst:
        if sizes[rank]:
            record_comm("send", x.numel() * x.element_size())
            # [..., S_r, ...] on rank r -> send -> rank dst
            dist.send(x.to(wire).contiguous(), dst=global_rank(dst), group=group)
        return None
    shape = list(x.shape)
    shape[dim] = sum(sizes)
    out = torch.empty(shape, dtype=x.dtype, device=out_device)
    parts = out.split(sizes, dim=dim)
    parts[rank].copy_(x)
    for src in range(size):
        if src == rank or not sizes[src]:
            continue
        shape[dim] = sizes[src]
        buf = torch.empty(shape, dtype=x.dtype, device=wire)
        # rank src's [..., S_src, ...] -> recv -> its rows of [..., sum S, ...] on rank dst
        dist.recv(buf, src=global_rank(src), group=group)
        parts[src].copy_(buf)
    return out
