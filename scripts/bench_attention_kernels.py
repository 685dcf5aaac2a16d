"""Local attention kernels side by side at Wan2.1 shapes: time per call and achieved TFLOP/s.

python scripts/bench_attention_kernels.py            (CUDA; every registered backend that takes bf16)
Also times ulysses_attention with a group of one against the kernel called directly (its overhead).
FLOPs per call: 4 * B * S^2 * H * D (two matrix products of 2 * S^2 * D per head).
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from lightx2v_sp.attention import attention, available_backends, ulysses_attention  # noqa: E402
from lightx2v_sp.attention.backends import kernel_info, resolve_backend  # noqa: E402
from lightx2v_sp.benchmarking import median_seconds  # noqa: E402

# Wan2.1 token counts: 480p 21x60x104 latents -> 32760 tokens, 720p 21x90x160 -> 75600 tokens
SHAPES = {"1.3B 480p": (32760, 12), "1.3B 720p": (75600, 12), "14B 480p": (32760, 40), "14B 720p": (75600, 40)}


def cuda_time(fn, warmup: int, iters: int) -> float:
    return median_seconds(fn, torch.device("cuda"), warmup, iters)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--shapes", nargs="*", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_attention_kernels needs a CUDA GPU")
    rows = []
    for shape in args.shapes:
        s, h = SHAPES[shape]
        q, k, v = (torch.randn(1, s, h, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        flops = 4 * s * s * h * 128
        names = [n for n in available_backends()
                 if n not in ("sdpa_math", "flash_attn") and kernel_info(n).supports(q.device, q.dtype, 128)]
        ref = attention(q, k, v, backend="sdpa_cudnn" if "sdpa_cudnn" in names else "sdpa").float()
        for name in names:
            t = cuda_time(lambda: attention(q, k, v, backend=name), args.warmup, args.iters)
            err = ((attention(q, k, v, backend=name).float() - ref).norm() / ref.norm()).item()
            kind = "exact" if kernel_info(name).exact else "lossy"
            rows.append((shape, f"{name} ({kind}, rel. diff {err:.1e})", t * 1e3, flops / t / 1e12))
        del ref
        t_direct = cuda_time(lambda: attention(q, k, v), args.warmup, args.iters)
        t_uly = cuda_time(lambda: ulysses_attention(q, k, v, group=None), args.warmup, args.iters)
        auto = resolve_backend("auto", q.device, q.dtype, 128)
        rows.append((shape, f"auto -> {auto}, called directly", t_direct * 1e3, flops / t_direct / 1e12))
        rows.append((shape, f"ulysses_attention N=1 ({(t_uly / t_direct - 1) * 100:+.1f}%)", t_uly * 1e3,
                     flops / t_uly / 1e12))
        del q, k, v
    print(f"Local attention kernels, bf16, [1, S, H, 128], {torch.cuda.get_device_name()}, torch {torch.__version__}, "
          f"median of {args.iters}\n")
    print("| shape | S | H | backend | ms / call | TFLOP/s |")
    print("|---|---:|---:|---|---:|---:|")
    for shape, name, ms, tflops in rows:
        s, h = SHAPES[shape]
        print(f"| {shape} | {s} | {h} | {name} | {ms:.2f} | {tflops:.0f} |")


if __name__ == "__main__":
    main()
