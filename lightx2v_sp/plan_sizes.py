"""What the memory plan knows about a model without loading it: configs, exact weight counts (modules
built on the meta device) and the VAE decode's memory as a function of the rows a rank decodes.

The VAE decode formula: the causal-conv caches are counted from the decoder's modules (2 frames of
every cached conv input, at the rows of the band the rank decodes), plus transient activations at
the top resolution, `_transient_per_px()` values per output pixel: what is left of the measured
480p fp32 whole-frame peak (9.26 GiB, one H100, issue 12) after the weights, the caches and the
video. The same formula gives 20.75 GiB at 720p (measured 20.71); bf16 halves every term
(measured 4.63 / 10.36).
"""
from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass

import torch

from lightx2v_sp.jsonfile import read_json

GIB = 1 << 30
DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
# VAE decode: whole-frame fp32 480p peak of Wan2.1's VAE, 81 frames, one H100 (issue 12)
VAE_CALIBRATION = {"peak_bytes": 9.26 * GIB, "dtype_bytes": 4, "height": 480, "width": 832, "frames": 81}


@dataclass
class Shapes:
    """What the plan needs to know about the checkpoint."""

    name: str
    dit: object            # WanConfig (of the first expert)
    t5: object             # T5Config
    vae: dict              # AutoencoderKLWan kwargs
    kind: object = None    # pipeline.kind.ModelKind: the VAE strides, the experts
    experts: list = None   # WanConfig of every expert (two for Wan2.2 A14B)

    def __post_init__(self):
        if self.experts is None:
            self.experts = [self.dit]


# ------------------------------------------------------------------------------------------------
# shapes

def model_shapes(model_cfg) -> Shapes:
    """The shapes of the model `model_cfg` names, from its config files alone (a repo id fetches only
    those): the same paths and kind detection as the run, no guessing from a name."""
    from lightx2v_sp.pipeline.kind import detect_kind
    from lightx2v_sp.pipeline.paths import model_paths_for

    paths = model_paths_for(model_cfg, weights=False)
    return shapes_of(paths, detect_kind(paths))


def shapes_of(paths, kind) -> Shapes:
    """Configs of the DiT expert(s), UMT5 and VAE at resolved `paths`, read without loading any weight."""
    from lightx2v_sp.models.t5.model import T5Config
    from lightx2v_sp.models.wan.loader import read_config

    experts = [read_config(d)[2] for d in kind.experts]
    t5 = T5Config.umt5_xxl()  # what Wan ships (the official .pth has no config to read)
    te_json = read_json(os.path.join(paths.text_encoder, "config.json")) if os.path.isdir(paths.text_encoder) else None
    if te_json and "d_model" in te_json:
        from lightx2v_sp.models.t5.loader import config_from_hf

        t5 = config_from_hf(te_json, os.path.join(paths.text_encoder, "config.json"))
    vae = {}  # the official Wan2.1_VAE.pth: diffusers' defaults are its config
    vae_json = read_json(os.path.join(paths.vae, "config.json")) if os.path.isdir(paths.vae) else None
    if vae_json:  # '_class_name', '_diffusers_version': metadata; keys AutoencoderKLWan lacks: vae_init_kwargs
        vae = {k: v for k, v in vae_json.items() if not k.startswith("_")}
    return Shapes(f"{kind.name} at {paths.root}", experts[0], t5, vae, kind, experts)


def vae_init_kwargs(vae_kwargs: dict) -> dict:
    """The config keys AutoencoderKLWan takes (a newer config may carry keys this diffusers lacks)."""
    import inspect

    from diffusers import AutoencoderKLWan

    params = inspect.signature(AutoencoderKLWan.__init__).parameters
    return {k: v for k, v in vae_kwargs.items() if k in params}


def _numel(module) -> int:
    return sum(p.numel() for p in module.parameters()) + sum(b.numel() for b in module.buffers())


def dit_numel(dit_cfg) -> dict:
    """{'blocks': all transformer blocks, 'block': one block, 'other': embeddings, head}."""
    from lightx2v_sp.models.wan import WanModel

    key = repr(dit_cfg)
    if key not in _COUNTS:
        with torch.device("meta"):
            model = WanModel(dit_cfg)
        blocks = _numel(model.blocks)
        _COUNTS[key] = {"blocks": blocks, "block": _numel(model.blocks[0]), "other": _numel(model) - blocks}
    return dict(_COUNTS[key])


_COUNTS: dict = {}  # meta-device parameter counts by config (a 14B model takes a second to build)


def dit_bytes(dit_cfg, dtype: str, quant: str | None = None) -> dict:
    """Bytes of one DiT in the run's dtype (the time embedding and modulation stay fp32, as loaded;
    model.quant=fp8: the block linears as e4m3 + one fp32 scale per row, as loaded):
    'resident' all of it, 'other' all but the blocks, 'block' one block and 'blocks' all blocks as
    block offload lays them out in host memory (offload/layout.py: aligned views of one buffer)."""
    from lightx2v_sp.models.quant import DIT_LINEARS, quantize_linears
    from lightx2v_sp.models.wan import WanModel
    from lightx2v_sp.offload.layout import TensorLayout

    key = (repr(dit_cfg), dtype, quant)
    if key not in _COUNTS:
        with torch.device("meta"):
            model = WanModel(dit_cfg)
        model.set_dtype({"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype])
        if quant == "fp8":
            with torch.device("meta"):
                quantize_linears(model, DIT_LINEARS)
        raw = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
        in_blocks = sum(t.numel() * t.element_size() for t in model.blocks.parameters())
        block = TensorLayout(model.blocks[0]).nbytes
        _COUNTS[key] = {"resident": raw, "other": raw - in_blocks, "block": block, "blocks": block * len(model.blocks)}
    return dict(_COUNTS[key])


def shared_blocks_bytes(experts: list, dtype: str, quant: str | None = None) -> int:
    """Host bytes of the blocks of every expert (WanConfigs) under offload.dit=block: what the node's
    shared host copies (one arena per expert, offload/shared_host.py) hold together in /dev/shm."""
    return sum(dit_bytes(c, dtype, quant)["blocks"] for c in experts)


def _meta_vae(vae_kwargs: dict):
    return _meta_vae_cached(json.dumps(vae_kwargs, sort_keys=True))


@functools.lru_cache(maxsize=8)
def _meta_vae_cached(key: str):
    from diffusers import AutoencoderKLWan

    with torch.device("meta"):
        return AutoencoderKLWan(**vae_init_kwargs(json.loads(key)))


def _t5_numel(t5_cfg, mode: str, world: int, rank: int) -> int:
    from lightx2v_sp.models.t5.budget import weight_numel

    key = (repr(t5_cfg), mode, world, rank)
    if key not in _COUNTS:
        _COUNTS[key] = weight_numel(t5_cfg, mode, world, rank)["total"]
    return _COUNTS[key]


# ------------------------------------------------------------------------------------------------
# VAE decode

def _cached_convs(decoder) -> list[tuple[int, int]]:
    """(factor, input channels) of every causal conv that caches 2 frames, in execution order."""
    out = [(1, decoder.conv_in.in_channels)]
    for res in decoder.mid_block.resnets:
        out += [(1, res.conv1.in_channels), (1, res.conv2.in_channels)]
    factor = 1
    for block in decoder.up_blocks:
        for res in block.resnets:
            out += [(factor, res.conv1.in_channels), (factor, res.conv2.in_channels)]
        if block.upsamplers is not None:
            up = block.upsamplers[0]
            if up.mode == "upsample3d":
                out.append((factor, up.time_conv.in_channels))
            if up.mode in ("upsample2d", "upsample3d"):
                factor *= 2
    out.append((factor, decoder.conv_out.in_channels))
    return out


def _transient_per_px() -> float:
    """Values per output pixel live at the decode's peak beyond the caches and the video: the rest of
    the calibration peak ~ weights + px x (caches + transient + 3 x frames), for Wan2.1's VAE."""
    from lightx2v_sp.plan_vae_facts import vae_facts

    c = VAE_CALIBRATION
    facts = vae_facts({})
    px = c["height"] * c["width"]
    total = (c["peak_bytes"] / c["dtype_bytes"] - facts.numel) / px
    caches = sum(2 * ch * (f / facts.top) ** 2 for f, ch in facts.convs)  # a whole frame's, per pixel
    return total - caches - 3 * c["frames"]


def vae_decode_bytes(vae_kwargs: dict, latent_hw: tuple[int, int], num_frames: int, dtype_bytes: int,
                     bands: list[tuple[int, int]], receive_rows: int = 0, spatial_stride: int = 8) -> dict:
    """GPU bytes of one rank's decode: {'weights', 'caches', 'activations', 'video'}.

    `bands`: the latent row bands the rank decodes one after another ([] = none; one band
    (0, H) = the whole frame); `receive_rows`: pixel rows of the largest piece rank 0 receives
    from another rank while gathering (its receive buffer, on the device); `spatial_stride`: pixels
    per latent row and column (the kind's, pipeline/geometry.py).
    """
    from lightx2v_sp.models.vae_rows import band_window
    from lightx2v_sp.plan_vae_facts import vae_facts

    facts = vae_facts(vae_kwargs)
    weights = facts.decode_numel * dtype_bytes  # the encoder stays on the host
    if not bands:
        return {"weights": 0, "caches": 0, "activations": 0, "video": 0}
    height, width = latent_hw
    if facts.unsupported is not None:
        # a VAE the row model does not describe (Wan2.2: patchified output) decodes whole on rank 0:
        # scale Wan2.1's measured whole-frame peak by output pixels and frames (an estimate)
        c = VAE_CALIBRATION
        stride = spatial_stride  # the kind's (Wan2.2's VAE: 16), so the pixels are the video's own
        scale = (height * stride * width * stride) / (c["height"] * c["width"]) * num_frames / c["frames"]
        return {"weights": weights, "caches": 0, "video": int(3 * num_frames * height * width * stride**2 * dtype_bytes),
                "activations": int(c["peak_bytes"] / c["dtype_bytes"] * dtype_bytes * scale)}
    top, halo, convs = facts.top, dict(facts.halos), facts.convs
    px_width = width * top
    transient_per_px = _transient_per_px() * facts.conv_out_channels / 96
    worst = (0.0, 0.0)
    for a, b in bands:
        caches = 0.0
        for f, c in convs:
            lo, hi = (0, height * f) if f == 1 else band_window(a, b, height, f, halo.get(f, 0))
            caches += 2 * c * (hi - lo) * width * f
        lo, hi = band_window(a, b, height, top, halo.get(top, 0))
        transient = transient_per_px * (hi - lo) * px_width
        worst = max(worst, (caches, transient), key=sum)
    rows = top * sum(b - a for a, b in bands)
    video_values = 3 * num_frames * px_width * rows
    if len(bands) > 1:
        video_values += 3 * num_frames * px_width * rows  # the bands' concatenation
    # the gather's receive buffer comes after the decode freed its caches: it only counts past them
    video_values += max(0.0, 3 * num_frames * px_width * receive_rows - sum(worst))
    return {"weights": weights, "caches": int(worst[0] * dtype_bytes), "activations": int(worst[1] * dtype_bytes),
            "video": int(video_values * dtype_bytes)}
