"""The Wan2.1 VAE's decoder without diffusers: what a text-to-video run needs of the VAE.

A run that only decodes imports no diffusers with it (importing diffusers' autoencoders costs seconds
of Python, which slowed the denoise it overlapped; BENCHMARKS.md, "Time to video") and reads only the
decoder's weights. The modules carry diffusers' AutoencoderKLWan names (`post_quant_conv`,
`decoder.conv_in`, `decoder.mid_block.resnets.0.conv1`, `decoder.up_blocks.1.upsamplers.0.resample.1`,
...), so the same checkpoints load, vae_rows.py crops the same stages, and the output equals
AutoencoderKLWan.decode bit for bit (tests/test_vae_decoder.py: the same operations in the same order).

The decoder runs once per latent frame (1 frame out for the first, 4 for each later one); every
causal conv keeps the last two frames it saw (its input) for the next call, and the temporal
upsamplers keep theirs. Wan2.2's layout (residual up blocks, patchified output) is left to diffusers.
"""
from __future__ import annotations

import json
import os
from types import SimpleNamespace
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

CACHE_FRAMES = 2  # what a causal conv with a 3-frame kernel needs of the previous chunk


class CausalConv3d(nn.Conv3d):
    """A Conv3d padded in time on the past side only: with the previous chunk's frames where given."""

    def __init__(self, cin: int, cout: int, kernel, stride=1, padding=0):
        super().__init__(cin, cout, kernel, stride=stride, padding=padding)
        p = self.padding
        self._padding = (p[2], p[2], p[1], p[1], 2 * p[0], 0)  # F.pad order: w, h, t (before, after)
        self.padding = (0, 0, 0)

    def forward(self, x: torch.Tensor, past: Optional[torch.Tensor] = None) -> torch.Tensor:
        pad = list(self._padding)
        if past is not None and pad[4] > 0:
            x = torch.cat([past.to(x.device), x], dim=2)
            pad[4] -= past.shape[2]
        return super().forward(F.pad(x, pad))


class RMSNorm(nn.Module):
    """x / ||x|| over channels * sqrt(C) * gamma (the norm in fp32 for half-precision inputs)."""

    def __init__(self, dim: int, images: bool):
        super().__init__()
        self.scale = dim ** 0.5
        self.gamma = nn.Parameter(torch.ones((dim, 1, 1) if images else (dim, 1, 1, 1)))
        self.bias = 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        low = x.dtype in (torch.float16, torch.bfloat16) or any(t in str(x.dtype) for t in ("float4_", "float8_"))
        normalized = F.normalize(x.float() if low else x, dim=1).to(x.dtype)
        return normalized * self.scale * self.gamma + self.bias


class FrameCache:
    """Per causal conv (in the order they run), the frames of its input the next chunk continues from."""

    def __init__(self):
        self.slots: list = []
        self.index = 0

    def chunk(self) -> None:
        self.index = 0

    def take(self):
        """The current slot's content: None in the first chunk."""
        if self.index == len(self.slots):
            self.slots.append(None)
        return self.slots[self.index]

    def put(self, value) -> None:
        """The current slot's content for the next chunk; the next slot becomes current."""
        self.slots[self.index] = value
        self.index += 1

    def conv(self, conv: CausalConv3d, x: torch.Tensor) -> torch.Tensor:
        old = self.take()
        keep = x[:, :, -CACHE_FRAMES:].clone()
        if keep.shape[2] < 2 and old is not None:  # a one-frame chunk: keep the frame before it too
            keep = torch.cat([old[:, :, -1:].to(keep.device), keep], dim=2)
        out = conv(x, old)
        self.put(keep)
        return out


class ResidualBlock(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.norm1 = RMSNorm(cin, images=False)
        self.conv1 = CausalConv3d(cin, cout, 3, padding=1)
        self.norm2 = RMSNorm(cout, images=False)
        self.conv2 = CausalConv3d(cout, cout, 3, padding=1)
        self.conv_shortcut = CausalConv3d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, cache: FrameCache) -> torch.Tensor:
        h = self.conv_shortcut(x)
        x = cache.conv(self.conv1, F.silu(self.norm1(x)))
        x = cache.conv(self.conv2, F.silu(self.norm2(x)))
        return x + h


class AttentionBlock(nn.Module):
    """One-head self-attention over the H x W positions of each frame."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = RMSNorm(dim, images=True)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, t, h, w = x.shape
        frames = self.norm(x.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w))
        # [bt, 3c, h, w] -> [bt, 1, hw, 3c] -> q, k, v [bt, 1, hw, c]
        qkv = self.to_qkv(frames).reshape(b * t, 1, c * 3, -1).permute(0, 1, 3, 2).contiguous()
        q, k, v = qkv.chunk(3, dim=-1)
        out = F.scaled_dot_product_attention(q, k, v)
        out = self.proj(out.squeeze(1).permute(0, 2, 1).reshape(b * t, c, h, w))
        return out.view(b, t, c, h, w).permute(0, 2, 1, 3, 4) + x


class MidBlock(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.attentions = nn.ModuleList([AttentionBlock(dim)])
        self.resnets = nn.ModuleList([ResidualBlock(dim, dim), ResidualBlock(dim, dim)])

    def forward(self, x: torch.Tensor, cache: FrameCache) -> torch.Tensor:
        x = self.resnets[0](x, cache)
        return self.resnets[1](self.attentions[0](x), cache)


class NearestUp(nn.Upsample):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.float()).type_as(x)


class Upsample(nn.Module):
    """2x nearest in space + a 3x3 conv halving the channels; `upsample3d` also doubles time (from the
    second chunk on) with a causal conv making two frames per frame."""

    REPEAT = "repeat"  # the first chunk's frame passes through undoubled

    def __init__(self, dim: int, mode: str):
        super().__init__()
        self.mode = mode
        self.resample = nn.Sequential(NearestUp(scale_factor=(2.0, 2.0), mode="nearest-exact"),
                                      nn.Conv2d(dim, dim // 2, 3, padding=1))
        if mode == "upsample3d":
            self.time_conv = CausalConv3d(dim, dim * 2, (3, 1, 1), padding=(1, 0, 0))

    def forward(self, x: torch.Tensor, cache: FrameCache) -> torch.Tensor:
        b, c, t, h, w = x.shape
        if self.mode == "upsample3d":
            old = cache.take()
            if old is None:
                cache.put(self.REPEAT)
            else:
                keep = x[:, :, -CACHE_FRAMES:].clone()
                if keep.shape[2] < 2:
                    first = torch.zeros_like(keep) if isinstance(old, str) else old[:, :, -1:].to(keep.device)
                    keep = torch.cat([first, keep], dim=2)
                x = self.time_conv(x) if isinstance(old, str) else self.time_conv(x, old)
                cache.put(keep)
                # [b, 2c, t] -> frames interleaved: [b, c, 2t]
                x = x.reshape(b, 2, c, t, h, w)
                x = torch.stack((x[:, 0], x[:, 1]), 3).reshape(b, c, t * 2, h, w)
        t = x.shape[2]
        x = self.resample(x.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w))
        return x.view(b, t, x.size(1), x.size(2), x.size(3)).permute(0, 2, 1, 3, 4)


class UpBlock(nn.Module):
    def __init__(self, cin: int, cout: int, num_res_blocks: int, upsample: Optional[str]):
        super().__init__()
        self.resnets = nn.ModuleList(ResidualBlock(cin if i == 0 else cout, cout) for i in range(num_res_blocks + 1))
        self.upsamplers = nn.ModuleList([Upsample(cout, upsample)]) if upsample else None

    def forward(self, x: torch.Tensor, cache: FrameCache) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x, cache)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x, cache)
        return x


class Decoder3d(nn.Module):
    def __init__(self, dim: int, z_dim: int, dim_mult, num_res_blocks: int, temporal_upsample, out_channels: int):
        super().__init__()
        dims = [dim * u for u in [dim_mult[-1], *dim_mult[::-1]]]
        self.conv_in = CausalConv3d(z_dim, dims[0], 3, padding=1)
        self.mid_block = MidBlock(dims[0])
        blocks = []
        for i, (cin, cout) in enumerate(zip(dims[:-1], dims[1:])):
            last = i == len(dim_mult) - 1
            mode = None if last else ("upsample3d" if temporal_upsample[i] else "upsample2d")
            blocks.append(UpBlock(cin // 2 if i > 0 else cin, cout, num_res_blocks, mode))
        self.up_blocks = nn.ModuleList(blocks)
        self.norm_out = RMSNorm(dims[-1], images=False)
        self.conv_out = CausalConv3d(dims[-1], out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor, cache: FrameCache) -> torch.Tensor:
        x = self.mid_block(cache.conv(self.conv_in, x), cache)
        for block in self.up_blocks:
            x = block(x, cache)
        return cache.conv(self.conv_out, F.silu(self.norm_out(x)))


class WanVAEDecoder(nn.Module):
    """post_quant_conv + the decoder of a Wan2.1 AutoencoderKLWan; `decode` as AutoencoderKLWan's."""

    use_tiling = False  # vae_rows.py switches diffusers' tiling off around its bands; there is none here

    def __init__(self, config: dict):
        super().__init__()
        self.config = SimpleNamespace(**{**DEFAULTS, **config})
        cfg = self.config
        self.post_quant_conv = CausalConv3d(cfg.z_dim, cfg.z_dim, 1)
        self.decoder = Decoder3d(cfg.decoder_base_dim or cfg.base_dim, cfg.z_dim, cfg.dim_mult, cfg.num_res_blocks,
                                 list(cfg.temperal_downsample)[::-1], cfg.out_channels)

    def decode(self, z: torch.Tensor, return_dict: bool = False) -> tuple[torch.Tensor]:
        """z [B, z_dim, F, H, W] (the VAE's own latent space) -> video [B, 3, 4(F-1)+1, 8H, 8W] in [-1, 1]."""
        x = self.post_quant_conv(z)
        cache = FrameCache()
        frames = []
        for i in range(z.shape[2]):
            cache.chunk()
            frames.append(self.decoder(x[:, :, i:i + 1], cache))
        # one concatenation (diffusers grows the video one chunk at a time: the same values, copied
        # again with every chunk)
        return (torch.clamp(torch.cat(frames, 2), min=-1.0, max=1.0),)


# AutoencoderKLWan's defaults (Wan2.1), for keys a config.json leaves out
DEFAULTS = dict(base_dim=96, decoder_base_dim=None, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2,
                attn_scales=[], temperal_downsample=[False, True, True], dropout=0.0, is_residual=False,
                out_channels=3, patch_size=None, scale_factor_temporal=4, scale_factor_spatial=8)
DECODER_PARTS = ("post_quant_conv.", "decoder.")  # the checkpoint keys the decoder reads


def unsupported(config: dict) -> Optional[str]:
    """Why a VAE config is not one this decoder reproduces (None when it is): Wan2.1's layout only."""
    cfg = {**DEFAULTS, **config}
    if config.get("_class_name", "AutoencoderKLWan") != "AutoencoderKLWan":
        return f"it is a {config.get('_class_name')!r}"
    if cfg["is_residual"] or cfg["patch_size"] is not None:
        return "Wan2.2's layout (residual up blocks, patchified output)"
    if cfg["attn_scales"]:
        return f"attention at scales {cfg['attn_scales']}"
    if cfg["dropout"]:
        return f"dropout {cfg['dropout']}"
    return None


def read_config(path: str) -> Optional[dict]:
    """The config.json of a diffusers VAE directory; None for an official file (Wan2.1's, by layout)."""
    path = os.fspath(path)
    file = os.path.join(path, "config.json") if os.path.isdir(path) else None
    if file is None or not os.path.isfile(file):
        return None
    with open(file) as f:
        return json.load(f)


def decoder_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if k.startswith(DECODER_PARTS)}


def assign_exactly(module: nn.Module, state: dict[str, torch.Tensor], dtype: torch.dtype, what: str) -> nn.Module:
    """`module` (built on the meta device) given `state` cast to `dtype`; a key missing or left over is a
    ValueError starting with `what`."""
    expected = set(module.state_dict())
    missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or extra:
        raise ValueError(f"{what}: missing {missing[:6]}, unexpected {extra[:6]}; nothing was loaded")
    module.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=True, assign=True)
    return module


def build(config: dict, state: dict[str, torch.Tensor], dtype: torch.dtype, where: str) -> WanVAEDecoder:
    """The decoder with `state`'s decoder weights (diffusers names), cast to `dtype`; a key missing or
    left over is an error naming the file."""
    with torch.device("meta"):
        vae = WanVAEDecoder(config)
    assign_exactly(vae, decoder_state(state), dtype, f"{where}: the VAE decoder's weights do not match its config")
    return vae.eval().requires_grad_(False)
