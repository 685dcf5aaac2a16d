"""Step caching on one device: what a decision costs, what a skipped forward costs, and a whole run.

python scripts/bench_cache.py                        (GPU: Wan2.1-T2V-1.3B shapes, 81x480x832, bf16, 50 steps)
python scripts/bench_cache.py --config tiny --device cpu --steps 12      (smoke test)

Random weights at real shapes, built on the device (as bench_e2e.py does); random text contexts of
umt5-xxl's shape stand in for the text stage, so the runs are the denoise stage only (no text encoder,
no VAE). Measured side by side in one process:
1. per DiT forward (median of --reps, CUDA-synchronised): the plain forward; the cached forward when the
   decision says "compute" (TeaCache: the time-embedding change and the rescale polynomial; first-block:
   block 0's residual change, summed and read back); the cached forward when it says "skip" (TeaCache /
   MagCache: embeddings + residual add + head; first-block: the same plus block 0);
2. the whole --steps CFG run without caching, with TeaCache and with MagCache at the published Wan2.1-T2V
   values for 1.3B (threshold 0.08; E 0.12, K 4, 20% always computed), with the DiT forwards that ran
   their blocks.

What random weights mean for 2.: MagCache's decisions come from the published per-step ratio table only,
so its skip pattern is the one the real 1.3B model would get; TeaCache's come from the time embedding's
change through this (random) model's time-embedding layers, so its pattern is NOT the real model's. The
quality of any skip pattern can only be judged with the real weights, which were not available here.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench_e2e import on_device  # noqa: E402
from lightx2v_sp.config import load_config  # noqa: E402
from lightx2v_sp.distributed import ParallelDims  # noqa: E402
from lightx2v_sp.models.wan import WanConfig, WanModel  # noqa: E402
from lightx2v_sp.pipeline.cache import StepCache, resolve_cache  # noqa: E402
from lightx2v_sp.pipeline.denoise import denoise  # noqa: E402
from lightx2v_sp.pipeline.latents import initial_latents, latent_shape  # noqa: E402
from lightx2v_sp.pipeline.text import TextContexts  # noqa: E402

SIZES = {"1.3b": dict(height=480, width=832, frames=81), "tiny": dict(height=64, width=64, frames=9)}
PUBLISHED = "wan2.1-t2v"  # the settings are resolved as for Wan2.1-T2V-1.3B (dim 1536), also for --config tiny


def settings(cfg_overrides: list, steps: int):
    cfg = load_config(None, [f"sample.steps={steps}", *cfg_overrides])
    return resolve_cache(cfg, PUBLISHED, 1536)


def timed(fn, device, reps: int) -> float:
    """Median seconds of `reps` calls (after one warm-up call)."""
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    fn()
    times = []
    for _ in range(reps):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def per_forward(model, x, t, ctx, steps: int, device, reps: int) -> dict:
    dims = ParallelDims()
    for _ in range(3):  # kernels picked, caches warm
        model(x, t, ctx)
    before = timed(lambda: model(x, t, ctx), device, reps)
    out = {}

    def cached(overrides: list, skip: bool):
        s = settings(overrides + ["cache.start_steps=0", "cache.end_steps=0"], steps)
        cache = StepCache(s, dims)
        cache.begin_step(0)
        cache.forward(model, 0, x, t, ctx)  # step 0 computes: the branch has a residual from here on
        step = [1]

        def call():
            cache.begin_step(step[0] % steps or 1)  # never step 0, so every call is a decision
            step[0] += 1
            cache.forward(model, 0, x, t, ctx)
        seconds = timed(call, device, reps)
        record = cache.summary()["branches"]["cond"]
        assert (len(record["skipped"]) == reps + 1) if skip else not record["skipped"], record
        return seconds

    never, always = ["cache.threshold=0"], ["cache.threshold=1e9"]
    out["teacache, computes"] = cached(["cache.method=teacache", *never], False)
    out["first_block, computes"] = cached(["cache.method=first_block", *never], False)
    out["teacache / magcache, skips"] = cached(["cache.method=teacache", *always], True)
    out["first_block, skips"] = cached(["cache.method=first_block", *always], True)
    after = timed(lambda: model(x, t, ctx), device, reps)  # measured before and after: drift shows here
    return {"plain forward (mean of the medians before and after)": (before + after) / 2,
            "plain forward, before / after": (before, after), **out}


def whole_runs(model, latents, contexts, steps: int, device) -> list:
    dims = ParallelDims()
    warm = load_config(None, ["sample.steps=1", "sample.guidance_scale=5.0"])
    denoise(model, latents, contexts, warm, dims, False)
    rows = []
    for name, overrides in (("no caching", []), ("teacache (published 1.3B: 0.08)", ["cache.method=teacache"]),
                            ("magcache (published 1.3B: E0.12 K4 R0.2)", ["cache.method=magcache"])):
        cfg = load_config(None, [f"sample.steps={steps}", "sample.guidance_scale=5.0", "sample.shift=3.0",
                                 *overrides])
        s = resolve_cache(cfg, PUBLISHED, 1536)
        stats: dict = {}
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        denoise(model, latents, contexts, cfg, dims, False, stats=stats, cache=StepCache(s, dims) if s else None)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - t0
        record = stats.get("cache")
        ran = stats["dit_forwards"] if record is None else \
            sum(len(b["computed"]) for b in record["branches"].values())
        skipped = [] if record is None else record["branches"]["cond"]["skipped"]
        rows.append((name, seconds, ran, stats["dit_forwards"], skipped))
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", choices=list(SIZES), default="1.3b")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--reps", type=int, default=5, help="timed calls per forward variant (median)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--no-runs", action="store_true", help="per-forward numbers only (no whole runs)")
    args = p.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    size = SIZES[args.config]
    wan_cfg = WanConfig.tiny() if args.config == "tiny" else WanConfig.t2v_1_3b()
    shape = latent_shape(wan_cfg.out_dim, size["frames"], size["height"], size["width"])
    with torch.no_grad():
        model = on_device(lambda: WanModel(wan_cfg), device, dtype).set_dtype(dtype).eval()
        gen = torch.Generator(device=device).manual_seed(0)
        text = torch.randn(2, 512, wan_cfg.text_dim, device=device, generator=gen, dtype=dtype)
        contexts = TextContexts(cond=text[:1], uncond=text[1:], num_tokens=[0, 0])
        latents = initial_latents(0, shape, device)
        t = torch.tensor([500.0], device=device)
        forward = per_forward(model, latents, t, contexts.cond, args.steps, device, args.reps)
        runs = [] if args.no_runs else whole_runs(model, latents, contexts, args.steps, device)
    where = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    tokens = shape[1] * (shape[2] // 2) * (shape[3] // 2)
    print(f"Step caching, Wan2.1-{args.config} shapes with random weights, {size['frames']}x{size['height']}x"
          f"{size['width']} -> {tokens} tokens, {dtype}, {where}, torch {torch.__version__}\n")
    before, after = forward.pop("plain forward, before / after")
    base = next(iter(forward.values()))
    print("| one DiT forward | ms | vs plain forward |")
    print("|---|---:|---:|")
    for name, seconds in forward.items():
        print(f"| {name} | {seconds * 1e3:.2f} | {seconds / base * 100:.2f}% |")
    print(f"\nplain forward measured before / after the cached ones: {before * 1e3:.2f} / {after * 1e3:.2f} ms")
    if not runs:
        return
    print(f"\n| denoise stage, {args.steps} steps, CFG 5 | seconds | forwards that ran the blocks / DiT calls "
          "| speed-up | cond steps skipped |")
    print("|---|---:|---:|---:|---|")
    for name, seconds, ran, calls, skipped in runs:
        print(f"| {name} | {seconds:.2f} | {ran} / {calls} | {runs[0][1] / seconds:.2f}x | {skipped} |")
    print("\nRandom weights: MagCache's pattern follows the published ratio table alone (the real 1.3B model's "
          "pattern); TeaCache's depends on this random model's time embedding, not the real one's. Video quality "
          "of a skip pattern can only be judged with the real weights, which were not available.")


if __name__ == "__main__":
    main()
