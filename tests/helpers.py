"""Helpers shared by the tests (one module; tests import it, never each other).

- the tiny Wan DiT against diffusers' WanTransformer3DModel: config, randomised reference, inputs
  (used by test_wan_*.py and the pipeline comparisons);
- a toy DiT of plain blocks for the offload tests;
- a tiny diffusers WanPipeline saved by diffusers itself, and runs of it: the end-to-end
  reference. The pipeline holds the embedded tiny model's text encoder, tokenizer and VAE and a
  randomised diffusers transformer of the tiny DiT's shape (no zero or identity parts, so every
  weight a LoRA touches matters). `diffusers_video` runs `WanPipeline.__call__` from the latents our
  run starts from, so both sides integrate the same ODE from the same point.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from lightx2v_sp.models import tiny
from lightx2v_sp.models.wan import WanConfig
from lightx2v_sp.pipeline.latents import initial_latents, latent_shape

# 5 x 10 x 14 latents -> 5 x 5 x 7 = 175 tokens: not divisible by 2 or 3, every RoPE axis > 1.
LATENT = (16, 5, 10, 14)
TEXT_LEN = 7
# fp32 parity: both sides do the same math in a different operation order (fused QKV GEMM,
# patch embedding as a GEMM, RoPE as x*cos + swap(x)*sin, fused addcmul). Each op adds a few
# ulps (fp32 eps 1.2e-7) on O(1) activations (max |out| ~ 4); over 2 layers that stays near
# 1e-6 (observed <= 1.2e-6). 2e-5 leaves over 15x margin and is still 4-5 orders below any real bug (a swapped or
# mis-mapped weight moves outputs by O(0.1-1)).
ATOL = 2e-5


def tiny_config(**overrides) -> WanConfig:
    return WanConfig.tiny(**overrides)


def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random weights with no identity parts (norm weights != 1, biases != 0), O(1) activations."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.2 * noise)
            elif p.ndim >= 2 and "scale_shift_table" not in name and "modulation" not in name:
                p.copy_(noise * 0.7 / p[0].numel() ** 0.5)  # ~unit gain per layer
            else:
                p.copy_(0.2 * noise)
    return model


def diffusers_model(cfg: WanConfig, seed: int = 0):
    from diffusers import WanTransformer3DModel

    kwargs = {k: v for k, v in cfg.to_diffusers().items() if not k.startswith("_")}
    return randomize_(WanTransformer3DModel(**kwargs), seed).eval()


def token_timesteps(t: torch.Tensor, grid=(5, 5, 7)) -> torch.Tensor:
    """[B] -> [B, S] per-token timesteps as Wan2.2 TI2V uses them: 0 on the first latent frame, t after."""
    ts = t[:, None, None, None].expand(-1, *grid).clone()
    ts[:, 0] = 0
    return ts.flatten(1)


def make_inputs(cfg: WanConfig, batch: int = 1, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, *LATENT, generator=gen)
    t = torch.tensor([900.0, 125.5, 3.0][:batch])
    ctx = torch.randn(batch, TEXT_LEN, cfg.text_dim, generator=gen)
    return x, t, ctx


@torch.no_grad()
def diffusers_forward(ref, x, t, ctx) -> torch.Tensor:
    return ref(x, t, ctx, return_dict=False)[0]


DIM = 16


class ToyBlock(nn.Module):
    """Linear layers, a norm, a parameter in another dtype and a buffer: what a DiT block holds."""

    def __init__(self, dim=DIM, dtype=torch.float32):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, 2 * dim)
        self.fc2 = nn.Linear(2 * dim, dim)
        self.to(dtype)
        self.modulation = nn.Parameter(torch.randn(1, 2, dim))  # stays fp32, like Wan's
        self.register_buffer("shift", torch.randn(dim, dtype=dtype))
        self.fail = False

    def forward(self, x):
        if self.fail:
            raise RuntimeError("planted failure")
        scale, gate = (self.modulation.to(x.dtype) + 1).unbind(1)
        h = self.fc2(F.gelu(self.fc1(self.norm(x) * scale)))
        return x + gate * h + self.shift


class ToyModel(nn.Module):
    def __init__(self, num_blocks, dtype=torch.float32):
        super().__init__()
        self.embed = nn.Linear(DIM, DIM).to(dtype)
        self.blocks = nn.ModuleList(ToyBlock(DIM, dtype) for _ in range(num_blocks))
        self.head = nn.Linear(DIM, DIM).to(dtype)

    def forward(self, x):
        x = self.embed(x)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


SHIFT = 3.0  # the tiny config's sample.shift


def tiny_wan_config() -> WanConfig:
    return WanConfig(**tiny.TINY_WAN)


def save_diffusers_pipeline(path: str, seed: int = 5) -> str:
    """WanPipeline(...).save_pretrained(path): the tiny components, a random transformer, UniPC as Wan uses it."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline
    from transformers import AutoTokenizer, UMT5EncoderModel


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


# --- fp8 DiT checkpoints in the community layouts (issue 24), written from their public descriptions:
# ComfyUI's comfy/ops.py + comfy/utils.py (scaled_fp8, comfy_quant) and LightX2V's converter (weight_scale
# [out, 1]). Keys are official Wan names; `prefix` is what the file puts in front of them.

FP8 = torch.float8_e4m3fn
FP8_BLOCK_LINEARS = ("self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o", "cross_attn.q", "cross_attn.k",
                     "cross_attn.v", "cross_attn.o", "ffn.0", "ffn.2")
FP8_FORMATS = ("plain", "scaled_fp8", "comfy_quant", "comfy_metadata", "lightx2v")


def tiny_dit_state(variant: str = "wan2.1-t2v", expert: str | None = None) -> dict[str, torch.Tensor]:
    """The embedded tiny DiT's tensors (official names, fp32), read from its file."""
    from safetensors.torch import load_file

    root = tiny.ensure_tiny_model(variant=variant)
    return load_file(os.path.join(root, expert or "", "diffusion_pytorch_model.safetensors"))


def spread_rows(state: dict, seed: int = 0, decades: float = 4.5, gain: float = 1.0) -> dict[str, torch.Tensor]:
    """The same function with rows of very different magnitudes: each q and k row (weight and bias) of
    both attentions times 10**U(-decades, 0), the q / k RMSNorm weight of that channel divided by it.
    The norm undoes the factor (its rms is set by the large rows), so small rows matter as much as
    large ones: one scale per tensor would flush them into e4m3's subnormals, one per row does not."""
    gen = torch.Generator().manual_seed(seed)
    out = dict(state)
    for key in state:
        if not key.endswith(("attn.q.weight", "attn.k.weight")):
            continue
        layer = key[:-len(".weight")]
        s = 10 ** (-decades * torch.rand(state[key].shape[0], generator=gen, dtype=torch.float64))
        norm = layer.rsplit(".", 1)[0] + ".norm_" + layer.rsplit(".", 1)[1] + ".weight"
        out[key] = (state[key].double() * s[:, None]).float()
        out[layer + ".bias"] = (state[layer + ".bias"].double() * s).float()
        out[norm] = (state[norm].double() * gain / s).float()
    return out


def _fp8_layers(state: dict, extra: tuple = ()) -> list[str]:
    blocks = {k.split(".")[1] for k in state if k.startswith("blocks.")}
    return [f"blocks.{b}.{n}" for b in sorted(blocks) for n in FP8_BLOCK_LINEARS] + list(extra)


def community_fp8(state: dict, fmt: str, prefix: str = "") -> tuple[dict, dict]:
    """(tensors, header metadata) of `state` written as a community fp8 file of format `fmt`."""
    import json

    out, meta = {}, {}
    # scaled files also quantize some layers the runtime keeps in the compute dtype: they are dequantized
    extra = ("text_embedding.2", "time_projection.1") if fmt != "lightx2v" else ()
    layers = _fp8_layers(state, extra)
    for key, t in state.items():
        out[prefix + key] = t
    for layer in layers:
        w = state[layer + ".weight"].float()
        k = prefix + layer
        if fmt == "plain":
            out[k + ".weight"] = w.clamp(-448, 448).to(FP8)
            continue
        per_row = fmt == "lightx2v"
        amax = w.abs().amax(dim=1, keepdim=True) if per_row else w.abs().amax()
        scale = (amax / 448).clamp_min(1e-12).float()
        out[k + ".weight"] = (w / scale).clamp(-448, 448).to(FP8)
        if fmt == "scaled_fp8":
            out[k + ".scale_weight"], out[k + ".scale_input"] = scale.reshape(()), torch.tensor(1.0)
        elif fmt == "comfy_quant":
            out[k + ".weight_scale"], out[k + ".input_scale"] = scale.reshape(()), torch.tensor(0.5)
            out[k + ".comfy_quant"] = torch.tensor(list(json.dumps({"format": "float8_e4m3fn"}).encode()),
                                                    dtype=torch.uint8)
        elif fmt == "comfy_metadata":
            out[k + ".weight_scale"] = scale.reshape(())
            meta.setdefault("layers", {})[k] = {"format": "float8_e4m3fn"}
        else:  # lightx2v: one scale per output row, [out, 1]
            out[k + ".weight_scale"] = scale
    if fmt == "scaled_fp8":
        out[prefix + "scaled_fp8"] = torch.empty(0, dtype=FP8)
    return out, ({"_quantization_metadata": json.dumps(meta)} if meta else {})


def dequantized(tensors: dict, prefix: str = "") -> dict[str, torch.Tensor]:
    """What a community fp8 file means in fp32: weight x scale, side tensors dropped, names unprefixed."""
    out = {}
    for key, t in tensors.items():
        name = key[len(prefix):]
        if name == "scaled_fp8" or name.endswith((".scale_weight", ".weight_scale", ".scale_input", ".input_scale",
                                                  ".comfy_quant")):
            continue
        if t.dtype == FP8:
            layer = key[:-len(".weight")]
            scale = tensors.get(layer + ".scale_weight", tensors.get(layer + ".weight_scale", torch.tensor(1.0)))
            t = t.float() * scale.float()
        out[name] = t
    return out


def write_safetensors(tensors: dict, path: str, metadata: dict | None = None) -> str:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tensors.items()}, path, metadata=metadata)
    return path
