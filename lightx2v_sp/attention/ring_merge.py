"""Merging attention over blocks of keys: partial outputs and their log-sum-exp -> the whole softmax.

Block j of the keys gives o_j = softmax(s_j) v_j and lse_j = log sum exp(s_j) for every query
row. Over all blocks, softmax(s) v = sum_j w_j o_j with w_j = exp(lse_j - log sum_i exp(lse_i)),
i.e. w = softmax over the blocks of the lse: the weights are computed in fp32 and the weighted
sum is accumulated in fp32, once, after the last block, then rounded to the output dtype.

Why all at once rather than a running merge after each block: a running fp32 accumulator is read
and written once per block (10 bytes per value per block in bf16), while this reads each partial
once (2 bytes) and writes the result once. At Wan 14B 720p that is the difference between a merge
worth about 5% of the attention time at ring 8 and about 1% (scripts/bench_ring.py measures it).
The price is holding the R partial outputs of a rank until the end (the memory plan counts them).

On CUDA one Triton kernel (ring_merge_triton.py) does the weighted sum in a single pass; elsewhere,
or where it cannot run, torch does it one block at a time (`addcmul_` into an fp32 accumulator).
"""
from __future__ import annotations

import contextlib
import logging

import torch

log = logging.getLogger(__name__)

_fused = None  # the Triton module; False where it cannot be imported or failed to run


def merge_weights(lses: list[torch.Tensor]) -> torch.Tensor:
    """[B, H, S] fp32 per block -> [n, B, S, H] fp32 weights (softmax over the blocks), contiguous."""
    return torch.softmax(torch.stack(lses).float(), dim=0).permute(0, 1, 3, 2).contiguous()


def merge_torch(parts: list[torch.Tensor], weights: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    acc = parts[0].float() * weights[0].unsqueeze(-1)
    for part, w in zip(parts[1:], weights[1:]):
        acc.addcmul_(part, w.unsqueeze(-1))  # fp32 += block output x its weight
    return acc.to(dtype)


def _fused_module():
    """The Triton merge, imported on the first CUDA merge (optional: Triton, CUDA), or False."""
    global _fused
    if _fused is None:
        _fused = False
        with contextlib.suppress(ImportError):
            from . import ring_merge_triton

            _fused = ring_merge_triton
    return _fused


def merge_partials(parts: list[torch.Tensor], lses: list[torch.Tensor], dtype: torch.dtype,
                   impl: str = "auto") -> torch.Tensor:
    """Partial outputs [B, S, H, D] (any float dtype) and their lse [B, H, S] -> the merged output.

    impl: "auto" (Triton on CUDA where it runs, torch otherwise), "torch" or "triton".
    """
    global _fused
    if len(parts) == 1 and impl != "triton":
        return parts[0].to(dtype)  # one block: its own softmax is the whole one (weight exactly 1)
    weights = merge_weights(lses)
    if impl != "torch" and parts[0].is_cuda:
        fused = _fused_module()
        if fused:
            try:
                return fused.merge(parts, weights, dtype)
            except Exception as e:  # noqa: BLE001 - a Triton build that cannot compile it: torch still merges
                if impl == "triton":
                    raise
                log.warning("ring attention: the Triton merge failed (%s: %s); merging with torch from now on",
                            type(e).__name__, e)
                _fused = False
        elif impl == "triton":
            raise ValueError("the Triton merge is not available here (Triton is not installed)")
    elif impl == "triton":
        raise ValueError(f"the Triton merge needs CUDA tensors, got {parts[0].device}")
    return merge_torch(parts, weights, dtype)


def merge_impl(device: torch.device) -> str:
    """Which merge runs on `device` now: "triton" or "torch" (for benchmark tables and summaries)."""
    return "triton" if torch.device(device).type == "cuda" and _fused_module() else "torch"
