"""Which member of the Wan family a checkpoint is, read from its own files.

- diffusers: model_index.json (`_class_name`, `transformer_2`, `boundary_ratio`, `expand_timesteps`)
  and transformer/config.json (more input than output channels: image-to-video);
- official: config.json's `model_type` (t2v / i2v) and, for Wan2.2 A14B, the high_noise_model/ and
  low_noise_model/ folders. The official files carry no boundary: it is the one of the Wan2.2 release
  (t2v 0.875, i2v 0.900).
One-DiT I2V with `image_dim` is Wan2.1 I2V (CLIP from image_encoder/ + image_processor/);
expand_timesteps is Wan2.2 TI2V-5B (an optional image as the first latent frame). The VAE's
compression comes from its config.json (Wan2.2's VAE: 16x in space). Official-layout Wan2.1 I2V
(open_clip .pth) and TI2V (Wan2.2_VAE.pth) are refused with the -Diffusers layout as the way out.

Per-expert guidance scales are in no checkpoint file (diffusers passes them to `__call__`), so they
come from `sample.guidance_scale` (high-noise expert) and `sample.guidance_scale_2` (low-noise).
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from typing import Optional

from .paths import ModelPaths

# Wan2.2 A14B release configs (wan/configs/wan_{t2v,i2v}_A14B.py): boundary as a fraction of 1000 steps
OFFICIAL_BOUNDARY = {"t2v": 0.875, "i2v": 0.900}

# one-DiT official checkpoints whose extra component we do not read, by config.json's model_type
_OFFICIAL_REFUSED = {
    "ti2v": "{root} is an official-layout Wan2.2 TI2V-5B model: its Wan2.2_VAE.pth is not supported; use the "
            "-Diffusers layout of the model (vae/ with z_dim 48)",
    "i2v": "{root} is an official-layout Wan2.1 I2V model: its CLIP encoder is an open_clip checkpoint "
           "(models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth), which is not supported; use the "
           "-Diffusers layout of the model (image_encoder/ + image_processor/)",
}


@dataclass
class ModelKind:
    name: str                         # "wan2.1-t2v" | "wan2.1-i2v" | "wan2.2-t2v-a14b" | "wan2.2-i2v-a14b" |
    #                                   "wan2.2-ti2v-5b"
    image_input: bool                 # the DiT is conditioned on an encoded first frame
    experts: tuple[str, ...]          # DiT directories: (high-noise, low-noise) or (the only one,)
    boundary_ratio: Optional[float]   # from the checkpoint; None for one-DiT models
    boundary_source: str              # where boundary_ratio came from (for the summary)
    image_encoder: Optional[str] = None    # Wan2.1 I2V: CLIP vision tower directory
    image_processor: Optional[str] = None  # ... and its image processor
    image_dim: Optional[int] = None        # width of the CLIP tokens the DiT takes
    first_frame: bool = False              # Wan2.2 TI2V: an optional image is the first latent frame itself
    vae_strides: tuple[int, int] = (4, 8)  # (time, space) compression of the VAE

    @property
    def two_experts(self) -> bool:
        return len(self.experts) == 2

    def as_dict(self) -> dict:
        return asdict(self)


def _json(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def _model_type(dit: str, layout: str) -> str:
    cfg = _json(os.path.join(dit, "config.json"))
    if layout == "official":
        return cfg.get("model_type", "t2v")
    inputs = cfg.get("in_channels", 16)
    return "i2v" if inputs > (cfg.get("out_channels") or inputs) else "t2v"


def unsupported_official(root: str) -> Optional[str]:
    """Why the checkpoint at `root` is refused, read from its top-level config.json alone (so a Hub repo
    can be refused before its weights are fetched: hub.py); None when nothing there is refused."""
    cfg = _json(os.path.join(root, "config.json"))
    if "num_heads" not in cfg or "dim" not in cfg:  # not a one-DiT official checkpoint
        return None
    reason = _OFFICIAL_REFUSED.get(cfg.get("model_type", "t2v"))
    return None if reason is None else reason.format(root=root)


def detect_kind(paths: ModelPaths) -> ModelKind:
    """The kind of the checkpoint at `paths`; a ValueError for members that are not implemented."""
    index = _json(os.path.join(paths.root, "model_index.json")) if paths.dit_layout == "diffusers" else {}
    refused = unsupported_official(paths.dit) if paths.dit_layout == "official" and paths.dit_2 is None else None
    if refused is not None:
        raise ValueError(refused)
    model_type = _model_type(paths.dit, paths.dit_layout)
    strides = _vae_strides(paths.vae)
    if index.get("expand_timesteps"):
        if paths.dit_2 is not None or model_type != "t2v":
            raise ValueError(f"{paths.root}/model_index.json has expand_timesteps=true, but its DiT is not one "
                             "TI2V DiT (in channels = out channels); the checkpoint is not Wan2.2 TI2V")
        return ModelKind(name="wan2.2-ti2v-5b", image_input=False, experts=(paths.dit,), boundary_ratio=None,
                         boundary_source="none (one DiT)", first_frame=True, vae_strides=strides)
    if model_type not in ("t2v", "i2v"):
        raise ValueError(f"{paths.dit}/config.json has model_type={model_type!r}; only t2v and i2v Wan DiTs "
                         "are implemented")
    experts = (paths.dit,) if paths.dit_2 is None else (paths.dit, paths.dit_2)
    if len(experts) == 2 and _model_type(paths.dit_2, paths.dit_layout) != model_type:
        raise ValueError(f"the two experts disagree: {paths.dit} is {model_type}, {paths.dit_2} is "
                         f"{_model_type(paths.dit_2, paths.dit_layout)}; they are not one model")
    boundary, source = None, "none (one DiT)"
    if len(experts) == 2:
        if paths.dit_layout == "diffusers":
            boundary, source = index.get("boundary_ratio"), "model_index.json"
        else:
            boundary, source = OFFICIAL_BOUNDARY[model_type], f"Wan2.2 release default for {model_type}"
    name = {("t2v", 1): "wan2.1-t2v", ("t2v", 2): "wan2.2-t2v-a14b", ("i2v", 1): "wan2.1-i2v",
            ("i2v", 2): "wan2.2-i2v-a14b"}[model_type, len(experts)]
    kind = ModelKind(name=name, image_input=model_type == "i2v", experts=experts, boundary_ratio=boundary,
                     boundary_source=source, vae_strides=strides)
    if name == "wan2.1-i2v":
        _find_clip(kind, paths, index)
    return kind


def _vae_strides(vae: str) -> tuple[int, int]:
    """(time, space) compression from a diffusers VAE config; the official Wan2.1_VAE.pth is 4 x 8."""
    cfg = _json(os.path.join(vae, "config.json")) if os.path.isdir(vae) else {}
    return int(cfg.get("scale_factor_temporal") or 4), int(cfg.get("scale_factor_spatial") or 8)


def _find_clip(kind: ModelKind, paths: ModelPaths, index: dict) -> None:
    """Wan2.1 I2V's CLIP encoder: image_encoder/ + image_processor/ of the -Diffusers layout (the official
    layout's open_clip .pth is refused first: unsupported_official)."""
    kind.image_dim = _json(os.path.join(paths.dit, "config.json")).get("image_dim")
    if kind.image_dim is None:
        return  # an I2V DiT without the CLIP branch: the image enters through the latents only
    entry = index.get("image_encoder")
    if not entry or entry[0] is None:
        raise ValueError(f"the DiT at {paths.dit} attends to CLIP image tokens (image_dim={kind.image_dim}), but "
                         f"{paths.root}/model_index.json names no image_encoder")
    kind.image_encoder = os.path.join(paths.root, "image_encoder")
    kind.image_processor = os.path.join(paths.root, "image_processor")
    from .clip import check_clip

    check_clip(kind.image_encoder, kind.image_processor, kind.image_dim)


def boundary_ratio(kind: ModelKind, sample_cfg) -> Optional[float]:
    """`sample.boundary_ratio` if set, else the checkpoint's; None for one-DiT models."""
    if not kind.two_experts:
        return None
    ratio = sample_cfg.boundary_ratio if sample_cfg.boundary_ratio is not None else kind.boundary_ratio
    if ratio is None:
        raise ValueError(f"the two-expert model ({kind.experts[0]}, {kind.experts[1]}) has no boundary_ratio in "
                         "its model_index.json; set sample.boundary_ratio (Wan2.2: 0.875 for T2V, 0.9 for I2V), "
                         "otherwise the low-noise expert would never run")
    return float(ratio)


def check_inputs(kind: ModelKind, cfg) -> None:
    """The run's inputs fit the model: an image for I2V kinds and only for them; expert settings only
    for two-expert models."""
    if kind.image_input and cfg.image is None:
        raise ValueError(f"the model at {kind.experts[0]} is image-to-video ({kind.name}) and needs image=path/to.png "
                         "(its first frame); none was given")
    if not kind.image_input and cfg.image is not None and not kind.first_frame:
        raise ValueError(f"image={cfg.image} was given, but the model at {kind.experts[0]} is text-to-video "
                         f"({kind.name}) and would ignore it; drop image= or use an I2V model")
    if not kind.two_experts and (cfg.sample.guidance_scale_2 is not None or cfg.sample.boundary_ratio is not None):
        raise ValueError(f"sample.guidance_scale_2 / sample.boundary_ratio are for two-expert (Wan2.2 A14B) models; "
                         f"the model at {kind.experts[0]} has one DiT and would ignore them")
    boundary_ratio(kind, cfg.sample)
    s, space = cfg.sample, kind.vae_strides[1]
    if s.height % (2 * space) or s.width % (2 * space):
        raise ValueError(f"sample.height x sample.width = {s.height}x{s.width}: the VAE of {kind.name} compresses "
                         f"space by {space} and the DiT patches 2x2 latents, so both must be multiples of "
                         f"{2 * space} (e.g. {s.height // (2 * space) * 2 * space}x{s.width // (2 * space) * 2 * space})")
