"""The device's two ceilings, measured: a large bf16 matrix product and a large device-to-device copy.

python scripts/bench_peak.py      (CUDA). The other benchmarks' TFLOP/s and GB/s are read against these.
"""
from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from lightx2v_sp.benchmarking import median_seconds  # noqa: E402

CUDA = torch.device("cuda")


def main() -> None:
    if not torch.cuda.is_available():
        sys.exit("bench_peak needs a CUDA GPU")
    n = 8192
    a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    t_mm = median_seconds(lambda: a @ b, CUDA)
    src = torch.randn(1 << 30, device="cuda", dtype=torch.bfloat16)  # 2 GiB
    dst = torch.empty_like(src)
    t_cp = median_seconds(lambda: dst.copy_(src), CUDA)
    print(f"Device ceilings, {torch.cuda.get_device_name()}, torch {torch.__version__}, median of 20\n")
    print("| ceiling | value |")
    print("|---|---:|")
    print(f"| bf16 matmul 8192^3 (TFLOP/s) | {2 * n ** 3 / t_mm / 1e12:.0f} |")
    print(f"| device copy 2 GiB (GB/s, read + write) | {2 * src.numel() * 2 / t_cp / 1e9:.0f} |")


if __name__ == "__main__":
    main()
