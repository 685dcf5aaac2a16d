"""What the image of an image-to-video run becomes, per model kind (keyword arguments of `denoise`).

- Wan2.2 I2V-A14B: `condition` = mask + VAE latents of [image, black frames], concatenated to the noise;
- Wan2.1 I2V: the same, plus `image_context` = the image's CLIP tokens for the DiT's image branch;
- Wan2.2 TI2V-5B with an image: `first_frame` = the image's VAE latents, the first latent frame itself.
Text-to-video runs (and TI2V without an image) get none.
"""
from __future__ import annotations

import torch

from .clip import encode_clip
from .image import encode_image_condition


def needs_image_stage(kind, cfg) -> bool:
    return kind.image_input or (kind.first_frame and cfg.image is not None)


def image_inputs(cfg, kind, vae, latent_shape: tuple[int, ...], condition_dim: int, device: torch.device,
                 dtype: torch.dtype, world: int, rank: int) -> dict:
    """`denoise` keyword arguments for the image of `cfg` on every rank (rank 0 encodes; see image.py)."""
    z, _, h, w = latent_shape
    if kind.first_frame:
        if cfg.image is None:
            return {}
        return {"first_frame": encode_image_condition(cfg, vae, (z, 1, h, w), device, world, rank, first_frame=True)}
    if not kind.image_input:
        return {}
    out = {"condition": encode_image_condition(cfg, vae, (condition_dim, *latent_shape[1:]), device, world, rank)}
    if kind.image_encoder is not None:
        out["image_context"] = encode_clip(cfg, kind.image_encoder, kind.image_processor, device, dtype, world, rank)
    return out
