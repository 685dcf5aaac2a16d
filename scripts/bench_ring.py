"""Ring attention on one device: the LSE kernels against SDPA math, and the ring's compute with
simulated peers against the whole-sequence kernel, side by side in one run.

    python scripts/bench_ring.py                     # CUDA, bf16, Wan 14B 720p: S=75600, H=40, D=128
    python scripts/bench_ring.py --backends auto sdpa_cudnn flash_attn4 --rings 2 4 8
    python scripts/bench_ring.py --device cpu        # smoke test at toy sizes, fp32

Part 1 (lse): every registered kernel that returns its log-sum-exp and takes the inputs, on a block
of 1000 queries against 777 keys (the shapes differ, as ring blocks do): relative difference of the
output and max |difference| of the lse against the fp32 math reference on the same (rounded) inputs.
Part 2 (ring): each of R simulated ranks takes its contiguous slice of the queries and runs the
LSE kernel on the R key/value blocks in ring order, then the fp32 merge (attention/ring_merge.py,
the Triton pass on CUDA; also timed with the torch merge): exactly the compute of ring attention on R
GPUs, done one rank after another, without the transfers. Ratio: its time over the whole-sequence
kernel's (the plain kernel `auto` picks without a ring; target <= 1.05). Median of --iters timings.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from lightx2v_sp.attention import attention, available_backends  # noqa: E402
from lightx2v_sp.attention.backends import get_lse_backend, kernel_info, resolve_backend  # noqa: E402
from lightx2v_sp.attention.lse import math_lse  # noqa: E402
from lightx2v_sp.attention.ring_merge import merge_impl, merge_partials  # noqa: E402
from lightx2v_sp.benchmarking import median_seconds  # noqa: E402
from lightx2v_sp.distributed import split_sizes  # noqa: E402

LSE_OUT_REL = {"float32": 1e-5, "bfloat16": 1e-2, "float16": 1e-2}  # kernels on rounded operands: 1e-3..1e-2
LSE_ABS = 1e-3  # fp32 lse from the same inputs: accumulation order only (a log2-based or scaled lse is O(1) off)


def lse_rows(device: torch.device, dtype: torch.dtype, head_dim: int) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 1000, 8, head_dim, generator=g).to(device, dtype)
    k, v = (torch.randn(2, 777, 8, head_dim, generator=g).to(device, dtype) for _ in range(2))
    ref, ref_lse = math_lse(q.float(), k.float(), v.float())
    rows = []
    for name in available_backends():
        info = kernel_info(name)
        if info.lse is None or not info.supports(device, dtype, head_dim):
            continue
        try:  # one kernel that fails is a failed row, not the end of the run
            out, lse = info.lse(q, k, v)
            rel = ((out.float() - ref).norm() / ref.norm()).item()
            err = (lse - ref_lse).abs().max().item() if lse.shape == ref_lse.shape else float("inf")
        except Exception as e:  # noqa: BLE001
            print(f"{name}: {type(e).__name__}: {e}")
            rel = err = float("nan")
        ok = rel <= LSE_OUT_REL[str(dtype)[6:]] and err <= LSE_ABS
        rows.append({"name": name, "source": info.source, "rel": rel, "lse": err, "ok": ok})
    return rows


def simulated_ring(q, k, v, ring: int, kernel, impl: str) -> list[torch.Tensor]:
    """Every simulated rank's output: R blocks of the LSE kernel in ring order, then the merge."""
    sizes = split_sizes(q.shape[1], ring)
    offs = [sum(sizes[:i]) for i in range(ring)]
    outs = []
    for r in range(ring):
        q_r = q[:, offs[r]:offs[r] + sizes[r]]
        parts, lses = [], []
        for step in range(ring):
            j = (r - step) % ring  # the block rank r holds at this step
            out, lse = kernel(q_r, k[:, offs[j]:offs[j] + sizes[j]], v[:, offs[j]:offs[j] + sizes[j]])
            parts.append(out)
            lses.append(lse)
        outs.append(merge_partials(parts, lses, q.dtype, impl=impl))
    return outs


def ring_rows(args, device: torch.device, dtype: torch.dtype) -> tuple[list[dict], str]:
    s, h, d = args.seq, args.heads, args.head_dim
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, s, h, d, generator=g).to(device, dtype) for _ in range(3))
    plain = resolve_backend("auto", device, dtype, d)

    def timed(fn):
        return median_seconds(fn, device, args.warmup, args.iters)

    whole = attention(q, k, v, backend=plain).float()
    t_whole = timed(lambda: attention(q, k, v, backend=plain))
    rows = [{"kernel": f"{plain} (whole sequence, plain)", "ring": 1, "merge": "-", "ms": t_whole * 1e3,
             "ratio": 1.0, "rel": 0.0}]
    impls = ["auto", "torch"] if device.type == "cuda" else ["torch"]
    for backend in args.backends:
        name = resolve_backend(backend, device, dtype, d, need_lse=True)
        kernel = get_lse_backend(backend, q)
        t_lse = timed(lambda: kernel(q, k, v))
        rel = ((kernel(q, k, v)[0].float() - whole).norm() / whole.norm()).item()
        rows.append({"kernel": f"{name} (whole sequence, with lse)", "ring": 1, "merge": "-", "ms": t_lse * 1e3,
                     "ratio": t_lse / t_whole, "rel": rel})
        for ring in args.rings:
            for impl in impls:
                out = torch.cat(simulated_ring(q, k, v, ring, kernel, impl), dim=1).float()
                rel = ((out - whole).norm() / whole.norm()).item()
                del out
                t = timed(lambda: simulated_ring(q, k, v, ring, kernel, impl))
                merge = merge_impl(device) if impl == "auto" else impl
                rows.append({"kernel": name, "ring": ring, "merge": merge, "ms": t * 1e3, "ratio": t / t_whole,
                             "rel": rel})
    return rows, plain


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--backends", nargs="*", default=["auto"], help="kernels for part 2 (auto: the ring's pick)")
    ap.add_argument("--rings", nargs="*", type=int, default=None, help="ring degrees (default 2 4 8; cpu 2 3 4)")
    ap.add_argument("--seq", type=int, default=None, help="tokens (default 75600, Wan 14B 720p; cpu 600)")
    ap.add_argument("--heads", type=int, default=None, help="heads (default 40; cpu 4)")
    ap.add_argument("--head-dim", type=int, default=None, help="head dim (default 128; cpu 32)")
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    args = ap.parse_args()
    cpu = args.device == "cpu"
    if not cpu and not torch.cuda.is_available():
        print("bench_ring: no CUDA device (use --device cpu for the smoke test)")
        return 2
    args.rings = args.rings or ([2, 3, 4] if cpu else [2, 4, 8])
    args.seq, args.heads = args.seq or (600 if cpu else 75600), args.heads or (4 if cpu else 40)
    args.head_dim = args.head_dim or (32 if cpu else 128)
    device = torch.device(args.device)
    dtype = torch.float32 if cpu else torch.bfloat16
    where = "CPU" if cpu else torch.cuda.get_device_name()
    print(f"bench_ring: {where}, torch {torch.__version__}, {str(dtype)[6:]}\n")

    lse = lse_rows(device, dtype, args.head_dim)
    print(f"Part 1: LSE kernels vs fp32 math, q [2, 1000, 8, {args.head_dim}] against 777 keys "
          f"(bounds: output rel {LSE_OUT_REL[str(dtype)[6:]]}, lse abs {LSE_ABS})\n")
    print("| kernel | from | output rel. diff | lse max abs diff | result |\n|---|---|---:|---:|---|")
    for r in lse:
        print(f"| {r['name']} | {r['source']} | {r['rel']:.2e} | {r['lse']:.2e} | {'pass' if r['ok'] else 'FAIL'} |")

    rows, plain = ring_rows(args, device, dtype)
    print(f"\nPart 2: ring attention with simulated peers, [1, {args.seq}, {args.heads}, {args.head_dim}], "
          f"median of {args.iters}; ratio = time / whole-sequence {plain} (target <= 1.05)\n")
    print("| kernel | ring | merge | ms | ratio | rel. diff vs whole |\n|---|---:|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['kernel']} | {r['ring']} | {r['merge']} | {r['ms']:.2f} | {r['ratio']:.3f} | {r['rel']:.1e} |")
    return 0 if all(r["ok"] for r in lse) else 1


if __name__ == "__main__":
    sys.exit(main())
