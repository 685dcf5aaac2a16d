"""Forward time and peak memory: our WanModel vs diffusers.WanTransformer3DModel.

Same config, same weights (random, copied from the diffusers model into ours), same input; the two
run one after the other in one process, each alone on the device, and the script prints a
markdown table.

  python scripts/bench_dit.py --config tiny --device cpu
  python scripts/bench_dit.py --config 1.3b --latent 21 60 104 --dtype bf16   # Wan2.1-1.3B at 480p, GPU

Time: median (and min) of --iters forwards after --warmup, CUDA events on GPU. Memory: on CUDA
the allocator's peak during one forward minus what was allocated before it (activations and
temporaries; weights are listed apart); on CPU, which has no allocator statistics, the peak of
live tensor bytes created during the forward, tracked per operator.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import weakref
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lightx2v_sp.attention import resolve_backend  # noqa: E402
from lightx2v_sp.benchmarking import time_once  # noqa: E402
from lightx2v_sp.models.wan import WanConfig, model_from_state_dict  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class LiveTensorBytes(TorchDispatchMode):
    """Peak bytes of storages created inside the mode and still referenced (views counted once)."""

    def __init__(self, exclude: set[int]):
        super().__init__()
        self.exclude, self.live, self.peak = exclude, 0, 0
        self.refs: dict[int, list[int]] = {}  # storage ptr -> [live tensors, nbytes]
        self.seen: set[int] = set()  # id() of tracked tensors, removed when they die

    def _drop(self, ptr: int, tid: int) -> None:
        self.seen.discard(tid)
        entry = self.refs[ptr]
        entry[0] -= 1
        if entry[0] == 0:
            self.live -= entry[1]
            del self.refs[ptr]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor) or id(t) in self.seen:
                continue
            ptr = t.untyped_storage().data_ptr()
            if ptr in self.exclude or ptr == 0:
                continue
            self.seen.add(id(t))
            entry = self.refs.setdefault(ptr, [0, t.untyped_storage().nbytes()])
            if entry[0] == 0:
                self.live += entry[1]
                self.peak = max(self.peak, self.live)
            entry[0] += 1
            weakref.finalize(t, self._drop, ptr, id(t))
        return out


def diffusers_model(cfg: WanConfig, dtype: torch.dtype, device: torch.device, seed: int = 0):
    """Random WanTransformer3DModel built straight on `device` in `dtype` (no fp32 copy on the way);
    the modules diffusers keeps in fp32 when loading with torch_dtype stay fp32 here too."""
    from diffusers import WanTransformer3DModel
    from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed

    kwargs = {k: v for k, v in cfg.to_diffusers().items() if not k.startswith("_")}
    with torch.device("meta"):
        model = WanTransformer3DModel(**kwargs)
    keep = WanTransformer3DModel._keep_in_fp32_modules
    for name, p in model.named_parameters():
        p.data = p.data.to(torch.float32 if any(k in name.split(".") for k in keep) else dtype)
    model.to_empty(device=device)
    model.rope = WanRotaryPosEmbed(cfg.head_dim, cfg.patch_size, 1024).to(device)  # buffers were on meta
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.fill_(1.0)
            elif p.ndim >= 2 and "scale_shift_table" not in name:
                p.normal_(0, p[0].numel() ** -0.5, generator=gen)
            elif "scale_shift_table" in name:
                p.normal_(0, cfg.dim ** -0.5, generator=gen)
            else:
                p.zero_()
    return model.eval()


def measure(fn, device: torch.device, warmup: int, iters: int, exclude: set[int]) -> dict:
    with torch.no_grad():
        for _ in range(warmup):
            out = fn()
        times = [time_once(fn, device) * 1e3 for _ in range(iters)]
        if device.type == "cuda":
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
            out = fn()
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated(device) - base
        else:
            tracker = LiveTensorBytes(exclude)
            with tracker:
                out = fn()
            peak = tracker.peak
    return {"median": statistics.median(times), "min": min(times), "peak": peak, "out": out.float().cpu()}


def profile(fn, device: torch.device, top: int = 20) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch.no_grad(), torch_profile(activities=activities) as prof:
        fn()
    key = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=top, max_name_column_width=70))


def forward_flops(cfg: WanConfig, tokens: int, text_tokens: int, seq: int) -> float:
    """Multiply-adds x 2 of one forward: projections, FFN, self- and cross-attention (per layer)."""
    d, f = cfg.dim, cfg.ffn_dim
    per_layer = (2 * tokens * d * d * 4          # self-attention q, k, v, o
                 + 4 * tokens * seq * d           # self-attention scores and weighted sum
                 + 2 * tokens * d * d * 2         # cross-attention q, o
                 + 2 * text_tokens * d * d * 2    # cross-attention k, v on the text
                 + 4 * tokens * (text_tokens // max(1, tokens // seq)) * d  # cross-attention scores + sum
                 + 2 * tokens * d * f * 2)        # FFN
    return float(per_layer * cfg.num_layers)


def param_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="tiny", choices=["tiny", "1.3b", "14b"])
    ap.add_argument("--latent", type=int, nargs=3, metavar=("F", "H", "W"), default=None,
                    help="latent frames/height/width (default 21 60 104 on GPU = 480p x 81 frames, 5 16 16 on CPU)")
    ap.add_argument("--dtype", default=None, choices=list(DTYPES), help="default bf16 on GPU, fp32 on CPU")
    ap.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    ap.add_argument("--layers", type=int, default=None, help="cap the number of blocks (small machines)")
    ap.add_argument("--text-len", type=int, default=512)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--backend", default="auto", help="our local attention kernel")
    ap.add_argument("--backends", nargs="*", default=None,
                    help="time our model once per kernel named here (e.g. auto sdpa_cudnn flash_attn4), "
                         "eager and, with --compile, compiled; default: --backend only")
    ap.add_argument("--fp32-ref", action="store_true",
                    help="also run our model in fp32 once and report each model's error against it")
    ap.add_argument("--profile", action="store_true", help="print the top kernels of one forward of our model")
    ap.add_argument("--compile", action="store_true", help="also time our model with torch.compile'd blocks")
    args = ap.parse_args(argv)

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    dtype = DTYPES[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    latent = args.latent or ([21, 60, 104] if device.type == "cuda" else [5, 16, 16])
    cfg = WanConfig.named(args.config)
    if args.layers:
        cfg.num_layers = min(args.layers, cfg.num_layers)

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, cfg.in_dim, *latent, generator=gen).to(device, dtype)
    t = torch.full((args.batch,), 500.0, device=device)
    ctx = (0.1 * torch.randn(args.batch, args.text_len, cfg.text_dim, generator=gen)).to(device, dtype)
    inputs_ptrs = {x.untyped_storage().data_ptr(), t.untyped_storage().data_ptr(), ctx.untyped_storage().data_ptr()}

    theirs = diffusers_model(cfg, dtype, device)
    ours = model_from_state_dict(cfg, theirs.state_dict(), "diffusers", dtype=dtype, device="cpu")
    ours.set_attention_backend(args.backend)

    rows = []
    ptrs = {p.untyped_storage().data_ptr() for p in theirs.parameters()} | inputs_ptrs
    res_theirs = measure(lambda: theirs(x, t, ctx, return_dict=False)[0], device, args.warmup, args.iters, ptrs)
    rows.append(("diffusers WanTransformer3DModel", param_bytes(theirs), res_theirs))
    theirs.to("cpu")
    if device.type == "cuda":
        torch.cuda.empty_cache()
    ours.to(device)
    ptrs = {p.untyped_storage().data_ptr() for p in ours.parameters()} | inputs_ptrs
    res_ours = None
    for backend in args.backends or [args.backend]:
        ours.set_attention_backend(backend)
        kernel = resolve_backend(backend, device, dtype, cfg.dim // cfg.num_heads)
        label = f"{backend} -> {kernel}" if backend == "auto" else backend
        res = measure(lambda: ours(x, t, ctx), device, args.warmup, args.iters, ptrs)
        res_ours = res_ours or res
        rows.append((f"lightx2v_sp WanModel ({label})", param_bytes(ours), res))
        if args.compile:
            torch._dynamo.reset()
            for block in ours.blocks:  # identical blocks share one compiled graph (parameters are inputs)
                block.compile(dynamic=False)
            res_comp = measure(lambda: ours(x, t, ctx), device, args.warmup + 1, args.iters, ptrs)
            rows.append((f"lightx2v_sp WanModel + torch.compile(blocks) ({label})", param_bytes(ours), res_comp))
            for block in ours.blocks:
                block._compiled_call_impl = None
    ours.set_attention_backend(args.backend)
    if args.profile:
        profile(lambda: ours(x, t, ctx), device)
    ref = None
    if args.fp32_ref and dtype != torch.float32:
        ours.to("cpu")
        full = model_from_state_dict(cfg, theirs.state_dict(), "diffusers", dtype=torch.float32, device=device)
        full.set_attention_backend(args.backend)
        with torch.no_grad():
            ref = full(x.float(), t, ctx.float()).float().cpu()
        del full

    tokens = (latent[0] // cfg.patch_size[0]) * (latent[1] // cfg.patch_size[1]) * (latent[2] // cfg.patch_size[2])
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"\nWan DiT forward: config={args.config} (dim {cfg.dim}, {cfg.num_layers} layers), latent "
          f"{args.batch}x{cfg.in_dim}x{'x'.join(map(str, latent))} = {tokens} tokens, text {args.text_len}, "
          f"{args.dtype or str(dtype).split('.')[-1]}, {where}, torch {torch.__version__}, "
          f"warmup {args.warmup}, iters {args.iters}\n")
    extra = " rel. L2 error vs fp32 |" if ref is not None else ""
    flops = forward_flops(cfg, tokens * args.batch, args.text_len * args.batch, tokens)
    print(f"model FLOPs per forward (matrix products and attention): {flops / 1e12:.1f} TFLOP\n")
    print("| model | forward ms (median) | min ms | time vs diffusers | speedup | TFLOP/s | weights MiB | "
          "peak activations MiB |" + extra)
    print("|---|---:|---:|---:|---:|---:|---:|---:|" + ("---:|" if extra else ""))
    base = rows[0][2]["median"]
    for name, wbytes, r in rows:
        err = f" {((r['out'] - ref).norm() / ref.norm()).item():.3g} |" if ref is not None else ""
        print(f"| {name} | {r['median']:.2f} | {r['min']:.2f} | {r['median'] / base:.3f} | {base / r['median']:.2f}x | "
              f"{flops / (r['median'] / 1e3) / 1e12:.0f} | {wbytes / 2**20:.1f} | {r['peak'] / 2**20:.1f} |" + err)
    diff = (res_ours["out"] - res_theirs["out"])
    rel = diff.norm() / res_theirs["out"].norm()
    print(f"\noutputs: max |ours - diffusers| = {diff.abs().max().item():.3g}, relative L2 = {rel.item():.3g}")


if __name__ == "__main__":
    main()
