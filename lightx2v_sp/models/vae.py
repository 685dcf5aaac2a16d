"""The Wan2.1 VAE: diffusers' AutoencoderKLWan, loaded from a diffusers directory or the official
`Wan2.1_VAE.pth`, plus the latent (de)normalisation Wan applies around it. A run that only decodes
loads our own decoder instead (vae_decoder.py: the same output, no diffusers import).

The official file stores the same modules under other names (`downsamples`, `middle`, `head`,
`residual.N`, `conv1`/`conv2` for the quant convs) and no config. Its config is read off the
tensor shapes and its keys are mapped onto diffusers' names structurally (levels, residual
blocks per level), so non-default sizes (e.g. the tiny model) convert too.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
from typing import Callable, Iterator, Optional

import torch

OFFICIAL_VAE_FILENAME = "Wan2.1_VAE.pth"

# Wan2.1's latent statistics (16 channels): the official file stores no config, these go with it.
WAN21_LATENTS_MEAN = [-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
                      0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921]
WAN21_LATENTS_STD = [2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
                     3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160]

# residual block: official Sequential index -> diffusers attribute
_RESIDUAL = {"residual.0.": "norm1.", "residual.2.": "conv1.", "residual.3.": "norm2.", "residual.6.": "conv2.",
             "shortcut.": "conv_shortcut."}
_TOP = {"conv1.": "quant_conv.", "conv2.": "post_quant_conv."}
_SIDE = {"conv1.": "conv_in.", "head.0.": "norm_out.", "head.2.": "conv_out."}


def _rename_residual(rest: str) -> str:
    for src, dst in _RESIDUAL.items():
        if rest.startswith(src):
            return dst + rest[len(src):]
    return rest  # resample.* / time_conv.* keep their names


def official_to_diffusers_key(key: str, num_res_blocks: int, num_levels: int) -> str:
    """Diffusers name of an official Wan2.1 VAE key (the inverse map is `diffusers_to_official_key`)."""
    for src, dst in _TOP.items():
        if key.startswith(src):
            return dst + key[len(src):]
    side, _, rest = key.partition(".")
    if side not in ("encoder", "decoder"):
        raise KeyError(key)
    for src, dst in _SIDE.items():
        if rest.startswith(src):
            return f"{side}.{dst}{rest[len(src):]}"
    m = re.match(r"middle\.(\d+)\.(.*)", rest)
    if m:
        i, tail = int(m.group(1)), m.group(2)
        if i == 1:
            return f"{side}.mid_block.attentions.0.{tail}"
        return f"{side}.mid_block.resnets.{i // 2}.{_rename_residual(tail)}"
    m = re.match(r"downsamples\.(\d+)\.(.*)", rest)
    if side == "encoder" and m:
        return f"encoder.down_blocks.{m.group(1)}.{_rename_residual(m.group(2))}"
    m = re.match(r"upsamples\.(\d+)\.(.*)", rest)
    if side == "decoder" and m:
        # official: one flat list, per level (num_res_blocks + 1) residual blocks then an upsampler
        # (all levels but the last); diffusers: up_blocks[level].resnets[r] / .upsamplers[0]
        j, tail = int(m.group(1)), m.group(2)
        per_level = num_res_blocks + 2
        level, r = divmod(j, per_level)
        if level >= num_levels:
            raise KeyError(key)
        if r <= num_res_blocks:
            return f"decoder.up_blocks.{level}.resnets.{r}.{_rename_residual(tail)}"
        return f"decoder.up_blocks.{level}.upsamplers.0.{tail}"
    raise KeyError(key)


def infer_official_config(state: dict[str, torch.Tensor], where: str) -> dict:
    """AutoencoderKLWan constructor arguments for an official state dict, from its shapes."""
    try:
        base_dim = state["encoder.conv1.weight"].shape[0]
        z_dim = state["conv2.weight"].shape[0]
    except KeyError as e:
        raise ValueError(f"{where} lacks {e.args[0]!r}; it is not a Wan2.1 VAE checkpoint") from None
    down = {}
    for key in state:
        m = re.match(r"encoder\.downsamples\.(\d+)\.(\w+)", key)
        if m:
            down.setdefault(int(m.group(1)), set()).add(m.group(2))
    resamples = sorted(i for i, parts in down.items() if "resample" in parts)
    if not resamples or any(k for k in state if re.match(r"encoder\.downsamples\.\d+\.(norm|to_qkv|proj)", k)):
        raise ValueError(f"{where}: unexpected encoder layout (resample blocks at {resamples}); "
                         "only Wan2.1's VAE (no attention outside the middle block) can be converted")
    num_res_blocks = resamples[0]
    num_levels = len(resamples) + 1
    dim_mult = []
    for level in range(num_levels):
        first = level * (num_res_blocks + 1)
        out = state[f"encoder.downsamples.{first}.residual.2.weight"].shape[0]
        dim_mult.append(out // base_dim)
    temporal = ["time_conv" in down[i] for i in resamples]
    if z_dim != len(WAN21_LATENTS_MEAN):
        raise ValueError(f"{where}: z_dim={z_dim}, but the official file carries no latent statistics and "
                         f"Wan2.1's are for {len(WAN21_LATENTS_MEAN)} channels; use a diffusers VAE directory")
    return {"base_dim": base_dim, "z_dim": z_dim, "dim_mult": dim_mult, "num_res_blocks": num_res_blocks,
            "attn_scales": [], "temperal_downsample": temporal,
            "latents_mean": WAN21_LATENTS_MEAN, "latents_std": WAN21_LATENTS_STD}


def convert_official_state(state: dict[str, torch.Tensor], where: str) -> tuple[dict, dict]:
    """(diffusers config kwargs, diffusers state dict) for an official Wan2.1 VAE state dict."""
    cfg = infer_official_config(state, where)
    out, unknown = {}, []
    for key, value in state.items():
        try:
            out[official_to_diffusers_key(key, cfg["num_res_blocks"], len(cfg["dim_mult"]))] = value
        except KeyError:
            unknown.append(key)
    if unknown:
        raise ValueError(f"{where}: keys with no place in the Wan2.1 VAE: {unknown[:8]}"
                         f"{' ...' if len(unknown) > 8 else ''}; the file is not a Wan2.1 VAE")
    return cfg, out


def diffusers_to_official_state(vae) -> dict[str, torch.Tensor]:
    """The official-layout state dict of a diffusers AutoencoderKLWan (to write a Wan2.1_VAE.pth)."""
    n = vae.config.num_res_blocks
    return {_diffusers_to_official_key(k, n): v.detach().clone() for k, v in vae.state_dict().items()}


def _diffusers_to_official_key(key: str, num_res_blocks: int) -> str:
    inverse_res = {v: k for k, v in _RESIDUAL.items()}

    def res(tail: str) -> str:
        for src, dst in inverse_res.items():
            if tail.startswith(src):
                return dst + tail[len(src):]
        return tail

    for dst, src in _TOP.items():
        if key.startswith(src):
            return dst + key[len(src):]
    side, _, rest = key.partition(".")
    for dst, src in _SIDE.items():
        if rest.startswith(src):
            return f"{side}.{dst}{rest[len(src):]}"
    m = re.match(r"mid_block\.attentions\.0\.(.*)", rest)
    if m:
        return f"{side}.middle.1.{m.group(1)}"
    m = re.match(r"mid_block\.resnets\.(\d+)\.(.*)", rest)
    if m:
        return f"{side}.middle.{2 * int(m.group(1))}.{res(m.group(2))}"
    m = re.match(r"down_blocks\.(\d+)\.(.*)", rest)
    if m:
        return f"encoder.downsamples.{m.group(1)}.{res(m.group(2))}"
    per_level = num_res_blocks + 2
    m = re.match(r"up_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", rest)
    if m:
        return f"decoder.upsamples.{int(m.group(1)) * per_level + int(m.group(2))}.{res(m.group(3))}"
    m = re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.(.*)", rest)
    if m:
        return f"decoder.upsamples.{int(m.group(1)) * per_level + num_res_blocks + 1}.{m.group(2)}"
    raise KeyError(key)


def _official_state(path: str) -> tuple[dict, dict]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:
        state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"{path} holds a {type(state).__name__}, not a state dict; it is not a Wan2.1 VAE")
    return convert_official_state(state, path)


def _load_official(path: str, dtype: torch.dtype):
    from diffusers import AutoencoderKLWan

    from .vae_decoder import assign_exactly

    cfg, converted = _official_state(path)
    with torch.device("meta"):
        vae = AutoencoderKLWan(**cfg)
    return assign_exactly(vae, converted, dtype, f"{path}: converted VAE keys do not match AutoencoderKLWan("
                                                 f"{cfg['base_dim']=}, {cfg['dim_mult']=})")


def _decoder_files(path: str) -> Optional[list[str]]:
    """The safetensors file(s) of a diffusers VAE directory (None where it has none: .bin only)."""
    single = os.path.join(path, "diffusion_pytorch_model.safetensors")
    if os.path.isfile(single):
        return [single]
    index = single + ".index.json"
    if os.path.isfile(index):
        with open(index) as f:
            return sorted({os.path.join(path, name) for name in json.load(f)["weight_map"].values()})
    return None


def _our_decoder_files(path: str, config: dict) -> Optional[list[str]]:
    """The files vae_decoder.py reads for a diffusers VAE directory; None where it does not reproduce this
    VAE (not Wan2.1's layout, or weights in .bin only): the one rule of the load and of the guess before it."""
    from . import vae_decoder

    return None if vae_decoder.unsupported(config) is not None else _decoder_files(path)


def _load_decoder_only(path: str, config: Optional[dict], dtype: torch.dtype):
    """vae_decoder.WanVAEDecoder (no diffusers) where the VAE has Wan2.1's layout; None where not."""
    from safetensors import safe_open

    from . import vae_decoder

    if config is None:  # the official file: Wan2.1's VAE, its config read off the shapes
        cfg, converted = _official_state(path)
        return vae_decoder.build(cfg, converted, dtype, path)
    files = _our_decoder_files(path, config)
    if files is None:
        return None
    state = {}
    for file in files:
        with safe_open(file, framework="pt") as f:
            state.update({k: f.get_tensor(k) for k in f.keys() if k.startswith(vae_decoder.DECODER_PARTS)})
    cfg = {"latents_mean": WAN21_LATENTS_MEAN, "latents_std": WAN21_LATENTS_STD, **config}
    return vae_decoder.build(cfg, state, dtype, path)


def load_vae(path, dtype: torch.dtype = torch.float32, decode_only: bool = False):
    """AutoencoderKLWan from a diffusers `vae/` directory or an official `Wan2.1_VAE.pth` file.

    `decode_only`: a Wan2.1-layout VAE loads as vae_decoder.WanVAEDecoder (the decoder's weights
    only, no diffusers import); other layouts still load as AutoencoderKLWan."""
    path = os.fspath(path)
    if os.path.isdir(path):
        cfg_file = os.path.join(path, "config.json")
        if not os.path.isfile(cfg_file):
            official = os.path.join(path, OFFICIAL_VAE_FILENAME)
            if os.path.isfile(official):
                return load_vae(official, dtype, decode_only)
            raise ValueError(f"VAE directory {path} has no config.json (diffusers layout) and no "
                             f"{OFFICIAL_VAE_FILENAME} (official layout); the VAE cannot be loaded")
        with open(cfg_file) as f:
            config = json.load(f)
        cls = config.get("_class_name")
        if cls != "AutoencoderKLWan":
            raise ValueError(f"{cfg_file} describes a {cls!r}, not an AutoencoderKLWan; it is not a Wan2.1 VAE")
        vae = _load_decoder_only(path, config, dtype) if decode_only else None
        if vae is None:
            from diffusers import AutoencoderKLWan

            # low_cpu_mem_usage=False: the meta-device path needs `accelerate`, and a VAE is small
            vae = AutoencoderKLWan.from_pretrained(path, torch_dtype=dtype, local_files_only=True,
                                                   low_cpu_mem_usage=False)
    elif os.path.isfile(path):
        vae = _load_decoder_only(path, None, dtype) if decode_only else _load_official(path, dtype)
    else:
        raise ValueError(f"VAE checkpoint {path!r} does not exist")
    return vae.eval().requires_grad_(False)


def decodes_without_diffusers(path) -> bool:
    """Whether `load_vae(path, decode_only=True)` builds vae_decoder's decoder (reads config.json and a
    shard index only). Never raises: a file it cannot read says False, and the load itself, whose
    errors every rank agrees on, reports what is wrong with it."""
    from . import vae_decoder

    path = os.fspath(path)
    try:
        config = vae_decoder.read_config(path)
        if config is None:
            return os.path.isfile(path) or os.path.isfile(os.path.join(path, OFFICIAL_VAE_FILENAME))
        return _our_decoder_files(path, config) is not None
    except Exception:  # noqa: BLE001 - a guess only; see above
        return False


class WanVAE:
    """Decode Wan latents (the DiT's normalised space) into video frames in [-1, 1]."""

    def __init__(self, vae):
        self.vae = vae
        cfg = vae.config
        self.z_dim = cfg.z_dim
        self.mean = torch.tensor(cfg.latents_mean, dtype=torch.float32).view(1, -1, 1, 1, 1)
        self.std = torch.tensor(cfg.latents_std, dtype=torch.float32).view(1, -1, 1, 1, 1)
        self.temporal_stride = cfg.scale_factor_temporal or 4
        self.spatial_stride = cfg.scale_factor_spatial or 8

    @classmethod
    def from_pretrained(cls, path, dtype: torch.dtype = torch.float32, decode_only: bool = False) -> "WanVAE":
        return cls(load_vae(path, dtype, decode_only))

    @property
    def dtype(self) -> torch.dtype:
        return next(self.vae.parameters()).dtype

    @torch.no_grad()
    def encode(self, video: torch.Tensor, device: Optional[torch.device] = None) -> torch.Tensor:
        """video [B, 3, F, H, W] in [-1, 1] -> normalised latents [B, z, 1 + (F-1)/4, H/8, W/8], fp32.

        The posterior's mode (its mean), as diffusers' Wan I2V pipeline takes it: no sampling noise.
        """
        device = device or video.device
        if not hasattr(self.vae, "encode"):
            raise RuntimeError("this VAE was loaded to decode only (load_vae(decode_only=True)); it cannot encode")
        posterior = self.vae.encode(video.to(device=device, dtype=self.dtype), return_dict=False)[0]
        z = posterior.mode().float()
        return (z - self.mean.to(z.device)) / self.std.to(z.device)

    @contextlib.contextmanager
    def frames_to(self, sink: Optional[Callable[[torch.Tensor], None]]) -> Iterator[bool]:
        """While `decode` runs inside, hand each chunk of frames to `sink` as the decoder makes it:
        [t, H, W, 3] uint8 on the CPU (`to_uint8_frames` of the rows `decode` returns), in order. Yields
        whether it does: only where the decoder's output is the video itself (the Wan2.1 layout: no
        patch_size, no diffusers tiling); elsewhere `sink` gets nothing."""
        if sink is None or getattr(self.vae.config, "patch_size", None) is not None \
                or getattr(self.vae, "use_tiling", False):
            yield False
            return
        # the decoder runs once per latent frame: [1, 3, t, H, W] (t = 1, then 4), the video's next frames
        handle = self.vae.decoder.register_forward_hook(lambda module, args, out: sink(to_uint8_frames(out[0].float())))
        try:
            yield True
        finally:
            handle.remove()

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, device: Optional[torch.device] = None) -> torch.Tensor:
        """latents [B, z, F, H, W] (normalised) -> video [B, 3, 4(F-1)+1, 8H, 8W] in [-1, 1], fp32."""
        device = device or latents.device
        z = latents.float().to(device) * self.std.to(device) + self.mean.to(device)
        video = self.vae.decode(z.to(self.dtype), return_dict=False)[0]
        return video.float().clamp(-1, 1)


def to_uint8_frames(video: torch.Tensor) -> torch.Tensor:
    """[3, F, H, W] in [-1, 1] -> [F, H, W, 3] uint8 (what the mp4 writer takes)."""
    return ((video.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 3, 0).cpu()
