"""Exact decode of a band of latent rows with the Wan2.1 VAE (diffusers' AutoencoderKLWan, or
vae_decoder.WanVAEDecoder: the same module names).

The decoder is, per latent frame: conv_in -> mid block (two residual blocks around a
single-head attention over the whole H x W of the frame) -> up blocks (residual blocks, then
2x nearest upsampling + a 3x3 conv) -> norm, conv_out. Everything after the mid block is local
in space: RMS norms normalise over channels, the causal convs see one row above and below per
3x3 conv, nearest upsampling maps row i to rows 2i and 2i+1, and the caches of the causal convs
hold earlier frames at the same rows. The attention is global, so conv_in and the mid block
always run on the full frame (the lowest resolution: a few percent of the decoder's work).

To decode output rows [8a, 8b) exactly, the output of the mid block and of every later residual
block / upsampler is cropped (by forward hooks) to the rows the rest of the decoder still needs:
the band plus a halo that shrinks as the resolution grows. A 3x3 conv fed zeros past a cut
spoils one row next to it; the halo at each stage is the number of rows the remaining convs
would spoil, so the band itself equals the full decode up to floating-point reassociation.
At the image edges the crop stops at row 0 / H, where the full decode pads with zeros too.
For Wan2.1's VAE the halo is 13 latent rows after the mid block and 7 pixel rows at the top.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn


@dataclass(frozen=True)
class Stage:
    """A module whose output gets cropped: `factor` rows per latent row, `halo` extra rows each side."""

    module: nn.Module
    factor: int
    halo: int


def _rows_spoiled(conv: nn.Module) -> int:
    """Rows next to a cut that a conv computes from padding instead of the real neighbours."""
    if hasattr(conv, "_padding"):  # WanCausalConv3d: (w, w, h, h, t, 0)
        return int(conv._padding[2])
    pad = getattr(conv, "padding", 0)
    return int(pad[0] if isinstance(pad, (tuple, list)) else pad)


def unsupported_reason(vae) -> str | None:
    """Why `vae` cannot be decoded in row bands (None when it can)."""
    dec = getattr(vae, "decoder", None)
    if dec is None or not hasattr(dec, "mid_block"):
        return f"{type(vae).__name__} is not a Wan VAE (diffusers' AutoencoderKLWan or vae_decoder.WanVAEDecoder)"
    if getattr(vae.config, "patch_size", None) is not None:
        return "the VAE unpatchifies its output (Wan2.2 layout)"
    if getattr(vae.config, "is_residual", False):
        return "its up blocks are residual (Wan2.2 layout)"
    return None


def decoder_stages(decoder: nn.Module) -> tuple[list[Stage], int]:
    """The cropped stages in execution order, and the output's rows per latent row."""
    walk: list[tuple[nn.Module, int, int]] = []  # (module, factor at its output, rows its convs spoil)
    factor = 1
    for block in decoder.up_blocks:
        for res in block.resnets:
            walk.append((res, factor, _rows_spoiled(res.conv1) + _rows_spoiled(res.conv2)))
        if block.upsamplers is not None:
            up = block.upsamplers[0]
            if up.mode in ("upsample2d", "upsample3d"):
                factor *= 2
                walk.append((up, factor, _rows_spoiled(up.resample[1])))
    need = _rows_spoiled(decoder.conv_out)  # what the head (norm + conv_out) spoils after the last stage
    stages: list[Stage] = []
    for i in range(len(walk) - 1, -1, -1):
        module, f, _ = walk[i]
        stages.append(Stage(module, f, need))
        prev_factor = walk[i - 1][1] if i > 0 else 1
        need = math.ceil((need + walk[i][2]) * prev_factor / f)  # halo the input of this stage needs
    stages.append(Stage(decoder.mid_block, 1, need))
    return stages[::-1], factor


def halo_latent_rows(vae) -> int:
    """Rows of latent halo each side of a band (what every rank decodes beyond its own rows)."""
    return decoder_stages(vae.decoder)[0][0].halo


def band_window(a: int, b: int, height: int, factor: int, halo: int) -> tuple[int, int]:
    """Rows [lo, hi) at `factor` rows per latent row that a band of latent rows [a, b) needs."""
    return max(0, a * factor - halo), min(height * factor, b * factor + halo)


@contextlib.contextmanager
def _cropping(stages: list[Stage], a: int, b: int, height: int) -> Iterator[list[tuple[int, int]]]:
    """Install the crop hooks for band [a, b); yields the list that receives the last window."""
    handles = []
    last: list[tuple[int, int]] = []
    prev = [(0, height, 1)]  # window of the tensor entering the next hook, and its factor

    def hook_for(stage: Stage, first: bool):
        lo, hi = band_window(a, b, height, stage.factor, stage.halo)

        def hook(module, args, out):
            # every latent frame starts again from the full-frame output of the mid block
            in_lo, in_hi, in_factor = (0, height, 1) if first else prev[0]
            scale = stage.factor // in_factor
            cur_lo = in_lo * scale
            assert out.shape[-2] == (in_hi - in_lo) * scale, (out.shape, in_lo, in_hi, scale)
            assert cur_lo <= lo and hi <= in_hi * scale, (cur_lo, lo, hi, in_hi * scale)
            prev[0] = (lo, hi, stage.factor)
            last[:] = [(lo, hi)]
            return out[..., lo - cur_lo:hi - cur_lo, :]
        return hook

    for i, stage in enumerate(stages):
        handles.append(stage.module.register_forward_hook(hook_for(stage, i == 0)))
    try:
        yield last
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def decode_band(vae, z: torch.Tensor, a: int, b: int) -> torch.Tensor:
    """z [B, z_dim, F, H, W] (the VAE's own latent space) -> rows [8a, 8b) of the decoded video.

    Equal to `vae.decode(z)` cropped to those rows (up to fp reassociation), at a fraction of
    its activation memory. [B, 3, T, 8H, 8W] -> [B, 3, T, 8(b - a), 8W].
    """
    height = z.shape[-2]
    if not 0 <= a < b <= height:
        raise ValueError(f"latent row band [{a}, {b}) is not inside the {height} latent rows; nothing to decode")
    reason = unsupported_reason(vae)
    if reason is not None:
        raise ValueError(f"cannot decode the VAE in row bands: {reason}")
    stages, factor = decoder_stages(vae.decoder)
    tiling, vae.use_tiling = vae.use_tiling, False  # diffusers' blended tiles would bypass the hooks
    try:
        with _cropping(stages, a, b, height) as last:
            out = vae.decode(z, return_dict=False)[0]
    finally:
        vae.use_tiling = tiling
    lo, _ = last[0]
    return out[..., a * factor - lo:b * factor - lo, :]
