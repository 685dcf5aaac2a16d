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

from ..distributed.collectives import exchange
from ..distributed.mesh import heads_error
from ..distributed.wire import COMM_DTYPES
from .backends import attention
from .options import UlyssesOptions

__all__ = ["COMM_DTYPES", "UlyssesOptions", "ulysses_attention"]


def _offsets(sizes: list[int]) -> list[int]:
    out, acc = [], 0
    for s in sizes:
        out.append(acc)
        acc += s
    return out


def _check(q, k, v, size, rank, seq_sizes, what: str = "ulysses_attention", split_heads: bool = True):
    if q.dim() != 4 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError(f"{what} expects q, k, v of one shape [B, S_local, H, D]; got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    if split_heads and q.shape[2] % size:
        raise heads_error(q.shape[2], size, dist.get_world_size())
    if len(seq_sizes) != size or seq_sizes[rank] != q.shape[1]:
        raise ValueError(f"seq_sizes={list(seq_sizes)} does not describe a group of {size} where rank {rank} "
                         f"holds {q.shape[1]} tokens")


_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2, torch.float64: 3}
_agreed_layouts: set = set()


def _check_agreement(q, group, size, seq_sizes, options: UlyssesOptions, what: str = "ulysses_attention"):
    """Ranks that disagree on the layout would crash or hang inside the exchange; check once per layout.

    Each rank gathers every rank's (B, H, D, dtype, variant, seq_sizes). A new layout costs one small
    all_gather (not counted in CommStats: it moves no attention data); a known one costs a set lookup.
    This catches ranks that disagree from the first call of a layout, the usual mistake; a rank that
    later switches alone to a new layout while the others reuse an agreed one is caught by the
    collective timeout (comm.timeout_s) instead, since checking every call would cost a sync each.
    """
    mine = (q.shape[0], q.shape[2], q.shape[3], _DTYPE_CODES.get(q.dtype, 9), *options.wire_code(), *seq_sizes)
    key = (group, mine)
    if key in _agreed_layouts:
        return
    desc = torch.tensor(mine, dtype=torch.int64, device=q.device)
    every = [torch.empty_like(desc) for _ in range(size)]
    # [7 + P] per rank -> all_gather -> P x [7 + P]
    dist.all_gather(every, desc, group=group)
    rows = [tuple(t.tolist()) for t in every]
    if any(r != rows[0] for r in rows):
        names = "(batch, heads, head_dim, dtype code, a2a, fuse_qkv, comm_dtype codes, seq_sizes...)"
        raise ValueError(f"{what}: the ranks of the group disagree on the layout {names}: "
                         + "; ".join(f"rank {i}: {r}" for i, r in enumerate(rows))
                         + ". Every rank must pass the same seq_sizes, shapes, dtype and variant")
    _agreed_layouts.add(key)


def ulysses_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group=None,
                      seq_sizes: list[int] | None = None, a2a: str = "all_to_all", fuse_qkv: bool = True,
                      comm_dtype: str | None = None, backend: str = "auto",
                      options: UlyssesOptions | None = None) -> torch.Tensor:
    """Attention over the whole sequence, each rank passing its slice: [B, S_local, H, D] -> same.

    The variant is `options`, or else the four loose keywords (kept for callers of the public API).
    """
    if options is None:
        options = UlyssesOptions(a2a=a2a, fuse_qkv=fuse_qkv, comm_dtype=comm_dtype, backend=backend)
    size = 1 if group is None else dist.get_world_size(group)
    if size == 1:
        return attention(q, k, v, options.backend)
    return _ulysses(q, k, v, group, size, seq_sizes, options)


# Under torch.compile (model.compile) the exchanges stay eager: dynamo breaks the graph around this
# call instead of tracing point-to-point and split-size collectives it cannot capture.
@torch.compiler.disable
def _ulysses(q, k, v, group, size, seq_sizes, options: UlyssesOptions, local=None):
    """`local(q, k, v)` replaces the local kernel on the scattered heads (ring.py: the ring over the
    other Ulysses groups, for USP)."""
    rank = dist.get_rank(group)
    seq_sizes = list(seq_sizes) if seq_sizes is not None else [q.shape[1]] * size
    _check(q, k, v, size, rank, seq_sizes)
    _check_agreement(q, group, size, seq_sizes, options)

    groups = [(q, k, v)] if options.fuse_qkv else [(q,), (k,), (v,)]
    full = [t for g in groups for t in _scatter_heads(g, group, size, seq_sizes, options)]
    # [B, S, Hp, D] each: the local kernel sees the whole sequence for its heads
    out = local(*full) if local is not None else attention(*full, backend=options.backend)
    return _gather_heads(out, group, size, rank, seq_sizes, options)


def _scatter_heads(tensors, group, size, seq_sizes, options: UlyssesOptions):
    b, s_local, h, d = tensors[0].shape
    hp, m, total = h // size, len(tensors), sum(seq_sizes)
    codec = options.codec
    row, wire = codec.row_size(d), codec.wire_dtype(tensors[0].dtype)
    dev = tensors[0].device
    send = torch.empty((size, s_local, m, b, hp, row), dtype=wire, device=dev)
    recv = torch.empty((total, m, b, hp, row), dtype=wire, device=dev)
    split = [t.view(b, s_local, size, hp, d) for t in tensors]

    def pack(j: int) -> None:
        for i, t in enumerate(split):
            codec.encode_into(t[:, :, j].transpose(0, 1), send[j, :, i])  # [S_r, B, Hp, D], head group j

    decoded, unpack = recv, None
    if not codec.lossless:
        decoded = torch.empty((total, m, b, hp, d), dtype=tensors[0].dtype, device=dev)
        offs = _offsets(seq_sizes)

        def unpack(i: int) -> None:
            rows = slice(offs[i], offs[i] + seq_sizes[i])
            codec.decode_into(recv[rows], decoded[rows])

    # [P * S_r, m, B, Hp, row] (chunk j -> rank j) -> exchange -> [S, m, B, Hp, row] (all tokens, my heads)
    exchange(send.view(size * s_local, m, b, hp, row), recv, [s_local] * size, seq_sizes, group, options.a2a,
             pack, unpack)
    return [decoded[:, i].permute(1, 0, 2, 3) for i in range(m)]  # [B, S, Hp, D] views


def _gather_heads(out, group, size, rank, seq_sizes, options: UlyssesOptions):
    b, total, hp, d = out.shape
    s_local = seq_sizes[rank]
    codec = options.codec
    row, wire = codec.row_size(d), codec.wire_dtype(out.dtype)
    send = torch.empty((total, b, hp, row), dtype=wire, device=out.device)
    recv = torch.empty((size, s_local, b, hp, row), dtype=wire, device=out.device)
    offs = _offsets(seq_sizes)

    def pack(j: int) -> None:
        rows = slice(offs[j], offs[j] + seq_sizes[j])
        codec.encode_into(out[:, rows].transpose(0, 1), send[rows])  # [S_j, B, Hp, D]: rank j's tokens

    decoded, unpack = recv, None
    if not codec.lossless:
        decoded = torch.empty((size, s_local, b, hp, d), dtype=out.dtype, device=out.device)

        def unpack(i: int) -> None:
            codec.decode_into(recv[i], decoded[i])

    # [S, B, Hp, row] (chunk j: tokens of rank j) -> exchange -> [P * S_r, B, Hp, row] (chunk i: head group i)
    exchange(send, recv.view(size * s_local, b, hp, row), seq_sizes, [s_local] * size, group, options.a2a,
             pack, unpack)
    # [P, S_r, B, Hp, D] -> [B, S_r, P * Hp, D]
    return decoded.permute(2, 1, 0, 3, 4).reshape(b, s_local, size * hp, d)
