"""End to end on one device with random weights: text encode -> denoise (CFG) -> VAE decode.

python scripts/bench_e2e.py --config 1.3b --steps 10        (GPU: Wan2.1-1.3B at 480p, umt5-xxl, Wan VAE)
python scripts/bench_e2e.py --config tiny --device cpu      (smoke test)

Real model sizes, random weights built directly on the device (no checkpoint files), the
pipeline's own stages (models/t5, pipeline.denoise with UniPC + guidance, models/vae). Prints
stage times, seconds per denoising step and peak memory; the 50-step total is extrapolated from
the measured steps and says so.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from lightx2v_sp.config import load_config  # noqa: E402
from lightx2v_sp.distributed import ParallelDims  # noqa: E402
from lightx2v_sp.models.t5 import T5Config, T5Encoder  # noqa: E402
from lightx2v_sp.models.vae import WanVAE  # noqa: E402
from lightx2v_sp.models.wan import WanConfig, WanModel  # noqa: E402
from lightx2v_sp.offload import StageMemory  # noqa: E402
from lightx2v_sp.pipeline.denoise import denoise  # noqa: E402
from lightx2v_sp.pipeline.latents import initial_latents, latent_shape  # noqa: E402
from lightx2v_sp.pipeline.text import TextContexts  # noqa: E402

SIZES = {"1.3b": dict(height=480, width=832, frames=81), "14b": dict(height=720, width=1280, frames=81),
         "tiny": dict(height=64, width=64, frames=9)}


def on_device(make, device, dtype):
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            return make()
    finally:
        torch.set_default_dtype(default)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", choices=list(SIZES), default="1.3b")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--prompt-tokens", type=int, default=120, help="real tokens per prompt (of 512)")
    args = p.parse_args()
    device, dtype = torch.device(args.device), torch.bfloat16 if args.device == "cuda" else torch.float32
    size = SIZES[args.config]
    tiny = args.config == "tiny"
    wan_cfg = WanConfig.named(args.config)
    t5_cfg = (T5Config(vocab_size=256, d_model=wan_cfg.text_dim, d_kv=16, d_ff=64, num_layers=2, num_heads=4)
              if tiny else T5Config.umt5_xxl())
    cfg = load_config(None, [f"sample.steps={args.steps}", f"sample.height={size['height']}",
                             f"sample.width={size['width']}", f"sample.num_frames={size['frames']}",
                             "sample.guidance_scale=5.0", "sample.shift=3.0"])
    memory, times = StageMemory(device), {}

    def stage(name, fn):
        with memory.stage(name):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            out = fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[name] = time.perf_counter() - t0
        return out

    with torch.no_grad():
        encoder = on_device(lambda: T5Encoder(t5_cfg), device, dtype).eval()
        ids = torch.randint(1, t5_cfg.vocab_size, (2, 512), device=device)
        mask = torch.zeros(2, 512, dtype=torch.long, device=device)
        mask[:, :args.prompt_tokens] = 1
        stage("text (2 prompts)", lambda: encoder(ids, mask))
        context = stage("text (2 prompts)", lambda: encoder(ids, mask))  # second call: warm
        del encoder
        model = on_device(lambda: WanModel(wan_cfg), device, dtype).set_dtype(dtype).eval()
        # text_dim of umt5-xxl is 4096 = the DiT's text_dim
        contexts = TextContexts(cond=context[:1].to(dtype), uncond=context[1:2].to(dtype), num_tokens=[0, 0])
        shape = latent_shape(wan_cfg.in_dim, size["frames"], size["height"], size["width"])
        latents = initial_latents(0, shape, device)
        dims = ParallelDims()
        stage("denoise warm-up (1 step)", lambda: denoise(model, latents, contexts,
                                                          load_config(None, ["sample.steps=1"]), dims, False))
        out = stage(f"denoise ({args.steps} steps, CFG)", lambda: denoise(model, latents, contexts, cfg, dims, False))
        del model
        torch.cuda.empty_cache() if device.type == "cuda" else None
        vae_model = on_device(lambda: __import__("diffusers").AutoencoderKLWan(
            **({"base_dim": 16, "z_dim": 16, "num_res_blocks": 1} if tiny else {})), device, torch.float32)
        vae = WanVAE(vae_model.eval())
        video = stage("VAE decode (fp32)", lambda: vae.decode(out, device=device))
    per_step = times[f"denoise ({args.steps} steps, CFG)"] / args.steps
    where = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    print(f"End to end, Wan2.1-{args.config} shapes with random weights, {size['frames']}x{size['height']}x"
          f"{size['width']} -> latents {list(shape)}, video {list(video.shape)}, {where}, torch {torch.__version__}\n")
    print("| stage | seconds | peak GiB |")
    print("|---|---:|---:|")
    peaks = memory.as_dict()
    for name, t in times.items():
        peak = (peaks.get(name) or {}).get("allocated_bytes")
        print(f"| {name} | {t:.2f} | {peak / 2**30 if peak else float('nan'):.2f} |")
    total50 = times["text (2 prompts)"] + 50 * per_step + times["VAE decode (fp32)"]
    print(f"| seconds per denoising step (2 DiT forwards) | {per_step:.3f} | |")
    print(f"| 50-step run, extrapolated: text + 50 x step + decode | {total50:.1f} | |")


if __name__ == "__main__":
    main()
