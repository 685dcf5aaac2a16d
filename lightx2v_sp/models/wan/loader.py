"""Read and write Wan2.1 DiT checkpoints: the official layout and the diffusers layout.

Loading builds the model on the meta device, allocates it once (uninitialised) in the target
dtype and device, then copies tensor by tensor out of the memory-mapped safetensors files, a few
at a time (parallel_copy.py): the only extra memory is the source tensors being copied. Everything
is validated (missing, unexpected, wrong shape) from the file headers before a byte of weights is read.
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import torch
from safetensors import safe_open

from ..parallel_copy import copy_all
from ..safetensors_io import save_safetensors
from .config import WanConfig
from .keymap import native_pieces
from .model import WanModel

WEIGHTS = "diffusion_pytorch_model.safetensors"
INDEX = WEIGHTS + ".index.json"
OFFICIAL_PREFIX = "model.diffusion_model."  # ComfyUI-style repacks of the official weights


def _list_error(what: str, keys: list[str], limit: int = 20) -> str:
    shown = ", ".join(keys[:limit])
    more = f" ... and {len(keys) - limit} more" if len(keys) > limit else ""
    return f"{len(keys)} {what}: {shown}{more}"


def resolve_checkpoint(path) -> tuple[Path, str, dict, list[Path]]:
    """(directory, layout, config dict, safetensors files) of a Wan DiT checkpoint directory."""
    root = Path(path)
    if not root.is_dir():
        raise ValueError(f"Wan checkpoint {str(root)!r} is not a directory; expected a folder with config.json "
                         f"and {WEIGHTS} (official or diffusers layout)")
    # a diffusers pipeline directory keeps the DiT in transformer/
    if (root / "transformer" / "config.json").is_file() and (
            not (root / "config.json").is_file() or (root / "model_index.json").is_file()):
        root = root / "transformer"
    if not (root / "config.json").is_file():
        raise ValueError(f"no config.json in {str(root)!r} (contents: {sorted(os.listdir(root))}); "
                         f"cannot tell the model shape")
    cfg = json.loads((root / "config.json").read_text())
    if cfg.get("_class_name") == "WanTransformer3DModel" or "num_attention_heads" in cfg:
        layout = "diffusers"
    elif "dim" in cfg and "num_heads" in cfg:
        layout = "official"
    else:
        raise ValueError(f"{root / 'config.json'} is neither an official Wan2.1 config (dim, num_heads, ...) nor a "
                         f"diffusers WanTransformer3DModel config; keys: {sorted(cfg)}")
    if (root / INDEX).is_file():
        weight_map = json.loads((root / INDEX).read_text())["weight_map"]
        files = [root / name for name in sorted(set(weight_map.values()))]
        absent = [str(f.name) for f in files if not f.is_file()]
        if absent:
            raise ValueError(f"{root / INDEX} names shard files that are missing: {absent}")
    elif (root / WEIGHTS).is_file():
        files = [root / WEIGHTS]
    else:
        files = sorted(root.glob("*.safetensors"))
        if not files:
            raise ValueError(f"no *.safetensors weights in {str(root)!r} (contents: {sorted(os.listdir(root))})")
    return root, layout, cfg, files


def _read_headers(files: list[Path]) -> tuple[dict[str, tuple[Path, str]], dict[str, tuple], dict[str, torch.dtype]]:
    """key -> (file, stored key), key -> shape, key -> dtype, from the safetensors headers only."""
    where, shapes, dtypes = {}, {}, {}
    for file in files:
        with safe_open(file, framework="pt", device="cpu") as f:
            for stored in f.keys():
                key = stored[len(OFFICIAL_PREFIX):] if stored.startswith(OFFICIAL_PREFIX) else stored
                if key in where:
                    raise ValueError(f"tensor {key!r} is stored twice: in {where[key][0].name} and {file.name}")
                sl = f.get_slice(stored)
                where[key] = (file, stored)
                shapes[key] = tuple(sl.get_shape())
                dtypes[key] = getattr(torch, {"BF16": "bfloat16", "F16": "float16", "F32": "float32",
                                              "F64": "float64"}.get(sl.get_dtype(), "uint8"))
    return where, shapes, dtypes


def _plan(model: WanModel, layout: str, shapes: dict[str, tuple]):
    """[(native name, disk key, first row, rows)] after checking names and shapes against the files."""
    plan, errors, used = [], [], set()
    for name, p in model.named_parameters():
        for key, start, rows in native_pieces(name, p.shape[0], layout):
            plan.append((name, key, start, rows))
            used.add(key)
            want = (rows, *p.shape[1:])
            if key in shapes and shapes[key] != want:
                errors.append(f"{key}: checkpoint has shape {shapes[key]}, model expects {want}")
    missing = sorted(used - set(shapes))
    unexpected = sorted(set(shapes) - used)
    if missing or unexpected:
        parts = ([_list_error("missing keys", missing)] if missing else []) + \
                ([_list_error("unexpected keys", unexpected)] if unexpected else [])
        raise ValueError(f"{layout} Wan checkpoint does not match the model built from its config; "
                         f"{'; '.join(parts)}")
    if errors:
        raise ValueError("Wan checkpoint shapes do not match its config: " + "; ".join(errors))
    return plan


def _build(config: WanConfig, layout: str, shapes: dict[str, tuple], dtype: torch.dtype, device):
    """An uninitialised model in `dtype` on `device`, and the checked copy plan for its weights."""
    with torch.device("meta"):
        model = WanModel(config)
    plan = _plan(model, layout, shapes)
    model.set_dtype(dtype)
    model.to_empty(device=device)
    return model, plan


def load_wan(path, dtype: torch.dtype | None = None, device="cpu", skip=None) -> WanModel:
    """`skip(name)` True: that parameter is allocated but not read (another process supplies it)."""
    root, layout, cfg, files = resolve_checkpoint(path)
    config = WanConfig.from_diffusers(cfg) if layout == "diffusers" else WanConfig.from_official(cfg)
    where, shapes, dtypes = _read_headers(files)
    if layout == "official" and "img_emb.proj.0.weight" in shapes and config.image_dim is None:
        # Wan2.1 I2V: the official config does not say how wide the CLIP tokens are; the weights do
        config = dataclasses.replace(config, image_dim=shapes["img_emb.proj.0.weight"][0])
    if dtype is None:  # keep what the checkpoint stores
        first = native_pieces("patch_embedding.weight", config.dim, layout)[0][0]
        dtype = dtypes.get(first, torch.float32)
    model, plan = _build(config, layout, shapes, dtype, device)
    params = dict(model.named_parameters())
    by_file: dict[Path, list] = {}
    for name, key, start, rows in plan:
        if skip is not None and skip(name):
            continue
        by_file.setdefault(where[key][0], []).append((name, where[key][1], start, rows))
    handles = {file: safe_open(file, framework="pt", device="cpu") for file in by_file}
    copy_all([(params[name].narrow(0, start, rows), lambda f=handles[file], stored=stored: f.get_tensor(stored))
              for file, pieces in by_file.items() for name, stored, start, rows in pieces])
    return model.eval()


def model_from_state_dict(config: WanConfig, state_dict: dict[str, torch.Tensor], layout: str = "diffusers",
                          dtype: torch.dtype = torch.float32, device="cpu") -> WanModel:
    """A WanModel from in-memory tensors named in `layout` (e.g. a diffusers model's state_dict())."""
    model, plan = _build(config, layout, {k: tuple(v.shape) for k, v in state_dict.items()}, dtype, device)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, key, start, rows in plan:
            params[name].narrow(0, start, rows).copy_(state_dict[key])
    return model.eval()


def save_pretrained(model: WanModel, path, layout: str = "official", max_shard_bytes: int | None = None) -> None:
    """Write `model` as a real checkpoint directory: config.json + safetensors (sharded with an index)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    for name, p in model.named_parameters():
        for key, start, rows in native_pieces(name, p.shape[0], layout):
            # clone: slices of one fused parameter share storage, which safetensors refuses
            t = p.detach().narrow(0, start, rows)
            tensors[key] = t.clone() if rows != p.shape[0] else t.contiguous()
    config = model.config.to_official() if layout == "official" else model.config.to_diffusers()
    (path / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    save_safetensors(tensors, path, WEIGHTS.removesuffix(".safetensors"), max_shard_bytes)


def _from_pretrained(cls, path, dtype: torch.dtype | None = None, device="cpu", skip=None) -> WanModel:
    """Load an official Wan checkpoint or a diffusers WanTransformer3DModel directory (load_wan)."""
    return load_wan(path, dtype=dtype, device=device, skip=skip)


def _save_pretrained(self, path, layout: str = "official", max_shard_bytes: int | None = None) -> None:
    save_pretrained(self, path, layout=layout, max_shard_bytes=max_shard_bytes)


WanModel.from_pretrained = classmethod(_from_pretrained)
WanModel.save_pretrained = _save_pretrained
