"""Time to video: the whole job as a user runs it, ours against diffusers' WanPipeline, fresh processes.

    python scripts/bench_vs_diffusers.py build DIR [--size 1.3b]       # random weights at real shapes
    python scripts/bench_vs_diffusers.py run DIR --steps 10 50 --reps 2 [--json out.json] [key=value ...]
    python scripts/bench_vs_diffusers.py build /tmp/tiny --size tiny --device cpu     # CPU smoke test
    python scripts/bench_vs_diffusers.py run /tmp/tiny --device cpu --steps 2 3 --reps 1
    python scripts/bench_vs_diffusers.py run DIR --only ours --steps 10 50 --reps 1 model.compile=true
    python scripts/bench_vs_diffusers.py run DIR --baseline /tmp/base --steps 10 50 --reps 2   # A/B of two commits

`build` writes one diffusers-layout directory (model_index.json, transformer/, text_encoder/,
tokenizer/, vae/, scheduler/) that both sides load: the DiT and UMT5 as sharded safetensors the way
diffusers / transformers save them (bf16), the VAE in fp32, random weights from each class's own
initialisation, made on the device. The tokenizer is the embedded tiny model's (real UMT5 vocab files
cannot be downloaded here): both sides pad to 512 tokens, so the encoder's work is the real one.

`run` times every job in a fresh process from the outside (process start to exit: imports, CUDA
init, loading, text, denoise, decode, mp4 write): ours through the real CLI (`python -m
lightx2v_sp.generate --config CONFIG model.path=DIR ...`, stages from its JSON summary), diffusers'
`WanPipeline.from_pretrained` (VAE fp32, the rest bf16) + `export_to_video` at the config's `output.quality`
(both sides encode the same H.264 quality; stages timed inside the
job). The order rotates from one step count (and repetition) to the next, the directory is read
once beforehand (page cache warm), both sides' imports are compiled once and our `--plan` runs once
(what any earlier run leaves in our cache). From two step counts the per-step cost is the slope and
the fixed cost the intercept. `--baseline CHECKOUT` adds a third side, our CLI run from another
checkout of this repository, in the same rotation: an A/B of two commits on one machine in one run.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

SIZES = {
    # diffusers WanTransformer3DModel configs (Wan2.1-T2V-1.3B-Diffusers) and umt5-xxl
    "1.3b": dict(dit=dict(num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16,
                          text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True,
                          qk_norm="rms_norm_across_heads", eps=1e-6, patch_size=[1, 2, 2]),
                 t5=dict(vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64),
                 vae={}),
    "tiny": dict(dit=dict(num_attention_heads=2, attention_head_dim=16, in_channels=16, out_channels=16,
                          text_dim=64, freq_dim=32, ffn_dim=64, num_layers=2, cross_attn_norm=True,
                          qk_norm="rms_norm_across_heads", eps=1e-6, patch_size=[1, 2, 2]),
                 t5=dict(vocab_size=256, d_model=64, d_kv=8, d_ff=128, num_layers=2, num_heads=8),
                 vae=dict(base_dim=8, z_dim=16, num_res_blocks=1)),
}


def build(path: str, size: str, device: str, shift: float) -> None:
    import torch
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    from lightx2v_sp.models.tiny import _write_index, _write_tokenizer

    spec = SIZES[size]
    os.makedirs(path, exist_ok=True)
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    try:
        torch.set_default_dtype(torch.bfloat16)  # built in bf16 on the device: no fp32 copy of 5.7B params
        with torch.device(device):
            dit = WanTransformer3DModel(**spec["dit"])
        dit.save_pretrained(os.path.join(path, "transformer"), max_shard_size="2GB")
        del dit
        t5cfg = UMT5Config(**spec["t5"], feed_forward_proj="gated-gelu", is_encoder_decoder=False,
                           tie_word_embeddings=False, pad_token_id=0, eos_token_id=1)
        with torch.device(device):
            enc = UMT5EncoderModel(t5cfg)
        enc.save_pretrained(os.path.join(path, "text_encoder"), max_shard_size="5GB")
        del enc
    finally:
        torch.set_default_dtype(default)
    with torch.device(device):
        vae = AutoencoderKLWan(**spec["vae"])
    vae.save_pretrained(os.path.join(path, "vae"))
    UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, num_train_timesteps=1000,
                            flow_shift=shift).save_pretrained(os.path.join(path, "scheduler"))
    _write_tokenizer(os.path.join(path, "tokenizer"))
    _write_index(path, {"_class_name": "WanPipeline", "_diffusers_version": "0.33.0",
                        "transformer": ["diffusers", "WanTransformer3DModel"], "transformer_2": [None, None],
                        "boundary_ratio": None, "expand_timesteps": False})
    with open(os.path.join(path, "model_index.json")) as f:  # the tiny tokenizer is a plain fast tokenizer
        index = json.load(f)
    index["tokenizer"] = ["transformers", "PreTrainedTokenizerFast"]
    with open(os.path.join(path, "model_index.json"), "w") as f:
        json.dump(index, f, indent=2)
    total = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)
    print(f"built {size} at {path}: {total / 2**30:.2f} GiB")


def diffusers_job(args) -> None:
    """One whole diffusers run (this process is fresh: `run` starts it); stage times to --json."""
    t0 = time.perf_counter()
    import torch
    from diffusers import AutoencoderKLWan, WanPipeline
    from diffusers.utils import export_to_video

    times = {"import": time.perf_counter() - t0}
    device = torch.device(args.device)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    t = time.perf_counter()
    vae = AutoencoderKLWan.from_pretrained(args.dir, subfolder="vae", torch_dtype=torch.float32)
    pipe = WanPipeline.from_pretrained(args.dir, vae=vae, torch_dtype=torch.bfloat16).to(device)
    pipe.set_progress_bar_config(disable=True)
    sync()
    times["load"] = time.perf_counter() - t
    spent = {"text": 0.0, "decode": 0.0}

    def timed(name, fn):
        def wrapper(*a, **k):
            sync()
            start = time.perf_counter()
            out = fn(*a, **k)
            sync()
            spent[name] += time.perf_counter() - start
            return out
        return wrapper

    pipe.encode_prompt = timed("text", pipe.encode_prompt)
    pipe.vae.decode = timed("decode", pipe.vae.decode)
    t = time.perf_counter()
    frames = pipe(prompt=args.prompt, negative_prompt=args.negative_prompt, height=args.height, width=args.width,
                  num_frames=args.frames, num_inference_steps=args.job_steps, guidance_scale=args.guidance,
                  generator=torch.Generator(device).manual_seed(42)).frames[0]
    sync()
    generate = time.perf_counter() - t
    times.update(text=spent["text"], denoise=generate - spent["text"] - spent["decode"], decode=spent["decode"])
    t = time.perf_counter()
    export_to_video(frames, args.out, fps=args.fps, quality=args.quality)  # the quality our side writes
    times["write"] = time.perf_counter() - t
    times["inside"] = time.perf_counter() - t0
    with open(args.json, "w") as f:
        json.dump({k: round(v, 3) for k, v in times.items()}, f)


def _config_values(config: str, overrides: list[str]):
    from lightx2v_sp.config import load_config

    return load_config(config, overrides)


def _ours(args, steps: int, out: str, root: str = ROOT) -> tuple[float, dict]:
    """Our CLI from the checkout at `root` (its working directory and first on PYTHONPATH: `python -m`
    puts the working directory ahead of PYTHONPATH, so a checkout elsewhere would never be imported)."""
    cmd = [sys.executable, "-m", "lightx2v_sp.generate", "--config", os.path.abspath(args.config),
           f"model.path={args.dir}", f"sample.steps={steps}", f"output.path={out}", f"device={args.device}",
           *args.overrides]
    wall, _ = _timed_process(cmd, root=root)
    with open(out[:-4] + ".json") as f:
        summary = json.load(f)
    stages = dict(summary["stage_times_s"])
    stages["inside"] = summary["total_time_s"]  # run() itself; wall - inside = imports, CUDA init, teardown
    stages["step_times_s"] = summary["denoise"].get("step_times_s")
    stages["attention_backend"] = summary["layout"].get("attention_backend")
    for key in ("median_step_s", "first_step_extra_s"):  # per step once warm; what step 1 paid once
        stages[key] = summary["denoise"].get(key)
    prefetch = summary.get("prefetch") or {}
    stages["load_alongside_text_s"] = prefetch.get("load_s")  # the DiT's (and the VAE's, unless the next)
    stages["vae_import_during_denoise_s"] = prefetch.get("vae_import_s")  # in the GPU's shadow (shadow_load.py)
    stages["vae_load_during_denoise_s"] = prefetch.get("vae_load_s")
    return wall, stages


def _diffusers(args, cfg, steps: int, out: str) -> tuple[float, dict]:
    s = cfg.sample
    stage_json = out[:-4] + ".json"
    cmd = [sys.executable, os.path.abspath(__file__), "diffusers-job", args.dir, "--job-steps", str(steps),
           "--out", out, "--json", stage_json, "--device", args.device, "--height", str(s.height),
           "--width", str(s.width), "--frames", str(s.num_frames), "--fps", str(s.fps),
           "--quality", str(cfg.output.quality),
           "--guidance", str(s.guidance_scale), "--prompt", cfg.prompt, "--negative-prompt", cfg.negative_prompt]
    wall, _ = _timed_process(cmd)
    with open(stage_json) as f:
        return wall, json.load(f)


def _env(root: str = ROOT, **changes) -> dict:
    """This process's environment with `root` first on PYTHONPATH; a change to None removes that variable."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
    for key, value in changes.items():
        env.pop(key, None) if value is None else env.__setitem__(key, value)
    return env


def _timed_process(cmd: list[str], root: str = ROOT, **env_changes) -> tuple[float, str]:
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=root, env=_env(root, **env_changes), capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-8000:])
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}")
    return wall, proc.stderr


# What both sides import, so that every job finds its modules' bytecode cached (as after a pip install)
IMPORTS = ("import torch, diffusers, transformers, imageio, imageio_ffmpeg, tqdm; "
           "from diffusers import WanPipeline, AutoencoderKLWan, UniPCMultistepScheduler; "
           "from diffusers.utils import export_to_video; from transformers import AutoTokenizer")
OUR_IMPORTS = "import lightx2v_sp.generate, lightx2v_sp.pipeline.runner, lightx2v_sp.models.t5, lightx2v_sp.models.wan"


def _warm(path: str) -> None:
    """Read every file once (page cache warm) and compile both sides' imports to bytecode.

    The bytecode is written even where the environment says not to (PYTHONDONTWRITEBYTECODE, set in
    some container images, where it left torch without .pyc files: every process then compiled
    thousands of modules from source, seconds on both sides that no pip-installed environment pays).
    """
    for d, _, files in os.walk(path):
        for name in files:
            with open(os.path.join(d, name), "rb") as f:
                while f.read(1 << 24):
                    pass
    _timed_process([sys.executable, "-c", IMPORTS], PYTHONDONTWRITEBYTECODE=None)
    subprocess.run([sys.executable, "-c", "import flash_attn.cute"], env=_env(PYTHONDONTWRITEBYTECODE=None),
                   capture_output=True)  # if installed


def run(args) -> None:
    cfg = _config_values(args.config, [f"model.path={args.dir}", *args.overrides])
    _warm(args.dir)
    for root in [ROOT] * (args.only != "diffusers") + [args.baseline] * bool(args.baseline):
        # each checkout's bytecode, and what any earlier run of it leaves in our cache (the plan's VAE facts)
        _timed_process([sys.executable, "-c", OUR_IMPORTS], root=root, PYTHONDONTWRITEBYTECODE=None)
        _timed_process([sys.executable, "-m", "lightx2v_sp.generate", "--config", os.path.abspath(args.config),
                        f"model.path={args.dir}", f"device={args.device}", *args.overrides, "--plan"], root=root)
    outdir = args.outdir or tempfile.mkdtemp(prefix="bench_vs_diffusers-")
    sides = [side for side in _sides(args) if args.only in (None, side) or side == "baseline"]
    rows = []
    for rep in range(args.reps):
        for i, steps in enumerate(args.steps):  # the order rotates from run to run, so each side goes first
            k = (rep * len(args.steps) + i) % len(sides)
            order = sides[k:] + sides[:k]
            for side in order:
                out = os.path.join(outdir, f"{side}_{steps}_{rep}.mp4")
                if side == "diffusers":
                    wall, stages = _diffusers(args, cfg, steps, out)
                else:
                    wall, stages = _ours(args, steps, out, root=args.baseline if side == "baseline" else ROOT)
                row = {"side": side, "steps": steps, "rep": rep, "first": side == order[0], "wall_s": round(wall, 2),
                       "mp4_bytes": os.path.getsize(out), "stages": stages}
                rows.append(row)
                print(json.dumps(row), flush=True)
    _report(rows, args)


def _sides(args) -> list[str]:
    """ours, diffusers, and `--baseline`'s checkout of ours when given."""
    return ["ours", "diffusers"] + (["baseline"] if args.baseline else [])


def _median(rows, side, steps) -> float:
    return statistics.median(r["wall_s"] for r in rows if r["side"] == side and r["steps"] == steps)


def _report(rows: list[dict], args) -> None:
    print("\n| side | steps | rep | first | wall s | stages (s) |\n|---|---:|---:|---|---:|---|")
    for r in rows:
        st = ", ".join(f"{k} {v:.3f}" for k, v in r["stages"].items() if isinstance(v, (int, float)))
        print(f"| {r['side']} | {r['steps']} | {r['rep']} | {r['first']} | {r['wall_s']:.2f} | {st} |")
    lo, hi = min(args.steps), max(args.steps)
    summary = {}
    print("\n| side | " + " | ".join(f"median wall at {n} steps" for n in args.steps) +
          " | per step s (slope) | fixed s (intercept) |\n|---|" + "---:|" * (len(args.steps) + 2))
    for side in [x for x in _sides(args) if args.only in (None, x) or x == "baseline"]:
        med = {n: _median(rows, side, n) for n in args.steps}
        slope = (med[hi] - med[lo]) / (hi - lo) if hi > lo else float("nan")
        fixed = med[lo] - lo * slope
        summary[side] = {"median_wall_s": med, "per_step_s": round(slope, 3), "fixed_s": round(fixed, 2)}
        print(f"| {side} | " + " | ".join(f"{med[n]:.2f}" for n in args.steps) + f" | {slope:.3f} | {fixed:.2f} |")
    for n in args.steps if {"ours", "diffusers"} <= set(summary) else ():
        ratio = summary["ours"]["median_wall_s"][n] / summary["diffusers"]["median_wall_s"][n]
        summary.setdefault("ratio", {})[n] = round(ratio, 3)
        print(f"ours / diffusers at {n} steps: {ratio:.3f}x")
    for n in args.steps if {"ours", "baseline"} <= set(summary) else ():
        ratio = summary["ours"]["median_wall_s"][n] / summary["baseline"]["median_wall_s"][n]
        summary.setdefault("ratio_to_baseline", {})[n] = round(ratio, 3)
        print(f"ours / baseline ({args.baseline}) at {n} steps: {ratio:.3f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "summary": summary, "config": args.config, "overrides": args.overrides}, f,
                      indent=1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build")
    b.add_argument("dir")
    b.add_argument("--size", default="1.3b", choices=list(SIZES))
    b.add_argument("--device", default="cuda")
    b.add_argument("--shift", type=float, default=3.0, help="the scheduler's flow_shift (the config's sample.shift)")
    r = sub.add_parser("run")
    r.add_argument("dir")
    r.add_argument("--config", default=os.path.join(ROOT, "configs", "wan_t2v_1.3b_480p.yaml"))
    r.add_argument("--steps", type=int, nargs="+", default=[10, 50])
    r.add_argument("--reps", type=int, default=2)
    r.add_argument("--device", default="cuda")
    r.add_argument("--outdir", default=None)
    r.add_argument("--json", default=None)
    r.add_argument("--baseline", default=None, metavar="CHECKOUT",
                   help="also time our CLI from this other checkout (e.g. `git worktree add /tmp/base <commit>`), "
                        "in the same rotation: an A/B of two commits in one run (--only does not drop it)")
    r.add_argument("--only", default=None, choices=["ours", "diffusers"],
                   help="run one side alone (e.g. ours, to compare our settings)")
    # any key=value after the options: overrides for our side (the video size also sets diffusers')
    j = sub.add_parser("diffusers-job")
    j.add_argument("dir")
    for name, typ in (("--job-steps", int), ("--height", int), ("--width", int), ("--frames", int), ("--fps", int),
                      ("--guidance", float), ("--quality", int)):
        j.add_argument(name, type=typ, required=True)
    for name in ("--out", "--json", "--device", "--prompt", "--negative-prompt"):
        j.add_argument(name, required=True)
    args, extra = ap.parse_known_args()
    if args.cmd == "run":
        args.overrides = extra
    elif extra:
        ap.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.cmd == "build":
        build(args.dir, args.size, args.device, args.shift)
    elif args.cmd == "run":
        run(args)
    else:
        diffusers_job(args)


if __name__ == "__main__":
    main()
