"""The decode stage: final latents -> video, split over the ranks of the job.

Every rank holds the final latents. With `vae.parallel=split` each rank decodes one contiguous
band of latent rows (models/vae_rows.py: exact, the halo rows are recomputed, nothing is
blended), and rank 0 gathers the bands into the video it writes. `vae.tiling=k` cuts each
rank's band into k bands decoded one after another: a lower peak, the same pixels.
`vae.parallel=rank0` (or a VAE whose layout cannot be cut into bands) decodes on rank 0 alone.

Decoding (`decode_rows`) runs no collective, so the runner can wrap it in `agreed` (an
out-of-memory on one rank fails every rank); `gather_video` is the one collective after it.
"""
from __future__ import annotations

import logging
from typing import Optional

import torch

from lightx2v_sp.distributed import split_sizes
from lightx2v_sp.distributed.groups import job_group
from lightx2v_sp.distributed.varlen import gather_v
from lightx2v_sp.models.vae_rows import decode_band, unsupported_reason
from lightx2v_sp.offload import ComponentPlacement

log = logging.getLogger("lightx2v_sp")


def vae_on_every_rank(vae_cfg, world: int) -> bool:
    """Whether every rank loads the VAE (else rank 0 only)."""
    return world > 1 and vae_cfg.parallel == "split"


def row_bands(height: int, world: int, tiling: int = 1) -> list[list[tuple[int, int]]]:
    """Per rank, its latent row bands [a, b) in decode order; contiguous per rank, ranks in order.

    `world * tiling` near-equal bands (the first ones one row taller); ranks past the last row
    get none (a 2-row latent on 4 ranks: two ranks idle).
    """
    sizes = split_sizes(height, world * tiling)
    edges = [0]
    for s in sizes:
        edges.append(edges[-1] + s)
    out = []
    for r in range(world):
        mine = [(edges[i], edges[i + 1]) for i in range(r * tiling, (r + 1) * tiling)]
        out.append([(a, b) for a, b in mine if b > a])
    return out


def _layout(wan_vae, vae_cfg, height: int, world: int) -> list[list[tuple[int, int]]]:
    """Every rank's bands. Ranks without a VAE (rank0 mode, rank > 0) see the rank-0 layout too."""
    reason = None if wan_vae is None else unsupported_reason(wan_vae.vae)
    if reason is not None and (vae_cfg.parallel == "split" and world > 1 or vae_cfg.tiling > 1):
        log.warning("the VAE decodes on rank 0 alone, in one piece: %s", reason)
    return band_layout(reason, vae_cfg, height, world, has_vae=wan_vae is not None)


def band_layout(unsupported: Optional[str], vae_cfg, height: int, world: int,
                has_vae: bool = True) -> list[list[tuple[int, int]]]:
    """Every rank's latent row bands for `vae_cfg` (the runner's decode and the memory plan);
    `unsupported`: why the VAE cannot be cut into bands (vae_rows.unsupported_reason), or None."""
    split = vae_cfg.parallel == "split" and world > 1 and has_vae and unsupported is None
    tiling = vae_cfg.tiling if unsupported is None else 1
    if not split:
        return [row_bands(height, 1, tiling)[0]] + [[] for _ in range(world - 1)]
    return row_bands(height, world, tiling)


@torch.no_grad()
def decode_rows(wan_vae, latents: torch.Tensor, device: torch.device, vae_cfg, offload_mode: str,
                world: int, rank: int, on_frames=None) -> tuple[Optional[torch.Tensor], list[int]]:
    """This rank's rows of the video [1, 3, T, 8 h_r, 8 W] (None when it has no
    band), and every rank's pixel row count. `latents` [1, C, F, H, W] is the DiT's normalised
    space, the same on every rank. `on_frames`: where a rank decodes the whole frame in one piece,
    it gets the video's frames as they are decoded (`WanVAE.frames_to`: the mp4 encoder), else nothing.

    `wan_vae` is None on the ranks that do not decode (rank0 mode); they return (None, rows).
    """
    height = latents.shape[-2]
    bands = _layout(wan_vae, vae_cfg, height, world)
    if wan_vae is None or not bands[rank]:
        return None, [0] * world
    rows = [wan_vae.spatial_stride * sum(b - a for a, b in per_rank) for per_rank in bands]
    # only the decoder visits the device: the encoder (0.2 GiB of Wan2.1's 0.47 in fp32) stays on the host
    placement = ComponentPlacement(_decode_part(wan_vae.vae), offload_mode, device, name="vae")
    with placement.on_device():
        dev = placement.execution_device
        if bands[rank] == [(0, height)]:  # the whole frame: no cropping hooks needed
            with wan_vae.frames_to(on_frames):
                piece = wan_vae.decode(latents, device=dev)
        else:
            z = latents.float().to(dev) * wan_vae.std.to(dev) + wan_vae.mean.to(dev)
            z = z.to(wan_vae.dtype)
            piece = torch.cat([decode_band(wan_vae.vae, z, a, b) for a, b in bands[rank]], dim=-2)
    assert piece.shape[-2] == rows[rank], (piece.shape, rows)
    return piece, rows


def _decode_part(vae) -> torch.nn.Module:
    """The modules `AutoencoderKLWan.decode` runs: post_quant_conv and the decoder."""
    return torch.nn.ModuleList([vae.post_quant_conv, vae.decoder])


def gather_video(piece: Optional[torch.Tensor], rows: list[int], world: int, rank: int) -> Optional[torch.Tensor]:
    """Every rank's rows -> the video [3, T, 8H, 8W] fp32 in [-1, 1] on rank 0's CPU (None elsewhere).

    `rows` need only be right on the ranks that decode: rank 0 always has the first band, and a
    rank without a band (None) sends nothing, as its zero entry in rank 0's `rows` says.
    """
    if piece is None:
        assert rank != 0, "rank 0 holds the first band of every layout"
        return None
    if world == 1:
        return piece[0].float().cpu().clamp(-1, 1)
    # [1, 3, T, rows_r, W] on rank r -> gather_v to rank 0 -> [1, 3, T, sum rows_r, W] on rank 0's CPU
    video = gather_v(piece, dim=-2, sizes=rows, dst=0, group=job_group(), out_device="cpu")
    return None if video is None else video[0].float().clamp(-1, 1)
