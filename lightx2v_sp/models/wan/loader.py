"""Read and write Wan2.1 DiT checkpoints: the official layout and the diffusers layout.

Loading builds the model on the meta device, allocates it once (uninitialised) in the target
dtype and device, then copies tensor by tensor out of the memory-mapped safetensors files, a few
at a time (parallel_copy.py): the only extra memory is the source tensors being copied. Everything
is validated (missing, unexpected, wrong shape) from the file headers before a byte of weights is read.

With `quant="fp8"` the block linears are Fp8Linear from the start and every tensor is converted as it
is copied (models/quant), one at a time: fp8 community files load as they are, full-precision ones
are quantized tensor by tensor. `weights` (model.dit_path) reads the tensors from another file or
directory.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from pathlib import Path

import torch
from safetensors import safe_open

from ..parallel_copy import copy_all
from ..quant import DIT_LINEARS, copy_piece, quantize_linears, scan, strip_prefix
from ..quant.checkpoint import SAFETENSORS_DTYPES
from ..safetensors_io import save_safetensors
from .config import WanConfig
from .keymap import native_pieces
from .model import WanModel

WEIGHTS = "diffusion_pytorch_model.safetensors"
INDEX = WEIGHTS + ".index.json"


def _list_error(what: str, keys: list[str], limit: int = 20) -> str:
    shown = ", ".join(keys[:limit])
    more = f" ... and {len(keys) - limit} more" if len(keys) > limit else ""
    return f"{len(keys)} {what}: {shown}{more}"


def read_config(path) -> tuple[Path, str, WanConfig]:
    """(directory, layout, WanConfig) of a Wan DiT checkpoint directory, from its config.json alone."""
    root, layout, cfg = _read_config(path)
    return root, layout, _wan_config(cfg, layout)


def _wan_config(cfg: dict, layout: str) -> WanConfig:
    return WanConfig.from_diffusers(cfg) if layout == "diffusers" else WanConfig.from_official(cfg)


def _read_config(path) -> tuple[Path, str, dict]:
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
    return root, layout, cfg


def resolve_checkpoint(path) -> tuple[Path, str, dict, list[Path]]:
    """(directory, layout, config dict, safetensors files) of a Wan DiT checkpoint directory."""
    root, layout, cfg = _read_config(path)
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


def weight_files(weights) -> list[Path]:
    """The safetensors files of `model.dit_path`: a file, or a directory (index, or all its files)."""
    root = Path(weights)
    if root.is_file():
        return [root]
    if not root.is_dir():
        raise ValueError(f"DiT weights {str(root)!r} (model.dit_path) do not exist; give a .safetensors file or a "
                         "directory of them")
    if (root / INDEX).is_file():
        return [root / name for name in sorted(set(json.loads((root / INDEX).read_text())["weight_map"].values()))]
    files = sorted(root.glob("*.safetensors"))
    if not files:
        raise ValueError(f"no *.safetensors weights in {str(root)!r} (model.dit_path; contents: "
                         f"{sorted(os.listdir(root))})")
    return files


def weights_layout(keys) -> str:
    """official or diffusers, from the tensor names of weights that came without a config."""
    diffusers = ("condition_embedder.", "proj_out.", "scale_shift_table")
    return "diffusers" if any(k.startswith(diffusers) or ".attn1." in k for k in keys) else "official"


def _read_headers(files: list[Path]) -> tuple[dict[str, tuple[Path, str]], dict[str, tuple], dict[str, torch.dtype]]:
    """key -> (file, stored key), key -> shape, key -> dtype, from the safetensors headers only."""
    where, shapes, dtypes = {}, {}, {}
    for file in files:
        with safe_open(file, framework="pt", device="cpu") as f:
            for stored in f.keys():
                key = strip_prefix(stored)  # ComfyUI-style repacks: model.diffusion_model. / diffusion_model.
                if key in where:
                    raise ValueError(f"tensor {key!r} is stored twice: in {where[key][0].name} and {file.name}")
                sl = f.get_slice(stored)
                where[key] = (file, stored)
                shapes[key] = tuple(sl.get_shape())
                dtypes[key] = SAFETENSORS_DTYPES.get(sl.get_dtype(), torch.uint8)
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


def _build(config: WanConfig, layout: str, shapes: dict[str, tuple], dtype: torch.dtype, device,
           quant: str | None = None):
    """An uninitialised model in `dtype` on `device`, and the checked copy plan for its weights;
    `quant` fp8: the block linears become Fp8Linear (e4m3 + scales) before anything is allocated."""
    with torch.device("meta"):
        model = WanModel(config)
    plan = _plan(model, layout, shapes)
    model.set_dtype(dtype)
    if quant == "fp8":
        quantize_linears(model, DIT_LINEARS)
    model.to_empty(device=device)
    return model, plan


def _open(files: list[Path], quant: str | None, weights):
    """Headers of the weight files, their layout (None: the config directory's) and their fp8 side."""
    where, shapes, dtypes = _read_headers(files)

    def read_small(key):
        with safe_open(where[key][0], framework="pt", device="cpu") as f:
            return f.get_tensor(where[key][1])

    fp8 = scan(files, where, shapes, dtypes, quant, read_small)
    return where, shapes, dtypes, (weights_layout(shapes) if weights is not None else None), fp8


def load_wan(path, dtype: torch.dtype | None = None, device="cpu", skip=None, weights=None,
             quant: str | None = None, work_device=None) -> WanModel:
    """`skip(name)` True: that parameter is allocated but not read (another process supplies it).

    `weights`: a .safetensors file or directory holding the DiT's tensors (model.dit_path: e.g. a
    community fp8 file, either layout, with or without a `model.diffusion_model.` prefix), while the
    config comes from `path`. `quant` "fp8": the block linears hold e4m3 weights with per-output-channel
    scales; fp8 files load as they are, full-precision tensors are quantized one by one as they are read
    (on `work_device`, default `device`), so the full-precision model never sits in memory.
    device="meta": only the headers are checked against the model (names, shapes, fp8 formats).
    """
    root, layout, cfg, files = resolve_checkpoint(path)
    config = _wan_config(cfg, layout)
    try:
        where, shapes, dtypes, weights_layout_, fp8 = _open(weight_files(weights) if weights else files, quant,
                                                              weights)
        layout = weights_layout_ or layout
        if layout == "official" and "img_emb.proj.0.weight" in shapes and config.image_dim is None:
            # Wan2.1 I2V: the official config does not say how wide the CLIP tokens are; the weights do
            config = dataclasses.replace(config, image_dim=shapes["img_emb.proj.0.weight"][0])
        if dtype is None:  # keep what the checkpoint stores
            first = native_pieces("patch_embedding.weight", config.dim, layout)[0][0]
            dtype = dtypes.get(first, torch.float32)
            dtype = torch.bfloat16 if dtype == torch.float8_e4m3fn else dtype  # an fp8 file computes in bf16
        model, plan = _build(config, layout, shapes, dtype, device, quant)
    except ValueError as e:
        if weights is None or str(weights) in str(e):
            raise
        raise ValueError(f"the DiT weights at {weights}: {e}") from None
    if torch.device(device).type == "meta":  # a check of the files against the model: no weight is read
        return model
    by_file: dict[Path, list] = {}
    for name, key, start, rows in plan:
        if skip is not None and skip(name):
            continue
        by_file.setdefault(where[key][0], []).append((name, key, start, rows))
    with torch.no_grad(), contextlib.ExitStack() as stack:
        handles: dict = {}

        def read(file, stored):
            if file not in handles:
                handles[file] = stack.enter_context(safe_open(file, framework="pt", device="cpu"))
            return handles[file].get_tensor(stored)

        if not quant:  # plain copies (and casts), several at a time
            params = dict(model.named_parameters())
            copy_all([(params[name].narrow(0, start, rows), lambda where_=where[key]: read(*where_))
                      for pieces in by_file.values() for name, key, start, rows in pieces])
        for file, pieces in by_file.items() if quant else ():
            for name, key, start, rows in pieces:
                scale = fp8.scales.get(key)
                copy_piece(model, name, start, rows, read(*where[key]),
                           read(*fp8.scale_where[scale]) if scale else None, f"{file}, key {where[key][1]!r}",
                           work_device)
    model.quant_source = fp8.describe() if quant else None
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


def _from_pretrained(cls, path, dtype: torch.dtype | None = None, device="cpu", skip=None, **kwargs) -> WanModel:
    """Load an official Wan checkpoint or a diffusers WanTransformer3DModel directory (load_wan; kwargs:
    weights, quant, work_device)."""
    return load_wan(path, dtype=dtype, device=device, skip=skip, **kwargs)


def _save_pretrained(self, path, layout: str = "official", max_shard_bytes: int | None = None) -> None:
    save_pretrained(self, path, layout=layout, max_shard_bytes=max_shard_bytes)


WanModel.from_pretrained = classmethod(_from_pretrained)
WanModel.save_pretrained = _save_pretrained
