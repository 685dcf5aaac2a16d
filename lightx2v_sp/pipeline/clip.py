"""Wan2.1 I2V's image context: CLIP ViT-H/14 features of the input image.

The image processor (resize the short side, centre-crop, CLIP's normalisation) and the vision
tower are transformers' `CLIPImageProcessor` / `CLIPVisionModel`, read from the -Diffusers layout's
image_processor/ and image_encoder/ folders. The DiT takes the penultimate layer's hidden states
(257 tokens x 1280 for ViT-H/14 at 224 px), as Wan does (`use_31_block`) and diffusers does
(`hidden_states[-2]`). Rank 0 encodes the one image and broadcasts the tokens: every rank
conditions on the same bits, and the encoder is loaded once per job, placed per
`image_encoder.device` (gpu, cpu, or swap: on the GPU only for this stage).
"""
from __future__ import annotations

import json
import os

import torch

from lightx2v_sp.distributed.broadcast import from_rank0

from .checks import agreed
from .image import open_image


def clip_token_shape(encoder_dir: str) -> tuple[int, int]:
    """(tokens, width) of the encoder's hidden states, from its config.json (every rank reads it)."""
    with open(os.path.join(encoder_dir, "config.json")) as f:
        cfg = json.load(f)
    cfg = cfg.get("vision_config", cfg)
    return (cfg["image_size"] // cfg["patch_size"]) ** 2 + 1, cfg["hidden_size"]


def check_clip(encoder_dir: str, processor_dir: str, image_dim: int) -> None:
    """The encoder exists, is a CLIP vision tower, and its width is the DiT's image_dim."""
    try:
        tokens, width = clip_token_shape(encoder_dir)
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"the CLIP image encoder at {encoder_dir} has no readable config.json with image_size, "
                         f"patch_size and hidden_size ({type(e).__name__}: {e})") from None
    if width != image_dim:
        raise ValueError(f"the CLIP image encoder at {encoder_dir} gives {width}-wide tokens, the DiT's image "
                         f"branch takes image_dim={image_dim}; they are not one model")
    if not os.path.isdir(processor_dir):
        raise ValueError(f"no CLIP image processor at {processor_dir}; it says how the image is resized, "
                         "cropped and normalised for the encoder")


def _encode(image_path: str, encoder_dir: str, processor_dir: str, placement_mode: str, dtype: torch.dtype,
            device: torch.device) -> torch.Tensor:
    from transformers import AutoImageProcessor, CLIPVisionModel

    from lightx2v_sp.offload import ComponentPlacement

    processor = AutoImageProcessor.from_pretrained(processor_dir, local_files_only=True)
    encoder = CLIPVisionModel.from_pretrained(encoder_dir, local_files_only=True, torch_dtype=dtype).eval()
    pixels = processor(images=open_image(image_path), return_tensors="pt")["pixel_values"]
    # loaded for this one call and dropped after it: swap's pinned host copy would serve no second visit
    mode = "gpu" if placement_mode == "swap" else placement_mode
    placement = ComponentPlacement(encoder, mode, device, name="image_encoder")
    with torch.no_grad(), placement.on_device() as enc:
        run_on = placement.execution_device
        hidden = enc(pixel_values=pixels.to(run_on, dtype), output_hidden_states=True).hidden_states[-2]
    return hidden.float().cpu()


def encode_clip(cfg, encoder_dir: str, processor_dir: str, device: torch.device, dtype: torch.dtype,
                world: int, rank: int) -> torch.Tensor:
    """CLIP tokens [1, L, width] fp32 of `cfg.image` on every rank (rank 0 encodes)."""
    tokens, width = clip_token_shape(encoder_dir)

    def encode():
        if rank != 0:
            return None
        out = _encode(cfg.image, encoder_dir, processor_dir, cfg.image_encoder.device, dtype, device)
        if tuple(out.shape) != (1, tokens, width):
            raise ValueError(f"the CLIP encoder at {encoder_dir} returned {tuple(out.shape)}, its config says "
                             f"(1, {tokens}, {width})")
        return out

    out = agreed("encoding the image with CLIP", encode)
    return from_rank0(out, (1, tokens, width), device)
