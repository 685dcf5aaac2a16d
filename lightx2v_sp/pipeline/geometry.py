"""The sizes of one video at every stage, from the model's kind: the one place strides come from.

The runner (latents, tokens), the memory plan and the dry run all call `video_geometry`, so they
cannot disagree: the VAE's time and space strides are the kind's (read from the VAE's config:
Wan2.1 4 x 8, Wan2.2's TI2V VAE 4 x 16), the patch size and latent channels the DiT's config's.

    geo = video_geometry(kind, dit_config, cfg.sample)
    geo.latent          # (C, F, H, W): the noise the sampler starts from
    geo.grid            # (f, h, w) tokens per axis after the patch embedding
    geo.tokens          # f * h * w
    geo.tokens_per_rank(4)  # the contiguous split of the tokens over a Ulysses group of 4
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from .latents import latent_shape


@dataclass(frozen=True)
class VideoGeometry:
    frames: int
    height: int
    width: int
    strides: tuple[int, int]            # VAE (time, space)
    patch: tuple[int, int, int]         # DiT patch (frames, rows, columns) of latents per token
    latent: tuple[int, int, int, int]   # (channels, frames, rows, columns)

    @property
    def grid(self) -> tuple[int, int, int]:
        return tuple(n // p for n, p in zip(self.latent[1:], self.patch))

    @property
    def tokens(self) -> int:
        return math.prod(self.grid)

    def tokens_per_rank(self, ulysses: int) -> list[int]:
        from lightx2v_sp.distributed import split_sizes

        return split_sizes(self.tokens, ulysses)

    @property
    def decoded_frames(self) -> int:
        """Frames the VAE decodes from the latents (the video's own frame count)."""
        return 1 + self.strides[0] * (self.latent[1] - 1)


def video_geometry(kind, dit_config, sample) -> VideoGeometry:
    """The geometry of `sample`'s video for a model of `kind` whose DiT has `dit_config`."""
    t, s = kind.vae_strides
    latent = latent_shape(dit_config.out_dim, sample.num_frames, sample.height, sample.width, t, s)
    patch = tuple(dit_config.patch_size)
    if any(n % p for n, p in zip(latent[1:], patch)):
        raise ValueError(f"the latents {list(latent)} of a {sample.num_frames}x{sample.height}x{sample.width} video "
                         f"(VAE strides {t} x {s}) do not split into the DiT's {patch} patches; height and width "
                         f"must be multiples of {s * patch[1]}")
    return VideoGeometry(sample.num_frames, sample.height, sample.width, (t, s), patch, latent)
