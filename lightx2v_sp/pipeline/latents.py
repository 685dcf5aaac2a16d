"""The initial noise: one draw from the seed, identical on every rank and every layout.

It is drawn on the CPU with its own torch.Generator (never the global RNG, never a device RNG,
whose streams differ between CPU and CUDA and between GPU models), then moved to the device.
So single-process, Ulysses and CFG-parallel runs start from bit-identical latents.
"""
from __future__ import annotations

import torch

# Wan2.1's VAE compresses time by 4 (the first frame alone) and space by 8.
VAE_TEMPORAL_STRIDE = 4
VAE_SPATIAL_STRIDE = 8


def latent_shape(channels: int, num_frames: int, height: int, width: int,
                 temporal_stride: int = VAE_TEMPORAL_STRIDE, spatial_stride: int = VAE_SPATIAL_STRIDE):
    """[C, F, H, W] of the latents of a `num_frames` x `height` x `width` video."""
    if (num_frames - 1) % temporal_stride or height % spatial_stride or width % spatial_stride:
        raise ValueError(f"video {num_frames}x{height}x{width} does not map onto whole latents: frames must be "
                         f"{temporal_stride}k+1, height and width multiples of {spatial_stride}")
    return (channels, (num_frames - 1) // temporal_stride + 1, height // spatial_stride, width // spatial_stride)


def initial_latents(seed: int, shape, device: torch.device | str = "cpu", batch: int = 1) -> torch.Tensor:
    """fp32 N(0, 1) latents [batch, *shape] from `seed`, the same bits on every rank and device."""
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    return torch.randn((batch, *shape), generator=gen, dtype=torch.float32).to(device)
