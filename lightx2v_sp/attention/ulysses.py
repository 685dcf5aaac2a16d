"""Ulysses sequence-parallel attention around any local kernel.

Each rank holds a contiguous slice of the tokens with all heads; one exchange gives each rank
all tokens for 1/P of the heads, the local kernel runs, and a second exchange returns the
output to the token layout. Slices may be uneven: the exchanges use split sizes, never padding,
so the result is single-device attention on the whole sequence.

Wire layouts (P ranks, this rank holds S_r tokens, Hp = H / P heads per rank, row = D values,
or D + 4 bytes with fp8):
- in:  send [P, S_r, m, B, Hp, row]  (chunk j: head group j of my tokens; m = 3 fused q|k|v, else 1)
       recv [S, m, B, Hp, row]       (token-major, so the chunks of all sources concatenate into
                                      the whole sequence without a reordering copy)
- out: send [S, B, Hp, row] (chunk j: tokens of rank j) -> recv [P, S_r, B, Hp, row] (chunk i: heads i)
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from ..distributed.collectives import A2A_METHODS, exchange
from ..distributed.comm_quant import dequantize_into, packed_row_bytes, quantize_into
from ..distributed.mesh import heads_error
from .backends import attention

COMM_DTYPES = (None, "fp8")


def _offsets(sizes: list[int]) -> list[int]:
    out, acc = [], 0
    for s in sizes:
        out.append(acc)
        acc += s
    return out


def check_options(a2a: str, comm_dtype: str | None) -> None:
    if a2a not in A2A_METHODS:
        raise ValueError(f"a2a={a2a!r} is not one of {list(A2A_METHODS)}")
    if comm_dtype not in COMM_DTYPES:
        raise ValueError(f"comm_dtype={comm_dtype!r} is not one of {list(COMM_DTYPES)}")


def _check(q, k, v, size, rank, seq_sizes, a2a, comm_dtype):
    if q.dim() != 4 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError(f"ulysses_attention expects q, k, v of one shape [B, S_local, H, D]; got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    if q.shape[2] % size:
        raise heads_error(q.shape[2], size, dist.get_world_size())
    check_options(a2a, comm_dtype)
    if len(seq_sizes) != size or seq_sizes[rank] != q.shape[1]:
        raise ValueError(f"seq_sizes={list(seq_sizes)} does not describe a group of {size} where rank {rank} "
                         f"holds {q.shape[1]} tokens")


_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2, torch.float64: 3}
_agreed_layouts: set = set()


def _check_agreement(q, group, size, seq_sizes, a2a, fuse_qkv, comm_dtype):
    """Ranks that disagree on the layout would crash or hang inside the exchange; check once per layout.

    Each rank gathers every rank's (B, H, D, dtype, variant, seq_sizes). A new layout costs one small
    all_gather (not counted in CommStats: it moves no attention data); a known one costs a set lookup.
    This catches ranks that disagree from the first call of a layout, the usual mistake; a rank that
    later switches alone to a new layout while the others reuse an agreed one is caught by the
    collective timeout (comm.timeout_s) instead, since checking every call would cost a sync each.
    """
    variant = A2A_METHODS.index(a2a) * 4 + int(fuse_qkv) * 2 + int(comm_dtype == "fp8")
    mine = (q.shape[0], q.shape[2], q.shape[3], _DTYPE_CODES.get(q.dtype, 9), variant, *seq_sizes)
    key = (group, mine)
    if key in _agreed_layouts:
        return
    desc = torch.tensor(mine, dtype=torch.int64, device=q.device)
    every = [torch.empty_like(desc) for _ in range(size)]
    # [5 + P] per rank -> all_gather -> P x [5 + P]
    dist.all_gather(every, desc, group=group)
    rows = [tuple(t.tolist()) for t in every]
    if any(r != rows[0] for r in rows):
        names = "(batch, heads, head_dim, dtype code, variant code, seq_sizes...)"
        raise ValueError(f"ulysses_attention: the ranks of the group disagree on the layout {names}: "
                         + "; ".join(f"rank {i}: {r}" for i, r in enumerate(rows))
                         + ". Every rank must pass the same seq_sizes, shapes, dtype and variant")
    _agreed_layouts.add(key)


def ulysses_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group=None,
                      seq_sizes: list[int] | None = None, a2a: str = "all_to_all", fuse_qkv: bool = True,
                      comm_dtype: str | None = None, backend: str = "auto") -> torch.Tensor:
    """Attention over the whole sequence, each rank passing its slice: [B, S_local, H, D] -> same."""
    size = 1 if group is None else dist.get_world_size(group)
    if size == 1:
        return attention(q, k, v, backend)
    return _ulysses(q, k, v, group, size, seq_sizes, a2a, fuse_qkv, comm_dtype, backend)


# Under torch.compile (model.compile) the exchanges stay eager: dynamo breaks the graph around this
# call instead of tracing point-to-point and split-size collectives it cannot capture.
@torch.compiler.disable
def _ulysses(q, k, v, group, size, seq_sizes, a2a, fuse_qkv, comm_dtype, backend):
    rank = dist.get_rank(group)
    seq_sizes = list(seq_sizes) if seq_sizes is not None else [q.shape[1]] * size
    _check(q, k, v, size, rank, seq_sizes, a2a, comm_dtype)
    _check_agreement(q, group, size, seq_sizes, a2a, fuse_qkv, comm_dtype)

    groups = [(q, k, v)] if fuse_qkv else [(q,), (k,), (v,)]
    full = [t for g in groups for t in _scatter_heads(g, group, size, seq_sizes, a2a, comm_dtype)]
    # [B, S, Hp, D] each: the local kernel sees the whole sequence for its heads
    out = attention(*full, backend=backend)
    return _gather_heads(out, group, size, rank, seq_sizes, a2a, comm_dtype)


def _scatter_heads(tensors, group, size, seq_sizes, a2a, comm_dtype):
    b, s_local, h, d = tensors[0].shape
    hp, m, total = h // size, len(tensors), sum(seq_sizes)
    fp8 = comm_dtype == "fp8"
    row = packed_row_bytes(d) if fp8 else d
    wire = torch.uint8 if fp8 else tensors[0].dtype
    dev = tensors[0].device
    send = torch.empty((size, s_local, m, b, hp, row), dtype=wire, device=dev)
    recv = torch.empty((total, m, b, hp, row), dtype=wire, device=dev)
    split = [t.view(b, s_local, size, hp, d) for t in tensors]

    def pack(j: int) -> None:
        for i, t in enumerate(split):
            piece = t[:, :, j].transpose(0, 1)  # [S_r, B, Hp, D], head group j
            if fp8:
                quantize_into(piece, send[j, :, i])
            else:
                send[j, :, i].copy_(piece)

    decoded, unpack = recv, None
    if fp8:
        decoded = torch.empty((total, m, b, hp, d), dtype=tensors[0].dtype, device=dev)
        offs = _offsets(seq_sizes)

        def unpack(i: int) -> None:
            rows = slice(offs[i], offs[i] + seq_sizes[i])
            dequantize_into(recv[rows], decoded[rows])

    # [P * S_r, m, B, Hp, row] (chunk j -> rank j) -> exchange -> [S, m, B, Hp, row] (all tokens, my heads)
    exchange(send.view(size * s_local, m, b, hp, row), recv, [s_local] * size, seq_sizes, group, a2a, pack, unpack)
    return [decoded[:, i].permute(1, 0, 2, 3) for i in range(m)]  # [B, S, Hp, D] views


def _gather_heads(out, group, size, rank, seq_sizes, a2a, comm_dtype):
    b, total, hp, d = out.shape
    s_local = seq_sizes[rank]
    fp8 = comm_dtype == "fp8"
    row = packed_row_bytes(d) if fp8 else d
    wire = torch.uint8 if fp8 else out.dtype
    send = torch.empty((total, b, hp, row), dtype=wire, device=out.device)
    recv = torch.empty((size, s_local, b, hp, row), dtype=wire, device=out.device)
    offs = _offsets(seq_sizes)

    def pack(j: int) -> None:
        rows = slice(offs[j], offs[j] + seq_sizes[j])
        piece = out[:, rows].transpose(0, 1)  # [S_j, B, Hp, D]: rank j's tokens
        if fp8:
            quantize_into(piece, send[rows])
        else:
            send[rows].copy_(piece)

    decoded, unpack = recv, None
    if fp8:
        decoded = torch.empty((size, s_local, b, hp, d), dtype=out.dtype, device=out.device)

        def unpack(i: int) -> None:
            dequantize_into(recv[i], decoded[i])

    # [S, B, Hp, row] (chunk j: tokens of rank j) -> exchange -> [P * S_r, B, Hp, row] (chunk i: head group i)
    exchange(send, recv.view(size * s_local, b, hp, row), seq_sizes, [s_local] * size, group, a2a, pack, unpack)
    # [P, S_r, B, Hp, D] -> [B, S_r, P * Hp, D]
    return decoded.permute(2, 1, 0, 3, 4).reshape(b, s_local, size * hp, d)
