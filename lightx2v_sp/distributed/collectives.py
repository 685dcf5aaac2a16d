"""All-to-all with uneven splits, done as one collective or as balanced pairwise rounds.

Both move the same bytes. A buffer is laid out as per-rank chunks along dim 0: chunk j of
`send` goes to rank j, chunk i of `recv` comes from rank i. Callers may pack a chunk just
before it leaves (`pack(j)`) and consume one as soon as it lands (`unpack(i)`), which lets the
round-robin path overlap packing/unpacking with the transfer of a neighbouring round.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Callable

import torch
import torch.distributed as dist

from .comm_stats import record_comm
from .schedule import partners

A2A_METHODS = ("all_to_all", "round_robin")


@lru_cache(maxsize=None)
def _global_ranks(group) -> tuple[int, ...]:
    return tuple(dist.get_global_rank(group, i) for i in range(dist.get_world_size(group)))


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def exchange(send: torch.Tensor, recv: torch.Tensor, send_splits: list[int], recv_splits: list[int],
             group, method: str = "all_to_all",
             pack: Callable[[int], None] | None = None,
             unpack: Callable[[int], None] | None = None) -> torch.Tensor:
    """All-to-all of `send` into `recv` (both split along dim 0 by the given per-rank sizes)."""
    size = dist.get_world_size(group)
    rank = dist.get_rank(group)
    assert len(send_splits) == size and len(recv_splits) == size, (send_splits, recv_splits, size)
    send_chunks = send.split(send_splits, dim=0)
    recv_chunks = recv.split(recv_splits, dim=0)
    if method == "all_to_all":
        if pack is not None:
            for j in range(size):
                pack(j)
        # [sum(send_splits), ...] chunk j -> rank j  ->  all_to_all_single  ->  [sum(recv_splits), ...] chunk i from rank i
        dist.all_to_all_single(recv, send, recv_splits, send_splits, group=group)
        record_comm("all_to_all", _nbytes(send) - _nbytes(send_chunks[rank]))
        if unpack is not None:
            for i in range(size):
                unpack(i)
        return recv
    if method != "round_robin":
        raise ValueError(f"a2a method {method!r} is not one of {list(A2A_METHODS)}")
    return _round_robin(send_chunks, recv_chunks, group, rank, size, pack, unpack, recv)


def _round_robin(send_chunks, recv_chunks, group, rank, size, pack, unpack, recv):
    ranks = _global_ranks(group)
    rounds = [p for p in partners(size, rank) if p is not None]
    if pack is not None:
        pack(rank)
    recv_chunks[rank].copy_(send_chunks[rank])
    if unpack is not None:
        unpack(rank)
    if not rounds:
        return recv

    def post(peer: int):
        # Empty chunks are skipped on both sides alike: my send size is the partner's receive size.
        ops = [dist.P2POp(op, t, ranks[peer], group)
               for op, t in ((dist.isend, send_chunks[peer]), (dist.irecv, recv_chunks[peer])) if t.numel()]
        if not ops:
            return []
        # chunk for `peer` [n_peer, ...] -> send/recv with one partner -> chunk from `peer` [n_from_peer, ...]
        work = dist.batch_isend_irecv(ops)
        record_comm("sendrecv", _nbytes(send_chunks[peer]))
        return work

    if pack is not None:
        pack(rounds[0])
    in_flight = post(rounds[0])
    for r, peer in enumerate(rounds):
        nxt = rounds[r + 1] if r + 1 < len(rounds) else None
        if nxt is not None and pack is not None:
            pack(nxt)  # packed while round r is on the wire
        for w in in_flight:
            w.wait()
        if nxt is not None:
            in_flight = post(nxt)  # one partner at a time: posted only after round r completed
        if unpack is not None:
            unpack(peer)  # unpacked while round r + 1 is on the wire
    return recv


def all_to_all_v(x: torch.Tensor, send_splits: list[int], recv_splits: list[int], group,
                 method: str = "all_to_all") -> torch.Tensor:
    """Convenience form: returns a new buffer holding the received chunks."""
    recv = torch.empty((sum(recv_splits), *x.shape[1:]), dtype=x.dtype, device=x.device)
    return exchange(x.contiguous(), recv, send_splits, recv_splits, group, method)
