"""End to end on one device with random weights: text encode -> denoise (CFG) -> VAE decode.

python scripts/bench_e2e.py --config 1.3b --steps 10        (GPU: Wan2.1-1.3B at 480p, umt5-xxl, Wan VAE)
python scripts/bench_e2e.py --config tiny --device cpu      (smoke test)
python scripts/bench_e2e.py --config 14b-480p --offload block --lora-rank 64 --distill
    (issue 21, 1 GPU: Wan2.1-14B at 480p with DiT block offload and a merged rank-64 LoRA; a whole
     4-step run without CFG next to a whole 40-step CFG run; --cfg-steps N < 40 measures N CFG steps
     and extrapolates, labelled as such)
python scripts/bench_e2e.py --config a14b --experts 2 --offload block --steps 2 --no-decode
                                            (Wan2.2-T2V-A14B at 720p on one GPU: two experts, block offload)
python scripts/bench_e2e.py --config i2v-14b --steps 5    (Wan2.1-I2V-14B at 480p: VAE encode + CLIP ViT-H, DiT)

With --experts 2 the DiT is two experts of the config's shape (Wan2.2 A14B: the high-noise one,
then the low-noise one); the boundary is put between the two middle steps, so half the measured
steps run each expert. Each step is timed on its own, and so is the switch (with --offload swap:
dropping the high-noise expert's device copy and one host-to-device copy of the low-noise one).

Real model sizes, random weights built directly on the device (no checkpoint files), the
pipeline's own stages (models/t5, pipeline.denoise with UniPC + guidance, models/vae). Prints
stage times, seconds per denoising step and peak memory; the 50-step total is extrapolated from
the measured steps and says so. With --distill both runs are whole runs (text + LoRA merge +
denoise + decode; random weights, so no checkpoint read) and the 40-step one is extrapolated only
when --cfg-steps is below 40.
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
from lightx2v_sp.models.wan.lora import LoraEntry, merge_lora  # noqa: E402
from lightx2v_sp.offload import offload_dit_blocks  # noqa: E402
from lightx2v_sp.pipeline.denoise import denoise  # noqa: E402
from lightx2v_sp.pipeline.experts import install_experts  # noqa: E402
from lightx2v_sp.pipeline.image import image_condition  # noqa: E402
from lightx2v_sp.pipeline.scheduler import make_scheduler  # noqa: E402
from lightx2v_sp.pipeline.latents import initial_latents, latent_shape  # noqa: E402
from lightx2v_sp.pipeline.text import TextContexts  # noqa: E402

SIZES = {"1.3b": dict(height=480, width=832, frames=81), "14b": dict(height=720, width=1280, frames=81),
         "14b-480p": dict(height=480, width=832, frames=81),
         "a14b": dict(height=720, width=1280, frames=81), "i2v-14b": dict(height=480, width=832, frames=81),
         "tiny": dict(height=64, width=64, frames=9), "tiny-i2v": dict(height=64, width=64, frames=9)}
DISTILL_TIMESTEPS = [1000, 750, 500, 250]


def random_lora(cfg: WanConfig, rank: int, device) -> dict[str, torch.Tensor]:
    """A kohya-style LoRA on every linear layer of every block, in host memory as a file's tensors are."""
    shapes = {f"{a}.{p}": (cfg.dim, cfg.dim) for a in ("self_attn", "cross_attn") for p in "qkvo"}
    shapes.update({"ffn.0": (cfg.ffn_dim, cfg.dim), "ffn.2": (cfg.dim, cfg.ffn_dim)})
    out = {}
    for i in range(cfg.num_layers):
        for name, (rows, cols) in shapes.items():
            key = f"diffusion_model.blocks.{i}.{name}"
            out[f"{key}.lora_down.weight"] = torch.randn(rank, cols, device=device).bfloat16().cpu()
            out[f"{key}.lora_up.weight"] = (torch.randn(rows, rank, device=device) * 1e-3).bfloat16().cpu()
            out[f"{key}.alpha"] = torch.tensor(float(rank))
    return out


def on_device(make, device, dtype):
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            return make()
    finally:
        torch.set_default_dtype(default)


def stage_timer(memory: StageMemory, times: dict, device: torch.device):
    """stage(name, fn): run fn, its seconds into times[name] (CUDA-synchronised) and its peak into memory."""
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
    return stage


def text_config(wan_cfg: WanConfig, tiny: bool) -> T5Config:
    """umt5-xxl, or a toy UMT5 of the tiny DiT's text width."""
    if tiny:
        return T5Config(vocab_size=256, d_model=wan_cfg.text_dim, d_kv=16, d_ff=64, num_layers=2, num_heads=4)
    return T5Config.umt5_xxl()


def random_prompts(t5_cfg: T5Config, real_tokens: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Two prompts padded to 512 tokens as Wan pads them, `real_tokens` of them real."""
    ids = torch.randint(1, t5_cfg.vocab_size, (2, 512), device=device)
    mask = torch.zeros(2, 512, dtype=torch.long, device=device)
    mask[:, :real_tokens] = 1
    return ids, mask


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", choices=list(SIZES), default="1.3b")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--prompt-tokens", type=int, default=120, help="real tokens per prompt (of 512)")
    p.add_argument("--experts", type=int, choices=[1, 2], default=1,
                   help="2: two experts of this shape switching halfway (Wan2.2 A14B); needs --steps >= 2")
    p.add_argument("--offload", choices=["none", "block", "swap"], default="none", help="offload.dit")
    p.add_argument("--no-decode", action="store_true", help="skip the VAE decode (denoising numbers only)")
    p.add_argument("--lora-rank", type=int, default=0, help="with --distill: merge a random LoRA of this rank "
                                                            "into every block linear before offload (0: none)")
    p.add_argument("--distill", action="store_true", help="whole 4-step run without CFG (euler, timesteps "
                                                         f"{DISTILL_TIMESTEPS}) next to a whole CFG run")
    p.add_argument("--cfg-steps", type=int, default=40, help="CFG steps measured with --distill (40: no "
                                                             "extrapolation)")
    args = p.parse_args()
    if args.distill:
        return distill_main(args)
    if args.lora_rank:
        p.error("--lora-rank belongs to --distill")
    if args.experts == 2 and args.steps < 2:
        p.error("--experts 2 needs --steps >= 2 (one step per expert at least)")
    device, dtype = torch.device(args.device), torch.bfloat16 if args.device == "cuda" else torch.float32
    size = SIZES[args.config]
    tiny = args.config.startswith("tiny")
    wan_cfg = (WanConfig.tiny(in_dim=36, model_type="i2v", image_dim=32) if args.config == "tiny-i2v"
               else WanConfig.named("t2v-a14b" if args.config == "a14b" else args.config))
    t5_cfg = text_config(wan_cfg, tiny)
    cfg = load_config(None, [f"sample.steps={args.steps}", f"sample.height={size['height']}",
                             f"sample.width={size['width']}", f"sample.num_frames={size['frames']}",
                             "sample.guidance_scale=5.0", "sample.shift=3.0", f"offload.dit={args.offload}"])
    memory, times = StageMemory(device), {}
    stage = stage_timer(memory, times, device)

    with torch.no_grad():
        encoder = on_device(lambda: T5Encoder(t5_cfg), device, dtype).eval()
        ids, mask = random_prompts(t5_cfg, args.prompt_tokens, device)
        stage("text (2 prompts)", lambda: encoder(ids, mask))
        context = stage("text (2 prompts)", lambda: encoder(ids, mask))  # second call: warm
        del encoder
        # text_dim of umt5-xxl is 4096 = the DiT's text_dim
        contexts = TextContexts(cond=context[:1].to(dtype), uncond=context[1:2].to(dtype), num_tokens=[0, 0])
        shape = latent_shape(wan_cfg.out_dim, size["frames"], size["height"], size["width"])
        latents = initial_latents(0, shape, device)
        image = {}
        if wan_cfg.model_type == "i2v":
            vae_encoder, clip, pixels = build_image_encoders(wan_cfg, size, device, dtype, tiny)
            image["condition"] = stage("image: VAE encode (fp32)", lambda: image_condition(
                vae_encoder, pixels, size["frames"], device).to(device))
            if clip is not None:
                clip_in = torch.randn(1, 3, clip.config.image_size, clip.config.image_size, device=device, dtype=dtype)
                image["image_context"] = stage("image: CLIP", lambda: clip(
                    pixel_values=clip_in, output_hidden_states=True).hidden_states[-2])
            del vae_encoder, clip
        dims = ParallelDims()
        timer: dict = {"steps": [], "switch": None, "last": None}
        if args.experts == 1 and args.offload == "none":
            model = on_device(lambda: WanModel(wan_cfg), device, dtype).set_dtype(dtype).eval()
        else:
            model, timer = build_experts(args, wan_cfg, cfg, dims, device, dtype)
        warm = load_config(None, ["sample.steps=1", f"offload.dit={args.offload}"])
        stage("denoise warm-up (1 step)", lambda: denoise(model, latents, contexts, warm, dims, False, **image))
        timer.update(steps=[], switch=None, last=None)
        out = stage(f"denoise ({args.steps} steps, CFG)", lambda: denoise(model, latents, contexts, cfg, dims, False,
                                                                          **image))
        if args.experts == 2 or args.offload != "none":
            model.release()
        del model
        torch.cuda.empty_cache() if device.type == "cuda" else None
        if args.no_decode:
            return report(args, size, shape, None, times, memory, device, timer)
        vae_model = on_device(lambda: __import__("diffusers").AutoencoderKLWan(
            **({"base_dim": 16, "z_dim": 16, "num_res_blocks": 1} if tiny else {})), device, torch.float32)
        vae = WanVAE(vae_model.eval())
        video = stage("VAE decode (fp32)", lambda: vae.decode(out, device=device))
    report(args, size, shape, video, times, memory, device, timer)


def build_image_encoders(wan_cfg, size, device, dtype, tiny):
    """Random Wan VAE (fp32), random CLIP ViT-H/14 vision tower (Wan2.1 I2V only) and a random image."""
    from diffusers import AutoencoderKLWan
    from transformers import CLIPVisionConfig, CLIPVisionModel

    vae = WanVAE(on_device(lambda: AutoencoderKLWan(**({"base_dim": 16, "z_dim": 16, "num_res_blocks": 1}
                                                       if tiny else {})), device, torch.float32).eval())
    clip = None
    if wan_cfg.image_dim is not None:
        vit_h = (dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32,
                      patch_size=8) if tiny else
                 dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16,
                      image_size=224, patch_size=14, hidden_act="gelu"))
        clip = on_device(lambda: CLIPVisionModel(CLIPVisionConfig(**vit_h)), device, dtype).eval()
    pixels = torch.rand(1, 3, size["height"], size["width"], device=device) * 2 - 1
    return vae, clip, pixels


def build_experts(args, wan_cfg, cfg, dims, device, dtype):
    """`args.experts` random DiTs placed per `--offload`, switching halfway through `--steps`, and the
    timer that their `select` fills as it is called: seconds between steps, and of the switch."""
    models = []
    for _ in range(args.experts):
        model = on_device(lambda: WanModel(wan_cfg), device, dtype).set_dtype(dtype).eval()
        models.append(model.to("cpu") if args.offload != "none" else model)  # offload places it from the host
        if device.type == "cuda":
            torch.cuda.empty_cache()
    steps = make_scheduler("unipc", args.steps, cfg.sample.shift).timesteps.tolist()
    half = args.steps // 2  # the boundary sits between the two middle timesteps
    boundary = (steps[half - 1] + steps[half]) / 2000 if args.experts == 2 else None
    experts = install_experts(models, cfg, dims, device, boundary)
    timer: dict = {"steps": [], "switch": None, "last": None}
    select = experts.select

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def timed_select(t):
        sync()
        now = time.perf_counter()
        if timer["last"] is not None:
            timer["steps"].append(now - timer["last"])
        before = experts.active
        chosen = select(t)
        sync()
        if before is not None and experts.active != before:
            timer["switch"] = time.perf_counter() - now
        timer["last"] = now
        return chosen

    experts.select = timed_select
    return experts, timer


def report(args, size, shape, video, times, memory, device, timer) -> None:
    step_times, switch = timer["steps"], timer["switch"]
    per_step = times[f"denoise ({args.steps} steps, CFG)"] / args.steps
    where = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    what = (f"Wan2.2-A14B-style two experts of Wan2.1-{'14b' if args.config == 'a14b' else args.config}"
            if args.experts == 2 else f"Wan2.1-{args.config}")
    video_shape = list(video.shape) if video is not None else "not decoded"
    print(f"End to end, {what} shapes with random weights, offload.dit={args.offload}, {size['frames']}x"
          f"{size['height']}x{size['width']} -> latents {list(shape)}, video {video_shape}, {where}, "
          f"torch {torch.__version__}\n")
    print("| stage | seconds | peak GiB |")
    print("|---|---:|---:|")
    peaks = memory.as_dict()
    for name, t in times.items():
        peak = (peaks.get(name) or {}).get("allocated_bytes")
        print(f"| {name} | {t:.2f} | {peak / 2**30 if peak else float('nan'):.2f} |")
    print(f"| seconds per denoising step (2 DiT forwards) | {per_step:.3f} | |")
    if step_times:
        # the last step ends with the denoise stage: its time is the stage's remainder
        last = times[f"denoise ({args.steps} steps, CFG)"] - sum(step_times)
        for i, t in enumerate([*step_times, last]):
            print(f"| step {i + 1} (expert {'high' if i < args.steps // 2 else 'low'}-noise) | {t:.3f} | |")
    if switch is not None:
        print(f"| expert switch (included in its step) | {switch:.3f} | |")
    if video is not None:
        total50 = times["text (2 prompts)"] + 50 * per_step + times["VAE decode (fp32)"]
        print(f"| 50-step run, extrapolated: text + 50 x step + decode | {total50:.1f} | |")


def distill_main(args) -> None:
    device, dtype = torch.device(args.device), torch.bfloat16 if args.device == "cuda" else torch.float32
    size = SIZES[args.config]
    tiny = args.config == "tiny"
    wan_cfg = WanConfig.named(args.config.split("-")[0])
    t5_cfg = text_config(wan_cfg, tiny)
    common = [f"sample.height={size['height']}", f"sample.width={size['width']}",
              f"sample.num_frames={size['frames']}", "sample.shift=5.0"]
    distill_cfg = load_config(None, common + ["sample.steps=4", "sample.guidance_scale=1", "sample.scheduler=euler",
                                              f"sample.timesteps=[{','.join(map(str, DISTILL_TIMESTEPS))}]"])
    cfg_cfg = load_config(None, common + [f"sample.steps={args.cfg_steps}", "sample.guidance_scale=5.0"])
    memory, times = StageMemory(device), {}
    stage = stage_timer(memory, times, device)

    with torch.no_grad():
        encoder = on_device(lambda: T5Encoder(t5_cfg), device, dtype).eval()
        ids, mask = random_prompts(t5_cfg, args.prompt_tokens, device)
        encoder(ids, mask)  # warm-up
        one = stage("text, 1 prompt (no CFG)", lambda: encoder(ids[:1], mask[:1]))
        two = stage("text, 2 prompts (CFG)", lambda: encoder(ids, mask))
        del encoder
        model = on_device(lambda: WanModel(wan_cfg), device, dtype).set_dtype(dtype).eval()
        if args.lora_rank:
            lora = random_lora(wan_cfg, args.lora_rank, device)
            summary = stage(f"LoRA merge (rank {args.lora_rank}, {len(lora) // 3} linears)",
                            lambda: merge_lora(model, [LoraEntry(lora, 1.0)], device=device))
            assert summary[0]["tensors_updated"] == len(lora) // 3
            del lora
        if args.offload == "block":
            stage("block offload install (pin)", lambda: offload_dit_blocks(model, device))
        shape = latent_shape(wan_cfg.in_dim, size["frames"], size["height"], size["width"])
        latents = initial_latents(0, shape, device)
        dims = ParallelDims()
        ctx1 = TextContexts(cond=one[:1].to(dtype), uncond=None, num_tokens=[0])
        ctx2 = TextContexts(cond=two[:1].to(dtype), uncond=two[1:2].to(dtype), num_tokens=[0, 0])
        stage("denoise warm-up (1 step, no CFG)", lambda: denoise(model, latents, ctx1, load_config(
            None, common + ["sample.steps=1", "sample.guidance_scale=1"]), dims, False))
        stats_d, stats_c = {}, {}
        out_d = stage("denoise, 4 steps, no CFG", lambda: denoise(model, latents, ctx1, distill_cfg, dims, False,
                                                                   stats=stats_d))
        stage(f"denoise, {args.cfg_steps} steps, CFG 5", lambda: denoise(model, latents, ctx2, cfg_cfg, dims, False,
                                                                        stats=stats_c))
        del model
        torch.cuda.empty_cache() if device.type == "cuda" else None
        vae_model = on_device(lambda: __import__("diffusers").AutoencoderKLWan(
            **({"base_dim": 16, "z_dim": 16, "num_res_blocks": 1} if tiny else {})), device, torch.float32)
        vae = WanVAE(vae_model.eval())
        stage("VAE decode (fp32)", lambda: vae.decode(out_d, device=device))
    assert stats_d["dit_forwards"] == 4 and stats_c["dit_forwards"] == 2 * args.cfg_steps, (stats_d, stats_c)
    merge = sum(t for k, t in times.items() if k.startswith("LoRA merge"))
    decode = times["VAE decode (fp32)"]
    t_d = times["denoise, 4 steps, no CFG"]
    t_c = times[f"denoise, {args.cfg_steps} steps, CFG 5"]
    where = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    print(f"Wan2.1-{args.config} with random weights, {size['frames']}x{size['height']}x{size['width']} -> latents "
          f"{list(shape)}, offload.dit={args.offload}, LoRA rank {args.lora_rank or '-'}, {where}, "
          f"torch {torch.__version__}\n")
    print("| stage | seconds | peak GiB |")
    print("|---|---:|---:|")
    peaks = memory.as_dict()
    for name, t in times.items():
        peak = (peaks.get(name) or {}).get("allocated_bytes")
        print(f"| {name} | {t:.2f} | {peak / 2**30 if peak else float('nan'):.2f} |")
    print(f"| seconds per step: no CFG (1 DiT forward) / CFG (2 DiT forwards) | {t_d / 4:.3f} / "
          f"{t_c / args.cfg_steps:.3f} | |")
    whole_d = times["text, 1 prompt (no CFG)"] + merge + t_d + decode
    print(f"| **whole 4-step run, no CFG** (text 1 prompt + LoRA merge + 4 steps + decode) | **{whole_d:.1f}** | |")
    label = "whole 40-step CFG run" if args.cfg_steps == 40 else \
        f"40-step CFG run, EXTRAPOLATED from {args.cfg_steps} measured steps"
    whole_c = times["text, 2 prompts (CFG)"] + 40 * t_c / args.cfg_steps + decode
    print(f"| **{label}** (text 2 prompts + 40 steps + decode, no LoRA merge) | **{whole_c:.1f}** | |")
    print(f"| speed-up | {whole_c / whole_d:.1f}x | |")
    print("\nThe VAE decode is measured once (same shapes in both runs). DiT forwards counted by "
          f"pipeline.denoise: {stats_d['dit_forwards']} (no CFG) and {stats_c['dit_forwards']} (CFG). Not "
          "included: reading checkpoints from disk (the weights are random, built on the device).")


if __name__ == "__main__":
    main()
