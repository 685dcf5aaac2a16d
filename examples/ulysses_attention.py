"""Ulysses attention with the public API: each rank holds a slice of the sequence, and the result
equals full attention over the whole sequence.

    torchrun --nproc_per_node 2 examples/ulysses_attention.py     # 2 gloo processes on the CPU
    python examples/ulysses_attention.py                           # one process: no exchange
"""
import os

import torch
import torch.distributed as dist

from lightx2v_sp.attention import attention, ulysses_attention
from lightx2v_sp.distributed import ParallelDims, gather_sequence, shard_sequence


def main() -> None:
    if "RANK" in os.environ:  # started by torchrun
        dist.init_process_group("gloo")
    world = dist.get_world_size() if dist.is_initialized() else 1
    dims = ParallelDims(ulysses_degree=world, cfg_degree=1)  # ulysses x cfg = number of processes

    torch.manual_seed(0)  # every rank builds the same full tensors
    B, S, H, D = 1, 1001, 12, 64  # 1001 tokens: over 2 ranks an uneven split, 501 + 500
    q, k, v = (torch.randn(B, S, H, D) for _ in range(3))
    reference = attention(q, k, v)  # full attention on one process

    q_local, sizes = shard_sequence(q, dim=1, group=dims.sp_group)  # [B, S, H, D] -> [B, S_local, H, D]
    k_local, _ = shard_sequence(k, dim=1, group=dims.sp_group)
    v_local, _ = shard_sequence(v, dim=1, group=dims.sp_group)
    # fp8 sends e4m3 values with one scale per (token, head) row: lossy, within its bound.
    for a2a, comm_dtype, tolerance in (("all_to_all", None, 1e-5), ("round_robin", None, 1e-5),
                                       ("all_to_all", "fp8", 0.1)):
        out_local = ulysses_attention(q_local, k_local, v_local, group=dims.sp_group, seq_sizes=sizes, a2a=a2a,
                                      fuse_qkv=True, comm_dtype=comm_dtype, backend="auto")
        out = gather_sequence(out_local, dim=1, sizes=sizes, group=dims.sp_group)  # the whole sequence
        diff = (out - reference).abs().max().item()
        if dims.rank == 0:
            print(f"ranks {world}, tokens per rank {sizes}, a2a={a2a}, comm_dtype={comm_dtype}: "
                  f"max |ulysses - full| = {diff:.2e}")
        if diff > tolerance:
            raise SystemExit(f"rank {dims.rank}: difference {diff:.2e} is above {tolerance}")
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
