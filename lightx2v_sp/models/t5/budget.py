"""What each text-encoder layout costs a rank: weight bytes held and bytes sent, from the config.

Pure arithmetic on the shapes (weights are counted on the meta device, nothing is allocated), so
it answers for umt5-xxl on a laptop. tests/test_t5_parallel.py checks the communication numbers
against what the collectives record at run time.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from lightx2v_sp.distributed.sequence import split_sizes

from .model import T5Config, T5Encoder
from .shard import T5Shard


def weight_numel(cfg: T5Config, mode: str = "replicate", world_size: int = 1, rank: int = 0) -> dict[str, int]:
    """Parameters held by `rank`: {'embedding', 'blocks', 'other', 'total'}."""
    if mode == "tp" and world_size > 1:
        enc = T5Shard(rank, world_size).build(cfg)
    else:
        with torch.device("meta"):
            enc = T5Encoder(cfg)
    emb = enc.token_embedding.weight.numel()
    blocks = sum(p.numel() for p in enc.blocks.parameters())
    other = sum(p.numel() for p in enc.parameters()) - emb - blocks
    return {"embedding": emb, "blocks": blocks, "other": other, "total": emb + blocks + other}


def encoded_tokens(lengths: Sequence[int]) -> int:
    """Tokens the replicate/tp layouts compute: trailing all-padding columns are skipped."""
    return len(lengths) * max(max(lengths), 1)


def comm_bytes(cfg: T5Config, mode: str, lengths: Sequence[int], world_size: int, rank: int = 0,
               dtype_bytes: int = 2) -> dict[str, dict[str, int]]:
    """Calls and bytes sent by `rank` for one encoder call on prompts of real `lengths`.

    Bytes follow CommStats' convention (what this rank sends): an all-gather sends the rank's
    slice to N-1 peers, a reduce-scatter sends every slice but its own.
    """
    calls: dict[str, int] = {}
    sent: dict[str, int] = {}
    if world_size == 1 or mode == "replicate":
        return {"calls": calls, "bytes": sent}
    row = cfg.d_model * dtype_bytes
    if mode == "dp":
        rows = split_sizes(len(lengths), world_size)
        start = sum(rows[:rank])
        mine = sum(lengths[start:start + rows[rank]])
        calls["all_gather"] = 1
        sent["all_gather"] = mine * row * (world_size - 1)
        return {"calls": calls, "bytes": sent}
    if mode != "tp":
        raise ValueError(f"mode {mode!r} is not replicate, tp or dp")
    total = encoded_tokens(lengths)
    mine = split_sizes(total, world_size)[rank]
    num_rs = 1 + 2 * cfg.num_layers  # embedding + (attention o, FFN fc2) per layer
    num_ag = 2 * cfg.num_layers + 1  # (before q/k/v, before gate/fc1) per layer + final output
    calls.update(reduce_scatter=num_rs, all_gather=num_ag)
    sent.update(reduce_scatter=num_rs * (total - mine) * row, all_gather=num_ag * mine * row * (world_size - 1))
    return {"calls": calls, "bytes": sent}
