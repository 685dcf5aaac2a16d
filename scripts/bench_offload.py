"""Step time and peak GPU memory of the Wan DiT: resident vs block offload, in one run.

One "step" is one DiT forward at batch 1 (one CFG branch). The resident model is timed first,
then its blocks are moved to pinned host memory and streamed with prefetch, and the same
inputs are timed again; the two outputs are compared bit for bit.

    python scripts/bench_offload.py --config 14b --latent 21 60 104 --dtype bf16   # 480p, 81 frames
    python scripts/bench_offload.py --config tiny                                   # CPU smoke test

Without CUDA the offload row runs the same scheduler on a synchronous CPU transport (no
overlap, peak memory n/a): it checks the machinery, it says nothing about speed.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lightx2v_sp.models.wan import WanConfig, WanModel  # noqa: E402
from lightx2v_sp.offload import (CudaTransport, HostTransport, gib, offload_dit_blocks,  # noqa: E402
                                 peak_memory_bytes, reset_peak_memory)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class SerialTransport(CudaTransport):
    """Ablation: the host waits for every copy, so no copy overlaps any compute."""

    def copy_async(self, dst, src, after=None):
        event = super().copy_async(dst, src, after)
        event.synchronize()
        return event


def build_config(name: str, layers: int | None) -> WanConfig:
    if name == "tiny":
        cfg = WanConfig(dim=128, num_heads=4, num_layers=4, ffn_dim=256, text_dim=64, freq_dim=32)
    else:
        cfg = WanConfig.named(name)
    if layers is not None:
        cfg.num_layers = layers
    return cfg


def build_model(cfg: WanConfig, dtype: torch.dtype, device: torch.device) -> WanModel:
    # Random weights, created directly on the device in the compute dtype (a 14B fp32 model
    # would need 56 GB first); set_dtype then puts the fp32-only tables back in fp32.
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype if dtype != torch.float16 else torch.float32)
    try:
        with torch.device(device):
            model = WanModel(cfg)
    finally:
        torch.set_default_dtype(default)
    return model.set_dtype(dtype).eval()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(model, inputs, device, warmup: int, iters: int, on_timed=lambda: None):
    with torch.no_grad():
        for _ in range(warmup):
            out = model(*inputs)
        reset_peak_memory(device)
        on_timed()
        times = []
        for _ in range(iters):
            sync(device)
            start = time.perf_counter()
            out = model(*inputs)
            sync(device)
            times.append(time.perf_counter() - start)
    return times, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="tiny", choices=["tiny", "1.3b", "14b"])
    ap.add_argument("--latent", type=int, nargs=3, default=None, metavar=("F", "H", "W"),
                    help="latent frames, height, width (480p 81 frames: 21 60 104); default: small")
    ap.add_argument("--layers", type=int, default=None, help="cap the number of blocks")
    ap.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    ap.add_argument("--text-len", type=int, default=512)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    ap.add_argument("--ablation", action="store_true",
                    help="also time block offload with prefetch overlap disabled (CUDA only)")
    args = ap.parse_args()

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    dtype = DTYPES[args.dtype]
    if device.type == "cpu" and args.config != "tiny":
        raise SystemExit(f"--config {args.config} on the CPU would take hours; use --config tiny")
    latent = args.latent or ((3, 8, 8) if args.config == "tiny" else (5, 30, 52))
    text_len = min(args.text_len, 16) if args.config == "tiny" else args.text_len

    cfg = build_config(args.config, args.layers)
    torch.manual_seed(0)
    model = build_model(cfg, dtype, device)
    g = torch.Generator(device=device).manual_seed(1)
    inputs = (torch.randn(1, cfg.in_dim, *latent, device=device, generator=g),
              torch.tensor([700.0], device=device),
              torch.randn(1, text_len, cfg.text_dim, device=device, generator=g))
    tokens = (latent[0] // cfg.patch_size[0]) * (latent[1] // cfg.patch_size[1]) * (latent[2] // cfg.patch_size[2])
    weights = sum(p.numel() * p.element_size() for p in model.parameters())

    rows = []
    times, ref_out = time_steps(model, inputs, device, args.warmup, args.iters)
    ref_out = ref_out.clone()
    rows.append(("resident", statistics.median(times), peak_memory_bytes(device), None))

    transport = None if device.type == "cuda" else HostTransport()
    start = time.perf_counter()
    handle = offload_dit_blocks(model, device, transport=transport)
    setup_s = time.perf_counter() - start
    if device.type == "cuda":
        torch.cuda.empty_cache()
    before = []
    times, out = time_steps(model, inputs, device, args.warmup, args.iters,
                            on_timed=lambda: before.append(handle.stats()["block_copies"]))
    copies = (handle.stats()["block_copies"] - before[0]) / args.iters
    rows.append(("block offload", statistics.median(times), peak_memory_bytes(device), copies))
    identical = torch.equal(out, ref_out)
    if args.ablation and device.type == "cuda":
        handle.remove()  # blocks back on the GPU, then offload again without overlap
        handle = offload_dit_blocks(model, device, transport=SerialTransport(device))
        torch.cuda.empty_cache()
        times, out = time_steps(model, inputs, device, args.warmup, args.iters)
        rows.append(("block offload, copies not overlapped (ablation)", statistics.median(times),
                     peak_memory_bytes(device), None))
        identical = identical and torch.equal(out, ref_out)

    where = (torch.cuda.get_device_name(device) if device.type == "cuda"
             else "CPU (HostTransport, no overlap; a smoke test, its timings mean nothing)")
    print(f"\nWan {args.config}: {cfg.num_layers} blocks, dim {cfg.dim}, {args.dtype}, latent {tuple(latent)} "
          f"= {tokens} tokens, text {text_len}; weights {weights / 2**30:.2f} GiB, "
          f"block {handle.stats()['block_bytes'] / 2**20:.1f} MiB; on {where}")
    print(f"torch {torch.__version__}; offload setup (pin + pack) {setup_s:.1f} s; "
          f"median of {args.iters} steps after {args.warmup} warm-up; offload output bit-identical: {identical}\n")
    print("| mode | step time median (ms) | vs resident | peak GPU memory (GiB) | block copies / step |")
    print("| --- | ---: | ---: | ---: | ---: |")
    base = rows[0][1]
    for mode, t, peak, copies in rows:
        peak_s = "n/a" if peak is None else f"{gib(peak):.2f}"
        copies_s = "-" if copies is None else f"{copies:.1f}"
        print(f"| {mode} | {t * 1e3:.1f} | {t / base:.3f}x | {peak_s} | {copies_s} |")
    if not identical:
        raise SystemExit("block offload output differs from the resident model")


if __name__ == "__main__":
    main()
