"""Ring attention, alone or around Ulysses (USP): the second sequence dimension.

Each of the R ranks of a ring group keeps its queries and passes key/value blocks around the ring:
at step t rank r holds the block of rank (r - t) mod R, runs the local kernel on it while that block
goes on to rank r + 1 and the next one arrives from rank r - 1 (`batch_isend_irecv`, posted from a
side stream on CUDA so it overlaps the kernel), and after R steps it has seen every key. Each block
gives a partial output and its log-sum-exp (lse.py); the partials are merged at the end in fp32
with weights softmax_j(lse_j) (ring_merge.py), which is the softmax over all keys: exact up to
rounding, whatever the split. Blocks may differ in size (per-rank `seq_sizes`, never padding that
would join the softmax); an empty block is skipped on both sides of its transfer.

Wire layout of one block (row = D values, or D + 4 bytes with fp8): [2 (k|v), B, S_j, H, row],
contiguous, in one of two buffers sized for the largest block. With `comm_dtype="fp8"` a rank
encodes its own block once and blocks are forwarded as received, so every K/V value passes the
codec exactly once, wherever it is used: the result is attention on codec-rounded K and V.

USP (`usp_attention`): the Ulysses all-to-all inside each group of contiguous ranks turns the
group's tokens x all heads into all of the group's tokens x H/U heads; the ring then runs over the
ranks that hold the same heads in the other groups (ParallelDims.ring_group), and the second
all-to-all returns the output to the token layout.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from ..distributed.collectives import _global_ranks
from ..distributed.comm_stats import record_comm
from .backends import attention, get_lse_backend
from .options import UlyssesOptions
from .ring_merge import merge_partials
from .ulysses import _check, _check_agreement, _ulysses

__all__ = ["merge_partials", "ring_attention", "usp_attention"]

_side_streams: dict = {}


def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group=None,
                   seq_sizes: list[int] | None = None, comm_dtype: str | None = None, backend: str = "auto",
                   options: UlyssesOptions | None = None) -> torch.Tensor:
    """Attention over the whole sequence, each rank of `group` passing its slice: [B, S_local, H, D] -> same.

    `seq_sizes`: every rank's slice length (None: all equal). The wire codec and local kernel come from
    `options` (its a2a / fuse_qkv are Ulysses-only), or else `comm_dtype` and `backend`.
    """
    if options is None:
        options = UlyssesOptions(comm_dtype=comm_dtype, backend=backend)
    size = 1 if group is None else dist.get_world_size(group)
    if size == 1:
        return attention(q, k, v, options.backend)
    return _ring(q, k, v, group, size, seq_sizes, options)


@torch.compiler.disable  # the whole composition stays eager under model.compile (no closure to rebuild)
def usp_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ulysses_group, ring_group,
                  seq_sizes: list[int], options: UlyssesOptions) -> torch.Tensor:
    """Ulysses x ring: [B, S_local, H, D] -> same, over the sequence group of ulysses x ring ranks.

    `seq_sizes` has one entry per rank of the sequence group, in rank order (ring-major: the U
    slices of Ulysses group 0, then group 1, ...), as shard_sequence over ParallelDims.sp_group gives.
    """
    u = 1 if ulysses_group is None else dist.get_world_size(ulysses_group)
    r = 1 if ring_group is None else dist.get_world_size(ring_group)
    if len(seq_sizes) != u * r:
        raise ValueError(f"usp_attention: seq_sizes={list(seq_sizes)} must hold one size per rank of the sequence "
                         f"group (ulysses {u} x ring {r} = {u * r})")
    chunks = [sum(seq_sizes[g * u:(g + 1) * u]) for g in range(r)]  # tokens of each Ulysses group
    ring_rank = 0 if ring_group is None else dist.get_rank(ring_group)

    def ring(qc, kc, vc):
        # [B, S_chunk, H/U, D]: the Ulysses group's tokens for this rank's heads -> ring over the groups
        return ring_attention(qc, kc, vc, ring_group, chunks, options=options)

    if u == 1:
        return ring(q, k, v)
    # [B, S/P, H, D] -> all_to_all -> [B, S_chunk, H/U, D] -> ring -> all_to_all -> [B, S/P, H, D]
    return _ulysses(q, k, v, ulysses_group, u, seq_sizes[ring_rank * u:(ring_rank + 1) * u], options, local=ring)


def _side_stream(device: torch.device):
    if device.type != "cuda":
        return None
    if device not in _side_streams:
        _side_streams[device] = torch.cuda.Stream(device)
    return _side_streams[device]


def _post(send: torch.Tensor, recv: torch.Tensor, to: int, frm: int, group, stream) -> list:
    """Send `send` to global rank `to` and receive `recv` from `frm`, on `stream` (CUDA) after the
    work queued so far: the buffer received into was read by the previous step's kernel."""
    ops = [dist.P2POp(op, t, peer, group) for op, t, peer in ((dist.isend, send, to), (dist.irecv, recv, frm))
           if t.numel()]
    if not ops:
        return []
    if send.numel():  # counted as what this rank sends, like every CommStats kind
        record_comm("ring_sendrecv", send.numel() * send.element_size())
    if stream is None:
        return dist.batch_isend_irecv(ops)
    stream.wait_stream(torch.cuda.current_stream(send.device))
    with torch.cuda.stream(stream):
        # block j [2, B, S_j, H, row] -> rank r + 1; block j - 1 <- rank r - 1
        return dist.batch_isend_irecv(ops)


# Under torch.compile (model.compile) the ring stays eager, like the Ulysses exchange: dynamo breaks
# the graph around it instead of tracing point-to-point transfers.
@torch.compiler.disable
def _ring(q, k, v, group, size, seq_sizes, options: UlyssesOptions):
    rank = dist.get_rank(group)
    seq_sizes = list(seq_sizes) if seq_sizes is not None else [q.shape[1]] * size
    _check(q, k, v, size, rank, seq_sizes, what="ring_attention", split_heads=False)  # the ring splits tokens only
    _check_agreement(q, group, size, seq_sizes, options, what="ring_attention")
    kernel = get_lse_backend(options.backend, q)
    codec = options.codec
    b, s_local, h, d = q.shape
    row, wire = codec.row_size(d), codec.wire_dtype(k.dtype)

    def block(buf: torch.Tensor, s: int, width: int) -> torch.Tensor:
        return buf[:2 * b * s * h * width].view(2, b, s, h, width)  # contiguous: the first elements

    most = max(seq_sizes)
    bufs = [torch.empty(2 * b * most * h * row, dtype=wire, device=q.device) for _ in range(2)]
    decoded = None if codec.lossless else torch.empty(2 * b * most * h * d, dtype=k.dtype, device=q.device)
    cur = block(bufs[0], s_local, row)
    codec.encode_into(k, cur[0])  # my block, encoded once: [B, S_r, H, D] -> [B, S_r, H, row]
    codec.encode_into(v, cur[1])
    ranks = _global_ranks(group)
    to, frm = ranks[(rank + 1) % size], ranks[(rank - 1) % size]
    stream = _side_stream(q.device)
    parts, lses = [], []
    for step in range(size):
        src = (rank - step) % size  # whose block is in hand
        works, nxt = [], None
        if step < size - 1:
            nxt = block(bufs[(step + 1) % 2], seq_sizes[(src - 1) % size], row)
            works = _post(cur, nxt, to, frm, group, stream)
        if seq_sizes[src] and s_local:
            kv = cur
            if decoded is not None:
                kv = block(decoded, seq_sizes[src], d)
                codec.decode_into(cur, kv)
            out, lse = kernel(q, kv[0], kv[1])  # [B, S_r, H, D], [B, H, S_r] against block src's keys
            parts.append(out)
            lses.append(lse)
        for work in works:
            work.wait()  # CUDA: the current stream waits for the transfer; gloo: this thread does
        cur = nxt
    if not parts:  # this rank holds no queries
        return q.new_empty(q.shape)
    return merge_partials(parts, lses, q.dtype)


def ring_memory_bytes(seq_sizes: list[int], ulysses: int, ring_rank: int, heads: int, head_dim: int,
                      dtype_bytes: int, comm_dtype: str | None = None, batch: int = 1) -> int:
    """Peak bytes one rank's ring holds during a self-attention, on top of the model's activations.

    `seq_sizes`: tokens per rank of the sequence group (ulysses x ring entries, as shard_sequence
    splits them); `heads`: heads per rank after the Ulysses exchange (H / ulysses). Two wire
    buffers of the largest K/V block (+ its decoded copy with fp8), and until the merge R partial
    outputs with their lse, the fp32 weights and the merged output.
    """
    ring = len(seq_sizes) // ulysses
    chunks = [sum(seq_sizes[g * ulysses:(g + 1) * ulysses]) for g in range(ring)]
    most, mine = max(chunks), chunks[ring_rank]
    fp8 = comm_dtype == "fp8"
    row_bytes = (head_dim + 4) if fp8 else head_dim * dtype_bytes
    wire = 2 * 2 * batch * most * heads * row_bytes
    decoded = 2 * batch * most * heads * head_dim * dtype_bytes if fp8 else 0
    partials = ring * batch * mine * heads * (head_dim * dtype_bytes + 4 + 4)  # outputs, lse, weights
    return wire + decoded + partials + batch * mine * heads * head_dim * dtype_bytes
