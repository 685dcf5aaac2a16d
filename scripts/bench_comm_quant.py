"""FP8 wire codec throughput: pack+quantize and unpack+dequantize vs a device copy of the same bytes.

python scripts/bench_comm_quant.py --rows 1048576 --dim 128     (CUDA: torch and Triton side by side)
Bandwidth counts bytes read plus bytes written, as for the copy.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from lightx2v_sp.benchmarking import median_seconds  # noqa: E402
from lightx2v_sp.distributed.comm_quant import dequantize_into, packed_row_bytes, quantize_into  # noqa: E402


def timeit(fn, iters, device) -> float:
    return median_seconds(fn, device, 3, iters)


def run(rows: int, dim: int, dtype: torch.dtype, device: torch.device, iters: int) -> list[dict]:
    x = torch.randn(rows, dim, device=device).to(dtype)
    packed = torch.empty(rows, packed_row_bytes(dim), dtype=torch.uint8, device=device)
    out = torch.empty_like(x)
    q_bytes = x.numel() * x.element_size() + packed.numel()  # read x, write packed
    results = []
    copy_src = torch.empty(q_bytes // 2, dtype=torch.uint8, device=device)
    copy_dst = torch.empty_like(copy_src)
    t_copy = timeit(lambda: copy_dst.copy_(copy_src), iters, device)
    copy_bw = 2 * copy_src.numel() / t_copy
    results.append(dict(op="device copy (same bytes)", impl="torch", ms=t_copy * 1e3, gbps=copy_bw / 1e9, frac=1.0))
    impls = ["torch", "triton"] if device.type == "cuda" else ["torch"]
    for impl in impls:
        tq = timeit(lambda: quantize_into(x, packed, impl=impl), iters, device)
        td = timeit(lambda: dequantize_into(packed, out, impl=impl), iters, device)
        for op, t in (("pack+quantize", tq), ("unpack+dequantize", td)):
            bw = q_bytes / t
            results.append(dict(op=op, impl=impl, ms=t * 1e3, gbps=bw / 1e9, frac=bw / copy_bw))
    return results


def table(results, args, device_name) -> str:
    lines = [f"FP8 codec, {args.rows} rows x D={args.dim}, {args.dtype}, {device_name}, median of {args.iters}", "",
             "| op | impl | ms | GB/s (read+write) | vs copy |", "|---|---|---:|---:|---:|"]
    lines += [f"| {r['op']} | {r['impl']} | {r['ms']:.3f} | {r['gbps']:.0f} | {r['frac']:.2f} |" for r in results]
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--rows", type=int, default=1 << 20)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16")
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    device = torch.device(args.device)
    results = run(args.rows, args.dim, dtype, device, args.iters)
    print(table(results, args, torch.cuda.get_device_name() if device.type == "cuda" else "CPU"))
    return results


if __name__ == "__main__":
    main()
