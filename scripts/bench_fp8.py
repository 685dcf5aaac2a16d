"""FP8 weights and matmuls against bf16, side by side in one run (issue 24).

  python scripts/bench_fp8.py --part linear --models 1.3b   # FP8 linear at Wan shapes (one GPU)
  python scripts/bench_fp8.py --part linear --models 14b --tokens 32760   # (one torch.compile per shape
  python scripts/bench_fp8.py --part linear --models 14b --tokens 75600   #  and path: split long runs)
  python scripts/bench_fp8.py --part step                   # 14B 480p CFG step, output error, weight bytes
  python scripts/bench_fp8.py --device cpu                  # smoke run of both parts at toy sizes

--part linear: y = x @ W.T + b at the projection and FFN shapes of Wan2.1-1.3B (dim 1536, ffn 8960) and
14B (dim 5120, ffn 13824), at the tokens one rank holds at 480p (32760) and 720p (75600, 14B only),
for: bf16 F.linear; ours (models/quant: per-token activation quantization + torch._scaled_mm with
row-wise scales), eager and torch.compile'd (fp32 accumulation; compiled also with model.fp8_accum=fast's
fast accumulation), and the GEMM alone both ways; torchao's Float8DynamicActivationFloat8WeightConfig
(PerRow) when `import torchao` works, eager and compiled. Median of --iters after --warmup, CUDA
events; speedup = bf16 time / time.

--part step: Wan2.1-14B at 480p (latents 21 x 60 x 104 = 32760 tokens, 512 text tokens), random
weights of realistic scale (normal, std 0.02, with 1% of the output rows of every block linear 10x
larger and 1% of its input columns 10x larger: outlier channels as trained models have them), built
straight on the device. One CFG step = two forwards (cond + uncond). Rows: bf16 and fp8 (FP8 GEMM),
both with the fastest exact attention kernel `auto` finds and compiled blocks (--no-compile: eager),
plus fp8 weight-only (eager) for the error split and fp8 with the GEMM's fast accumulation (errors: eager). Reports seconds per CFG step, the ratio to bf16,
the relative L2 error of the DiT output against the bf16 model's, and the DiT weight bytes on the GPU.
Both models sit on the GPU at once (28 + 14 GB).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lightx2v_sp.attention import resolve_backend  # noqa: E402
from lightx2v_sp.benchmarking import time_once  # noqa: E402
from lightx2v_sp.models.quant import (DIT_LINEARS, Fp8Linear, fp8_gemm_supported, fp8_layers,  # noqa: E402
                                      quantize_linears, set_matmul)
from lightx2v_sp.models.wan import WanConfig, WanModel  # noqa: E402

GIB = 2 ** 30


def _median_ms(fn, device, warmup, iters) -> float:
    with torch.no_grad():
        for _ in range(warmup):
            fn()
        return statistics.median(time_once(fn, device) for _ in range(iters)) * 1e3


def _compile_limits() -> None:
    """One compiled graph per shape: more recompilations than dynamo's default allows."""
    import torch._dynamo as dynamo

    for name in ("cache_size_limit", "recompile_limit", "accumulated_cache_size_limit",
                 "accumulated_recompile_limit"):
        if hasattr(dynamo.config, name):
            setattr(dynamo.config, name, 1024)


def _torchao_linear(lin):
    try:
        from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_
    except Exception as e:  # noqa: BLE001 - any import failure means "not available here"
        return None, f"{type(e).__name__}: {e}"
    import copy

    mod = copy.deepcopy(lin)
    try:
        quantize_(mod, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()))
    except Exception as e:  # noqa: BLE001
        return None, f"quantize_ failed: {type(e).__name__}: {e}"
    return mod, None


def linear_part(args, device, dtype) -> None:
    if device.type == "cpu":
        shapes = [("toy", "ffn up", 256, 96, 192), ("toy", "ffn down", 256, 192, 96)]
    else:
        shapes = []
        for model, dim, ffn, token_list in (("1.3B", 1536, 8960, (32760,)), ("14B", 5120, 13824, (32760, 75600))):
            if model.lower() not in args.models:
                continue
            for tokens in (t for t in token_list if not args.tokens or t in args.tokens):
                shapes += [(model, "qkv", tokens, dim, 3 * dim), (model, "o", tokens, dim, dim),
                           (model, "ffn up", tokens, dim, ffn), (model, "ffn down", tokens, ffn, dim)]
    fp8_ok = fp8_gemm_supported(device, dtype) or device.type == "cpu"
    _compile_limits()
    print(f"device: {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}; torch "
          f"{torch.__version__}; compute {dtype}; FP8 GEMM {'available' if fp8_ok else 'NOT available'}")
    ao_note = None
    print("\n| model | layer | tokens | K | N | bf16 ms | bf16 TFLOP/s | ours eager ms (x) | ours compiled ms (x) "
          "| ours compiled, fast accum ms (x) "
          "| ours GEMM only ms (x) | GEMM only, fast accum ms (x) | torchao eager ms (x) | torchao compiled ms (x) |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for model, layer, tokens, k, n in shapes:
        gen = torch.Generator(device=device).manual_seed(0)
        x = torch.randn(tokens, k, device=device, dtype=dtype, generator=gen)
        lin = torch.nn.Linear(k, n, device=device, dtype=dtype).requires_grad_(False)
        base = _median_ms(lambda: F.linear(x, lin.weight, lin.bias), device, args.warmup, args.iters)
        flops = 2 * tokens * k * n
        cells = [f"{base:.3f}", f"{flops / base / 1e9:.0f}"]

        def fmt(ms):
            return f"{ms:.3f} ({base / ms:.2f}x)" if ms == ms else "n/a"

        if fp8_ok:
            q = Fp8Linear.from_linear(lin)
            q.matmul = "fp8"
            cells.append(fmt(_median_ms(lambda: q(x), device, args.warmup, args.iters)))
            for fast in (False, True):  # the layer as model.compile runs it, fp32 / fast accumulation
                q.fast_accum = fast
                if args.compile:
                    cq = torch.compile(q, dynamic=False)
                    cells.append(fmt(_median_ms(lambda: cq(x), device, args.warmup, args.iters)))
                    torch._dynamo.reset()
                else:
                    cells.append("n/a")
            q.fast_accum = False
            from lightx2v_sp.models.quant import quantize_tokens

            xq, xs = quantize_tokens(x)
            for fast in (False, True):
                gemm = _median_ms(lambda: torch._scaled_mm(xq, q.weight.t(), scale_a=xs,
                                                           scale_b=q.weight_scale.view(1, -1), bias=q.bias,
                                                           out_dtype=dtype, use_fast_accum=fast),
                                  device, args.warmup, args.iters)
                cells.append(fmt(gemm))
        else:
            cells += ["n/a"] * 5
        ao, why = _torchao_linear(lin) if device.type == "cuda" else (None, "CPU run")
        ao_note = ao_note or why
        if ao is not None:
            cells.append(fmt(_median_ms(lambda: ao(x), device, args.warmup, args.iters)))
            cao = torch.compile(ao, dynamic=False) if args.compile else None
            cells.append(fmt(_median_ms(lambda: cao(x), device, args.warmup, args.iters)) if cao else "n/a")
        else:
            cells += ["n/a", "n/a"]
        print(f"| {model} | {layer} | {tokens} | {k} | {n} | " + " | ".join(cells) + " |", flush=True)
        del lin, x
        torch._dynamo.reset()
    if ao_note:
        print(f"\ntorchao: not measured ({ao_note})")


@torch.no_grad()
def realistic_(model: WanModel, seed: int) -> WanModel:
    """Random weights of trained-model scale, generated on the model's device: linears N(0, 0.02) with
    1% of rows and 1% of input columns 10x larger, norms 1, biases and modulation tables small."""
    gen = torch.Generator(device=model.device).manual_seed(seed)
    for name, p in model.named_parameters():
        if "norm" in name and name.endswith("weight"):
            p.fill_(1.0)
        elif "modulation" in name:
            p.normal_(0, model.config.dim ** -0.5, generator=gen)
        elif p.ndim >= 2:
            p.normal_(0, 0.02, generator=gen)
            if p.ndim == 2 and name.startswith("blocks."):
                rows = torch.randperm(p.shape[0], device=p.device, generator=gen)[:max(1, p.shape[0] // 100)]
                cols = torch.randperm(p.shape[1], device=p.device, generator=gen)[:max(1, p.shape[1] // 100)]
                p[rows] *= 10
                p[:, cols] *= 10
        else:
            p.normal_(0, 0.01, generator=gen)
    return model


def _build(cfg: WanConfig, device, dtype, seed: int) -> WanModel:
    with torch.device("meta"):
        model = WanModel(cfg)
    model.set_dtype(dtype)
    model.to_empty(device=device)
    return realistic_(model.eval(), seed)


def _weight_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def _fast_accum(model, on: bool) -> None:
    for _, layer in fp8_layers(model):
        layer.fast_accum = on


def step_part(args, device, dtype) -> None:
    if device.type == "cpu":
        cfg, latent, text = WanConfig.tiny(), (3, 8, 8), 16
    else:
        cfg, latent, text = WanConfig.t2v_14b(), (21, 60, 104), 512
    if args.layers:
        cfg.num_layers = min(args.layers, cfg.num_layers)
    gen = torch.Generator(device=device).manual_seed(1)
    x = torch.randn(1, cfg.in_dim, *latent, device=device, generator=gen)
    t = torch.full((1,), 500.0, device=device)
    ctx = [0.5 * torch.randn(1, text, cfg.text_dim, device=device, generator=gen) for _ in range(2)]
    kernel = resolve_backend("auto", device, dtype, cfg.dim // cfg.num_heads)
    tokens = latent[0] * (latent[1] // 2) * (latent[2] // 2)
    print(f"device: {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}; torch "
          f"{torch.__version__}; Wan {'14B' if device.type == 'cuda' else 'tiny'} x {cfg.num_layers} blocks, "
          f"{tokens} tokens, {text} text tokens, {dtype}; attention auto -> {kernel}; compile {args.compile}")
    start = time.perf_counter()
    ref = _build(cfg, device, dtype, seed=0)
    fp8 = _build(cfg, device, dtype, seed=0)  # the same weights
    quantize_linears(fp8, DIT_LINEARS)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    counts = set_matmul(fp8, device, dtype, allow_fp8=True)
    if device.type == "cpu":  # the CPU has torch._scaled_mm too: smoke-test the GEMM path
        for _, layer in fp8_layers(fp8):
            layer.matmul = "fp8"
        counts = {"fp8": len(fp8_layers(fp8))}
    print(f"built both models in {time.perf_counter() - start:.1f} s; fp8 layers by matmul path: {counts}")
    for m in (ref, fp8):
        m.set_attention_backend(kernel)

    def cfg_step(model):
        return [model(x, t, c) for c in ctx]

    rows = []
    with torch.no_grad():
        out_ref = cfg_step(ref)
        out_fp8 = cfg_step(fp8)
        paths = {id(layer): layer.matmul for _, layer in fp8_layers(fp8)}
        for _, layer in fp8_layers(fp8):
            layer.matmul = "weight_only"
        out_wo = cfg_step(fp8)
        for _, layer in fp8_layers(fp8):
            layer.matmul = paths[id(layer)]
        _fast_accum(fp8, True)
        out_fast = cfg_step(fp8)
        _fast_accum(fp8, False)

    def rel(a, b):
        return max(float((p.float() - q.float()).norm() / q.float().norm()) for p, q in zip(a, b))

    if args.compile:
        for m in (ref, fp8):
            for block in m.blocks:
                block.compile(dynamic=False)
    for label, model, fast in (("bf16", ref, False), ("fp8 (FP8 GEMM)", fp8, False),
                               ("fp8 (FP8 GEMM, fast accumulation)", fp8, True)):
        _fast_accum(fp8, fast)
        started = time.perf_counter()
        ms = _median_ms(lambda: cfg_step(model), device, args.warmup, args.iters)
        rows.append((label, ms / 1e3, _weight_bytes(model), time.perf_counter() - started))
    _fast_accum(fp8, False)
    base = rows[0][1]
    errors = {"bf16": "0 (reference)", "fp8 (FP8 GEMM)": f"{rel(out_fp8, out_ref):.4f}",
              "fp8 (FP8 GEMM, fast accumulation)": f"{rel(out_fast, out_ref):.4f}"}
    print("\n| DiT | s per CFG step (2 forwards) | x bf16 | DiT weight GiB | weight bytes x bf16 | rel. L2 error vs bf16 |")
    print("|---|---:|---:|---:|---:|---:|")
    for label, s, nbytes, _ in rows:
        print(f"| {label} | {s:.3f} | {s / base:.3f} | {nbytes / GIB:.2f} | {nbytes / rows[0][2]:.3f} "
              f"| {errors[label]} |")
    print(f"| fp8 weight-only (error split, eager, not timed) | | | | | {rel(out_wo, out_ref):.4f} |")
    print(f"\nwall time of the timed rows incl. compilation: {', '.join(f'{r[0]} {r[3]:.0f} s' for r in rows)}")
    if device.type == "cuda":
        print(f"GPU memory allocated now: {torch.cuda.memory_allocated(device) / GIB:.2f} GiB (both models)")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=["linear", "step", "all"], default="all")
    ap.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    ap.add_argument("--iters", type=int, default=None, help="timed repetitions (default 10 linear, 3 step; CPU 2)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed calls first (default 3 linear, 1 step)")
    ap.add_argument("--no-compile", dest="compile", action="store_false", help="skip the torch.compile rows")
    ap.add_argument("--layers", type=int, default=None, help="step part: cap the number of blocks")
    ap.add_argument("--tokens", nargs="+", type=int, default=None, choices=[32760, 75600],
                    help="linear part: only these token counts (480p 32760, 720p 75600)")
    ap.add_argument("--models", nargs="+", default=["1.3b", "14b"], choices=["1.3b", "14b"],
                    help="linear part: whose shapes (one compilation per shape and path: split long runs)")
    args = ap.parse_args(argv)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    if device.type == "cpu":
        args.compile = False  # inductor's CPU codegen: minutes on a small machine, nothing to learn
    dtype = torch.bfloat16
    iters, warmup = args.iters, args.warmup
    if args.part in ("linear", "all"):
        args.iters, args.warmup = iters or (2 if device.type == "cpu" else 10), 1 if warmup is None and \
            device.type == "cpu" else (warmup if warmup is not None else 3)
        linear_part(args, device, dtype)
    if args.part in ("step", "all"):
        args.iters, args.warmup = iters or (2 if device.type == "cpu" else 3), warmup if warmup is not None else 1
        step_part(args, device, dtype)


if __name__ == "__main__":
    main()
