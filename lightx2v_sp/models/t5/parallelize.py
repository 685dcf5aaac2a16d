"""Lay the UMT5 encoder out over ranks: replicate, tensor parallel (tp) or data parallel (dp).

After `parallelize_t5(enc, dims, mode)` every rank calls `enc(input_ids, attention_mask)` with
the same full inputs and gets the same full [B, L, d_model] result, in Wan's form: positions where
the mask is 0 hold zeros (Wan strips each prompt to its length and pads the DiT context with
zeros). Trailing columns that are padding in every prompt are not computed at all: they change
no real token's output (their keys are masked out) and Wan pads prompts to 512 tokens.

- replicate: every rank runs the whole encoder.
- tp: heads and FFN columns (and vocabulary rows) split over the group. Between blocks the
  residual stream is split over the B*L tokens; each block does
      all_gather_v -> q/k/v on local heads -> attention -> o (partial sums) -> reduce_scatter_v
      -> residual add + RMSNorm on 1/N of the tokens -> all_gather_v -> gate/fc1 columns -> fc2
      (partial sums) -> reduce_scatter_v -> residual add,
  the reduce-scatter + all-gather pattern instead of an all-reduce (seed 001).
- dp: prompts split over the group; each rank encodes its share and `all_gather_v` gathers only
  the real tokens into one buffer of exactly sum(lengths) rows (seed 000).
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from lightx2v_sp.distributed import symmetric_memory as _symmetric
from lightx2v_sp.distributed.groups import group_size_rank
from lightx2v_sp.distributed.sequence import split_sizes
from lightx2v_sp.distributed.varlen import all_gather_v, reduce_scatter_v

from ..quant import T5_LINEARS, quantize_linears
from .model import T5Encoder, padding_bias
from .shard import T5Shard

MODES = ("replicate", "tp", "dp")


def _prepare(input_ids: torch.Tensor, attention_mask: torch.Tensor | None):
    """-> (ids, mask, keep): mask defaults to all ones; keep = columns up to the last real token."""
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids must be [B, L], got shape {tuple(input_ids.shape)}")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask {tuple(attention_mask.shape)} does not match input_ids "
                         f"{tuple(input_ids.shape)}")
    real = attention_mask.ne(0).any(dim=0).nonzero()
    keep = int(real[-1]) + 1 if real.numel() else 1
    return input_ids, attention_mask, keep


def _pad_to(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B, keep, d] -> [B, L, d] with zeros wherever the mask is 0 (Wan's context layout)."""
    b, length = mask.shape
    out = hidden.new_zeros(b, length, hidden.shape[-1])
    keep = hidden.shape[1]
    out[:, :keep] = hidden * mask[:, :keep, None].ne(0).to(hidden.dtype)
    return out


def check_encoder_device(enc: T5Encoder, mode: str, backend: str) -> None:
    """NCCL moves CUDA tensors only. Checked when the encoder runs, not when it is laid out: the
    runner lays it out on the host and its placement (gpu / swap) moves it to the GPU afterwards."""
    device = enc.norm.weight.device
    if backend == "nccl" and device.type != "cuda":
        raise ValueError(f"text_encoder.parallel={mode} sends activations through the {backend} group, "
                         f"but the encoder runs on {device}; use text_encoder.parallel=replicate for a CPU "
                         "encoder, text_encoder.device=gpu or swap, or pass a gloo group")


class ReplicatePlan:
    mode = "replicate"

    def __call__(self, enc: T5Encoder, input_ids, attention_mask=None) -> torch.Tensor:
        ids, mask, keep = _prepare(input_ids, attention_mask)
        return _pad_to(enc.forward_local(ids[:, :keep], mask[:, :keep]), mask)


class DataParallelPlan:
    """Batch rows split with split_sizes; only real tokens travel."""

    mode = "dp"

    def __init__(self, group, size: int, rank: int, symmetric: bool = False):
        self.group, self.size, self.rank, self.symmetric = group, size, rank, symmetric
        self.backend = str(dist.get_backend(group))

    def __call__(self, enc: T5Encoder, input_ids, attention_mask=None) -> torch.Tensor:
        check_encoder_device(enc, self.mode, self.backend)
        ids, mask, _ = _prepare(input_ids, attention_mask)
        real = mask.ne(0)
        rows = split_sizes(ids.shape[0], self.size)
        starts = [sum(rows[:j]) for j in range(self.size)]
        # tokens each rank contributes: every rank sees the full mask, so all agree on the sizes
        token_sizes = [int(real[s:s + n].sum()) for s, n in zip(starts, rows)]
        lo, hi = starts[self.rank], starts[self.rank] + rows[self.rank]
        weight = enc.norm.weight
        if hi > lo:
            _, my_mask, keep = _prepare(ids[lo:hi], mask[lo:hi])
            hidden = enc.forward_local(ids[lo:hi, :keep], my_mask[:, :keep])
            mine = hidden[real[lo:hi, :keep]]  # [tokens of my prompts, d], prompt-major
        else:
            mine = torch.empty(0, enc.config.d_model, dtype=weight.dtype, device=weight.device)
        # [T_r, d] real tokens of my prompts -> all_gather_v -> [sum_r T_r, d] (no padding anywhere)
        gathered = all_gather_v(mine, 0, token_sizes, self.group, self.symmetric)
        out = gathered.new_zeros(*ids.shape, gathered.shape[-1])
        out[real] = gathered
        return out


class TensorParallelPlan:
    """Runs a sharded encoder (enc.shard) with the residual stream split over the B*L tokens."""

    mode = "tp"

    def __init__(self, group, size: int, rank: int, symmetric: bool = False):
        self.group, self.size, self.rank, self.symmetric = group, size, rank, symmetric
        self.backend = str(dist.get_backend(group))

    def _embed(self, enc: T5Encoder, flat_ids: torch.Tensor) -> torch.Tensor:
        """Vocab-parallel lookup: [T] ids -> [T, d] with this rank's rows, zeros for the others'."""
        v0, v1 = enc.shard.ranges(enc.config)["vocab"]
        weight = enc.token_embedding.weight
        here = (flat_ids >= v0) & (flat_ids < v1)
        if v1 == v0:
            return weight.new_zeros(flat_ids.shape[0], weight.shape[1])
        emb = enc.token_embedding((flat_ids - v0).clamp(0, v1 - v0 - 1))
        return emb.masked_fill(~here[:, None], 0)

    def __call__(self, enc: T5Encoder, input_ids, attention_mask=None) -> torch.Tensor:
        check_encoder_device(enc, self.mode, self.backend)
        ids, mask, keep = _prepare(input_ids, attention_mask)
        ids_k, mask_k = ids[:, :keep], mask[:, :keep]
        b, length = ids_k.shape
        d = enc.config.d_model
        sizes = split_sizes(b * length, self.size)  # tokens per rank between blocks; any remainder
        g, symm = self.group, self.symmetric
        # exactly one rank holds each token's row, so the sum over ranks is the lookup itself
        # [B*L, d] (zeros off this rank's vocab rows) -> reduce_scatter_v -> [T_r, d]
        x = reduce_scatter_v(self._embed(enc, ids_k.reshape(-1)), 0, sizes, g, symm)
        buckets = enc.buckets(length, ids.device)
        mask_bias = padding_bias(mask_k, x.dtype)
        for block in enc.blocks:
            # [T_r, d] -> all_gather_v -> [B*L, d]
            h = all_gather_v(block.norm1(x), 0, sizes, g, symm)
            a = block.attn(h.view(b, length, d), buckets, mask_bias)  # partial sums over head shards
            # [B*L, d] partial -> reduce_scatter_v -> [T_r, d] summed
            x = x + reduce_scatter_v(a.reshape(b * length, d), 0, sizes, g, symm)
            # [T_r, d] -> all_gather_v -> [B*L, d]
            h = all_gather_v(block.norm2(x), 0, sizes, g, symm)
            # [B*L, d] partial sums over FFN column shards -> reduce_scatter_v -> [T_r, d]
            x = x + reduce_scatter_v(block.ffn(h), 0, sizes, g, symm)
        # [T_r, d] -> all_gather_v -> [B*L, d]
        out = all_gather_v(enc.norm(x), 0, sizes, g, symm)
        return _pad_to(out.view(b, length, d), mask)


def shard_encoder(enc: T5Encoder, shard: T5Shard) -> T5Encoder:
    """Cut a full encoder down to `shard`'s slices in place (the full weights are released)."""
    cfg = enc.config
    sharded = shard.build(cfg)  # meta tensors with the shard's shapes
    if any(n.endswith(".weight_scale") for n, _ in enc.named_parameters()):  # text_encoder.quant=fp8
        quantize_linears(sharded, T5_LINEARS)
    state = {}
    for name, p in enc.named_parameters():
        piece = shard.param_slice(name, cfg)
        t = p.detach()
        if piece is not None:
            dim, start, stop = piece
            t = t.narrow(dim, start, stop - start).clone()
        state[name] = t
    sharded.load_state_dict(state, strict=True, assign=True)
    enc.token_embedding = sharded.token_embedding
    enc.blocks = sharded.blocks
    enc.norm = sharded.norm
    enc.shard = shard
    return enc.requires_grad_(False)


def parallelize_t5(enc: T5Encoder, dims, mode: str = "replicate", group=None,
                   symmetric_memory: bool = False) -> T5Encoder:
    """Install `mode` on `enc` (in place; also returned).

    `group`: the ranks that share the work; by default every rank of the job (`dims.world_group`).
    `symmetric_memory`: allocate the collectives' buffers from NCCL symmetric memory where the
    build supports it (comm.symmetric_memory); it applies to this encoder's collectives only.
    """
    if mode not in MODES:
        raise ValueError(f"text encoder parallel mode {mode!r} is not one of {list(MODES)}")
    group = group if group is not None else getattr(dims, "world_group", None)
    size, rank = group_size_rank(group)
    if enc.shard is not None and (mode != "tp" or enc.shard != T5Shard(rank, size)):
        raise ValueError(f"this encoder holds the tensor-parallel shard {enc.shard}, which cannot run as "
                         f"mode={mode!r} on rank {rank} of {size}; load it without a shard, or with "
                         f"T5Shard({rank}, {size}) for tp")
    if mode == "replicate" or size == 1:
        enc.parallel_forward = ReplicatePlan()
        return enc
    symmetric = symmetric_memory and _symmetric.activate(group)
    if mode == "dp":
        enc.parallel_forward = DataParallelPlan(group, size, rank, symmetric)
    else:
        shard = T5Shard(rank, size)
        shard.check(enc.config)
        if enc.shard is None:
            shard_encoder(enc, shard)
        enc.parallel_forward = TensorParallelPlan(group, size, rank, symmetric)
    return enc


def load_parallel_t5(path, dims, mode: str = "replicate", dtype=None, device="cpu", group=None,
                     symmetric_memory: bool = False) -> T5Encoder:
    """Load and lay out in one step; with mode="tp" each rank reads only its own slices from disk."""
    if mode not in MODES:
        raise ValueError(f"text encoder parallel mode {mode!r} is not one of {list(MODES)}")
    group = group if group is not None else getattr(dims, "world_group", None)
    size, rank = group_size_rank(group)
    shard = T5Shard(rank, size) if mode == "tp" and size > 1 else None
    enc = T5Encoder.from_pretrained(path, dtype=dtype, device=device, shard=shard)
    return parallelize_t5(enc, dims, mode, group=group, symmetric_memory=symmetric_memory)
