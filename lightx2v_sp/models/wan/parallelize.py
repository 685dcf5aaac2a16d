"""parallelize_wan: Ulysses sequence parallelism on a WanModel, without a second copy of its forward.

Every rank passes the full inputs and gets the full output. Inside, each rank keeps a contiguous
slice of the tokens (uneven when the token count is not divisible). The split and gather points
are the table SEQUENCE_PLAN below, installed as forward hooks:

- the patch embedding's tokens and the RoPE tables are cut to this rank's slice, so RoPE keeps
  the global positions of the slice;
- per-token timesteps (Wan2.2 TI2V, [B, S]) are cut like the tokens, before the time embedding,
  so the modulation of each token stays with it;
- self-attention is Ulysses attention (heads scattered, whole sequence per head group), or with
  ring_degree > 1 Ulysses x ring (attention/ring.py: the tokens are split over the whole sequence
  group of ulysses x ring ranks, and K/V blocks travel around the ring);
  cross-attention, the FFN and the modulation are per-token and run on the slice unchanged;
- the output is gathered after the head: the head is per-token too, so gathering its output
  moves out_dim * prod(patch) = 64 values per token instead of dim (24x fewer bytes for the
  1.3B model, 80x for the 14B), and the head runs on 1/P of the tokens.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from lightx2v_sp.attention import ulysses_attention
from lightx2v_sp.attention.backends import require_lse
from lightx2v_sp.attention.options import UlyssesOptions
from lightx2v_sp.attention.ring import usp_attention
from lightx2v_sp.distributed import ParallelDims, gather_sequence, shard_sequence

from .model import WanModel


@dataclass
class SequenceShard:
    """This rank's place in the sequence group, and the token split of the forward in flight.

    `group` splits the tokens (ParallelDims.sp_group); with a ring, `ulysses_group` and `ring_group`
    are its two axes (None: no ring, `group` is the Ulysses group)."""
    group: object
    sizes: list[int] = field(default_factory=list)
    ulysses_group: object = None
    ring_group: object = None


class UlyssesSelfAttention:
    """The `attn_fn` of a parallel self-attention: q, k, v [B, S_local, H, D] -> [B, S_local, H, D]."""

    def __init__(self, shard: SequenceShard, options: UlyssesOptions):
        self.shard, self.options = shard, options

    def with_backend(self, backend: str) -> "UlyssesSelfAttention":
        """The same exchange around another local kernel (WanModel.set_attention_backend calls this)."""
        return UlyssesSelfAttention(self.shard, replace(self.options, backend=backend))

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        shard = self.shard
        if shard.ring_group is not None:
            # [B, S/P, H, D] -> all_to_all -> [B, S_chunk, H/U, D] -> ring -> all_to_all -> [B, S/P, H, D]
            return usp_attention(q, k, v, shard.ulysses_group, shard.ring_group, shard.sizes, self.options)
        # [B, S/P, H, D] -> all_to_all -> [B, S, H/P, D] -> local attention -> all_to_all -> [B, S/P, H, D]
        return ulysses_attention(q, k, v, group=shard.group, seq_sizes=shard.sizes, options=self.options)


def _split_tokens(shard: SequenceShard):
    def hook(module, args, tokens):
        # [B, S, dim] (every rank) -> [B, S_r, dim] (this rank's contiguous slice)
        local, shard.sizes = shard_sequence(tokens, dim=1, group=shard.group)
        return local
    return hook


def _split_rope(shard: SequenceShard):
    def hook(module, args, tables):
        # ([S, 1, D], [S, 1, D]) -> ([S_r, 1, D], [S_r, 1, D]): the global positions of this rank's tokens
        out = []
        for t in tables:
            local, sizes = shard_sequence(t, dim=0, group=shard.group)
            assert sizes == shard.sizes, f"RoPE split {sizes} differs from the token split {shard.sizes}"
            out.append(local)
        return tuple(out)
    return hook


def _split_token_times(shard: SequenceShard):
    def pre_hook(module, args):
        # per-token timesteps (Wan2.2 TI2V): [B, S, freq] -> [B, S_r, freq], cut like the tokens;
        # one timestep per sample ([B, freq]) passes unchanged
        (freqs,) = args
        if freqs.ndim != 3:
            return None
        local, sizes = shard_sequence(freqs, dim=1, group=shard.group)
        assert sizes == shard.sizes, f"timestep split {sizes} differs from the token split {shard.sizes}"
        return (local,)
    return pre_hook


def _gather_output(shard: SequenceShard):
    def hook(module, args, out):
        # [B, S_r, C*pt*ph*pw] -> all_gather -> [B, S, C*pt*ph*pw] on every rank
        return gather_sequence(out, dim=1, sizes=shard.sizes, group=shard.group)
    return hook


# The one place that says where the sequence is split and gathered: (submodule, hook, on its input
# ("pre") or on its output ("post")). Runs in this order in the forward.
SEQUENCE_PLAN = (
    ("patch_embedding", _split_tokens, "post"),
    ("rope", _split_rope, "post"),
    ("time_embedding", _split_token_times, "pre"),
    ("head", _gather_output, "post"),
)


def parallelize_wan(model: WanModel, dims: ParallelDims, a2a: str = "all_to_all", fuse_qkv: bool = True,
                    comm_dtype: str | None = None, backend: str = "auto",
                    options: UlyssesOptions | None = None) -> WanModel:
    """Install sequence parallelism over `dims.sp_group`: Ulysses, x ring when dims.ring_degree > 1 (the
    CFG axis belongs to the runner).

    The variant is `options` (the runner passes `UlyssesOptions.from_config(cfg)`), or else the four
    loose keywords. The local kernel of every attention (self and cross) is chosen here too.
    """
    if options is None:
        options = UlyssesOptions(a2a=a2a, fuse_qkv=fuse_qkv, comm_dtype=comm_dtype, backend=backend)
    if getattr(model, "_sequence_shard", None) is not None:
        raise ValueError("parallelize_wan was already applied to this model; a second plan would split the "
                         "tokens twice")
    model.set_attention_backend(options.backend)
    if dims.sp_size == 1:
        return model
    dims.check_heads(model.config.num_heads)
    shard = SequenceShard(group=dims.sp_group)
    if dims.ring_degree > 1:
        require_lse(options.backend)  # before the first forward, not inside it
        shard.ulysses_group, shard.ring_group = dims.ulysses_group, dims.ring_group
    for block in model.blocks:
        block.self_attn.attn_fn = UlyssesSelfAttention(shard, options)
    model._sequence_hooks = [
        model.get_submodule(name).register_forward_pre_hook(make(shard)) if when == "pre"
        else model.get_submodule(name).register_forward_hook(make(shard)) for name, make, when in SEQUENCE_PLAN]
    model._sequence_shard = shard
    return model
