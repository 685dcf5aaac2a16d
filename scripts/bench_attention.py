"""Ulysses variants side by side: time per call, bytes and calls on the wire, error vs all_to_all.

CPU (spawns gloo ranks):   python scripts/bench_attention.py --world 4 --shape 1 2048 12 128
GPUs (NCCL, one per rank): torchrun --nproc_per_node 8 scripts/bench_attention.py --shape 1 32760 40 128
"""
from __future__ import annotations

import argparse
import itertools
import os
import statistics
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from lightx2v_sp.attention import ulysses_attention  # noqa: E402
from lightx2v_sp.distributed import CommStats, split_sizes  # noqa: E402
from lightx2v_sp.benchmarking import time_once  # noqa: E402
from lightx2v_sp.testing import run_on_ranks  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def bench(rank: int, world: int, args) -> list[dict]:
    device = torch.device("cuda", rank % torch.cuda.device_count()) if args.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    group = dist.group.WORLD if world > 1 else None
    b, s, h, d = args.shape
    dtype = DTYPES[args.dtype]
    sizes = split_sizes(s, world)
    rows = slice(sum(sizes[:rank]), sum(sizes[:rank + 1]))
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(b, s, h, d, generator=g)[:, rows].to(device, dtype).contiguous() for _ in range(3))
    rows_out, baseline = [], None
    variants = list(itertools.product(["all_to_all", "round_robin"], [True, False], [None, "fp8"]))
    for a2a, fuse, comm in variants:
        def call():
            return ulysses_attention(q, k, v, group=group, seq_sizes=sizes, a2a=a2a, fuse_qkv=fuse,
                                     comm_dtype=comm, backend=args.backend)
        stats = CommStats()
        with stats.record():
            out = call()
        for _ in range(args.warmup):
            call()
        times = []
        for _ in range(args.iters):
            if group is not None:
                dist.barrier(group)
            times.append(time_once(call, device))
        if baseline is None:
            baseline = out.float()
        err = (out.float() - baseline).abs().max()
        if group is not None:  # worst rank: max of errors and times
            t = torch.tensor([statistics.median(times), err.item()], device=device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
            med, err = t.tolist()
        else:
            med, err = statistics.median(times), err.item()
        rows_out.append(dict(a2a=a2a, fuse_qkv=fuse, comm=comm or args.dtype, ms=med * 1e3,
                             calls=stats.total_calls, mib=stats.total_bytes / 2**20, err=err))
    return rows_out


def table(rows, args, world, device_name) -> str:
    bf = {(r["a2a"], r["fuse_qkv"]): r["mib"] for r in rows if r["comm"] != "fp8"}
    lines = [f"Ulysses attention, N={world}, shape [B,S,H,D]={args.shape}, {args.dtype}, {device_name}, "
             f"median of {args.iters}",
             "", "| a2a | fuse_qkv | wire dtype | ms / call | calls | MiB sent (rank 0) | bytes vs unquantized | max err vs all_to_all |",
             "|---|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        ratio = r["mib"] / bf[(r["a2a"], r["fuse_qkv"])] if bf[(r["a2a"], r["fuse_qkv"])] else float("nan")
        lines.append(f"| {r['a2a']} | {r['fuse_qkv']} | {r['comm']} | {r['ms']:.2f} | {r['calls']} | "
                     f"{r['mib']:.2f} | {ratio:.3f} | {r['err']:.2e} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world", type=int, default=2, help="ranks to spawn on CPU (ignored under torchrun)")
    p.add_argument("--shape", type=int, nargs=4, default=[1, 1024, 12, 128], metavar=("B", "S", "H", "D"))
    p.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--backend", default="auto")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    args = p.parse_args()
    if "WORLD_SIZE" in os.environ:  # under torchrun
        world, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
        if world > 1:
            dist.init_process_group("nccl" if args.device == "cuda" else "gloo")
        rows = bench(rank, world, args)
        name = torch.cuda.get_device_name() if args.device == "cuda" else "CPU/gloo"
        if rank == 0:
            print(table(rows, args, world, name))
        if world > 1:
            dist.destroy_process_group()
    else:
        if args.device == "cuda" and args.world > 1:
            sys.exit("for several GPUs use torchrun --nproc_per_node N scripts/bench_attention.py")
        rows = run_on_ranks(bench, args.world, args, timeout=1800)[0] if args.world > 1 else bench(0, 1, args)
        name = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU/gloo, {args.world} processes"
        print(table(rows, args, args.world, name))


if __name__ == "__main__":
    main()
