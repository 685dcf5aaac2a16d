"""A tiny diffusers WanPipeline saved by diffusers itself, and runs of it: the end-to-end reference.

The pipeline holds the embedded tiny model's text encoder, tokenizer and VAE and a randomised
diffusers transformer of the tiny DiT's shape (no zero or identity parts, so every weight a LoRA
touches matters). `diffusers_video` runs `WanPipeline.__call__` from the latents our run starts
from, so both sides integrate the same ODE from the same point.
"""
from __future__ import annotations

import os

import torch

from lightx2v_sp.models import tiny
from lightx2v_sp.models.wan import WanConfig
from lightx2v_sp.pipeline.latents import initial_latents, latent_shape

SHIFT = 3.0  # the tiny config's sample.shift


def tiny_wan_config() -> WanConfig:
    return WanConfig(**tiny.TINY_WAN)


def save_diffusers_pipeline(path: str, seed: int = 5) -> str:
    """WanPipeline(...).save_pretrained(path): the tiny components, a random transformer, UniPC as Wan uses it."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline
    from transformers import AutoTokenizer, UMT5EncoderModel

    from test_wan_model import diffusers_model

    src = tiny.ensure_tiny_model()
    pipe = WanPipeline(
        tokenizer=AutoTokenizer.from_pretrained(os.path.join(src, "tokenizer")),
        text_encoder=UMT5EncoderModel.from_pretrained(os.path.join(src, "text_encoder")),
        transformer=diffusers_model(tiny_wan_config(), seed=seed),
        vae=AutoencoderKLWan.from_pretrained(os.path.join(src, "vae")),
        scheduler=UniPCMultistepScheduler(num_train_timesteps=1000, prediction_type="flow_prediction",
                                          use_flow_sigmas=True, flow_shift=SHIFT, solver_order=2, solver_type="bh2",
                                          lower_order_final=True, final_sigmas_type="zero"))
    pipe.save_pretrained(path, safe_serialization=True)
    return path


def load_pipeline(path: str):
    from diffusers import WanPipeline

    return WanPipeline.from_pretrained(path, torch_dtype=torch.float32)


@torch.no_grad()
def diffusers_video(pipe, cfg, count_forwards: list | None = None) -> torch.Tensor:
    """[F, H, W, 3] in [0, 1] from pipe(...) with the run's prompts, sizes, steps and initial latents."""
    s = cfg.sample
    shape = latent_shape(pipe.transformer.config.in_channels, s.num_frames, s.height, s.width)
    latents = initial_latents(cfg.seed, shape, torch.device("cpu"))
    handle = None
    if count_forwards is not None:
        handle = pipe.transformer.register_forward_pre_hook(lambda *_: count_forwards.append(1))
    try:
        out = pipe(prompt=cfg.prompt, negative_prompt=cfg.negative_prompt, height=s.height, width=s.width,
                   num_frames=s.num_frames, num_inference_steps=s.steps, guidance_scale=s.guidance_scale,
                   latents=latents, max_sequence_length=cfg.text_encoder.text_len, output_type="pt")
    finally:
        if handle is not None:
            handle.remove()
    return out.frames[0].permute(0, 2, 3, 1).float()  # [F, 3, H, W] -> [F, H, W, 3]


def our_video(result) -> torch.Tensor:
    """RunResult.video [3, F, H, W] in [-1, 1] -> [F, H, W, 3] in [0, 1], as diffusers post-processes."""
    return (result.video.float() / 2 + 0.5).clamp(0, 1).permute(1, 2, 3, 0)


# --- LoRAs made the way diffusers users make them: peft adapters, saved by WanPipeline.save_lora_weights

def make_peft_lora(path: str, target_modules: list[str], rank: int, alpha: float, seed: int, lora_bias: bool = False,
                   alpha_pattern: dict | None = None) -> str:
    """A random LoRA for the tiny transformer, written by diffusers; returns the .safetensors path."""
    from diffusers import WanPipeline
    from peft import LoraConfig, get_peft_model_state_dict

    from test_wan_model import diffusers_model

    model = diffusers_model(tiny_wan_config(), seed=0)
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=target_modules, lora_bias=lora_bias,
                        alpha_pattern=alpha_pattern or {}, init_lora_weights=False)
    model.add_adapter(config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_A" in name:
                p.copy_(torch.randn(p.shape, generator=gen) / p.shape[1] ** 0.5)
            elif "lora_B" in name:  # weights and biases: an update of ~5% of a layer's output
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05 / rank ** 0.5)
    WanPipeline.save_lora_weights(path, transformer_lora_layers=get_peft_model_state_dict(model),
                                  transformer_lora_adapter_metadata=config.to_dict())
    return os.path.join(path, "pytorch_lora_weights.safetensors")


_BLOCK = {"attn1.to_q": "self_attn.q", "attn1.to_k": "self_attn.k", "attn1.to_v": "self_attn.v",
          "attn1.to_out.0": "self_attn.o", "attn2.to_q": "cross_attn.q", "attn2.to_k": "cross_attn.k",
          "attn2.to_v": "cross_attn.v", "attn2.to_out.0": "cross_attn.o", "ffn.net.0.proj": "ffn.0",
          "ffn.net.2": "ffn.2"}
_TOP = {"proj_out": "head.head", "condition_embedder.time_proj": "time_projection.1",
        "condition_embedder.text_embedder.linear_1": "text_embedding.0",
        "condition_embedder.time_embedder.linear_1": "time_embedding.0"}


def to_kohya(src: str, dst: str) -> str:
    """The same adapter in the ComfyUI/kohya layout: official names, lora_down/lora_up, .alpha per block
    module, lora_B.bias as .diff_b (which carries no alpha, so it holds alpha/rank * bias).

    diffusers' converter reads no .alpha outside the blocks, so there the alpha/rank factor is folded
    into lora_up (which is how such files store it)."""
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    from lightx2v_sp.models.wan.lora import _peft_alpha

    with safe_open(src, framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = json.loads(f.metadata()["lora_adapter_metadata"])
    out = {}
    for key, t in tensors.items():
        module, kind = key.removeprefix("transformer.").split(".lora_")
        if module.startswith("blocks."):
            i, rest = module[len("blocks."):].split(".", 1)
            name, in_block = f"blocks.{i}.{_BLOCK[rest]}", True
        else:
            name, in_block = _TOP[module], False
        rank = tensors[f"transformer.{module}.lora_A.weight"].shape[0]
        s = _peft_alpha(meta, module, rank)
        if kind == "A.weight":
            out[f"diffusion_model.{name}.lora_down.weight"] = t
            if in_block:
                out[f"diffusion_model.{name}.alpha"] = torch.tensor(s * rank)
        elif kind == "B.weight":
            out[f"diffusion_model.{name}.lora_up.weight"] = t if in_block else t * s
        else:  # B.bias
            out[f"diffusion_model.{name}.diff_b"] = t * s
    save_file(out, dst)
    return dst
