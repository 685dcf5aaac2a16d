"""FP8 checkpoints as the community writes them, read into the one representation (fp8.py).

What a weight file may hold, per linear layer `L` (keys with or without `model.diffusion_model.` /
`diffusion_model.`, stripped by the loader):

  plain fp8 cast         L.weight float8_e4m3fn, no scale (the `*_fp8_e4m3fn.safetensors` files): scale 1
  ComfyUI scaled_fp8     L.weight e4m3fn + L.scale_weight (fp32 scalar) + one `scaled_fp8` marker
                         tensor whose dtype names the fp8 type (float32 = e4m3fn); L.scale_input ignored
  ComfyUI quantized      L.weight e4m3fn + L.weight_scale (fp32 scalar) + L.comfy_quant (uint8 bytes of
                         JSON {"format": "float8_e4m3fn", ...}) or the same per layer in the header's
                         `_quantization_metadata`; L.input_scale ignored
  LightX2V fp8           L.weight e4m3fn + L.weight_scale fp32 [out, 1] (one scale per output channel)
  full precision         L.weight bf16 / fp16 / fp32: quantized here, per output channel, as it loads

Layouts read from the public code (ComfyUI's comfy/ops.py `MixedPrecisionOps.Linear._load_from_state_dict`
and comfy/utils.py `convert_old_quants`; LightX2V's tools/convert/converter.py `quantize_model`, which
writes `<key>_scale` = [out, 1]). Activation scales in files (`scale_input`, `input_scale`) are static
calibration values; the FP8 GEMM here scales every token dynamically instead, so they are not needed.

Refused, naming the file and key: float8_e5m2 and the other ComfyUI formats (int8, nvfp4, mxfp8),
a scale whose shape is neither one value nor one per output row, a scale without its weight, NaN or
inf in a weight or a scale, a scale that is not > 0, and fp8 tensors when `model.quant` is null.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from safetensors import safe_open

from .fp8 import FP8_DTYPE, Fp8Linear, dequantize, fp8_is_finite, quantize_rows

PREFIXES = ("model.diffusion_model.", "diffusion_model.")
# scale tensors of a weight `L.weight`: L + suffix
_SCALE_SUFFIXES = {".scale_weight": "ComfyUI scaled_fp8 (scale_weight per tensor)", ".weight_scale": None}
_IGNORED_SUFFIXES = (".scale_input", ".input_scale")
_COMFY_QUANT = ".comfy_quant"
_MARKER = "scaled_fp8"
# companions of quantized formats this module does not implement
_UNSUPPORTED_SUFFIXES = (".weight_scale_2", ".pre_quant_scale", ".weight_s_rel", ".weight_s_channel",
                         ".weight_codebook", ".block_size")
SAFETENSORS_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
                      "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I8": torch.int8,
                      "U8": torch.uint8}
_FLOATS = (torch.bfloat16, torch.float16, torch.float32, torch.float64)


def strip_prefix(key: str) -> str:
    for prefix in PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix):]
    return key


@dataclass
class Fp8Source:
    """The quantization side of a set of weight files: which weight key has which scale tensor."""

    scales: dict[str, str] = field(default_factory=dict)      # weight key -> scale key
    formats: dict[str, int] = field(default_factory=dict)     # format name -> layers
    fp8_keys: list[str] = field(default_factory=list)         # tensors stored as e4m3fn
    scale_where: dict[str, tuple] = field(default_factory=dict)  # scale key -> (file, stored key)

    def describe(self) -> str:
        """The file's formats, for the summary (full-precision tensors are quantized while loading)."""
        return ", ".join(f"{name}: {n} tensor(s)" for name, n in sorted(self.formats.items())) or \
            "full precision, quantized per output channel while loading"


def scan(files, where: dict, shapes: dict, dtypes: dict, quant: Optional[str],
         read: Callable[[str], torch.Tensor]) -> Fp8Source:
    """Split the scale / marker / config tensors off the headers (in place: what remains are the
    model's tensors) and check everything that can be checked without reading a weight.

    `where` key -> (file, stored key); `read(key)` reads a small tensor (markers, configs)."""
    src = Fp8Source()
    names = {str(f) for f in files}
    label = lambda key: f"{where[key][0]}, key {where[key][1]!r}"  # noqa: E731
    side = [k for k in shapes if k == _MARKER or k.endswith(tuple(_SCALE_SUFFIXES) + _IGNORED_SUFFIXES +
                                                            (_COMFY_QUANT,) + _UNSUPPORTED_SUFFIXES)]
    for key in side:
        if key.endswith(_UNSUPPORTED_SUFFIXES):
            raise ValueError(f"{label(key)}: a tensor of a quantized format that is not supported (int8 / nvfp4 / "
                             "mxfp8 and similar); model.quant=fp8 reads float8_e4m3fn weights with per-tensor or "
                             "per-channel fp32 scales")
    layer_formats = _metadata_formats(names)
    for key in side:
        if key == _MARKER:
            if dtypes[key] not in (FP8_DTYPE, torch.float32):
                raise ValueError(f"{label(key)}: the scaled_fp8 marker says the weights are {dtypes[key]}; only "
                                 "float8_e4m3fn files are supported (e5m2 would need re-rounding)")
        elif key.endswith(_COMFY_QUANT):
            layer_formats[key[:-len(_COMFY_QUANT)]] = _comfy_format(read(key), label(key))
    for layer, fmt in layer_formats.items():
        if fmt != "float8_e4m3fn":
            raise ValueError(f"{sorted(names)[0]}: layer {layer!r} is quantized as {fmt!r}; only float8_e4m3fn "
                             "(ComfyUI's fp8 format) is supported")
    for key in side:
        suffix = next((s for s in _SCALE_SUFFIXES if key.endswith(s)), None)
        if suffix is None:
            continue
        weight = key[:-len(suffix)] + ".weight"
        if weight not in shapes:
            raise ValueError(f"{label(key)}: a weight scale without its weight ({weight!r} is not in the file)")
        if weight in src.scales:
            raise ValueError(f"{label(key)}: {weight!r} has two scales ({src.scales[weight]!r} too)")
        rows = shapes[weight][0] if shapes[weight] else 0
        if tuple(shapes[key]) not in ((), (1,), (rows,), (rows, 1)):
            raise ValueError(f"{label(key)}: scale of shape {tuple(shapes[key])} for a weight of shape "
                             f"{tuple(shapes[weight])}; expected one value or one per output row ({rows})")
        if dtypes[key] not in _FLOATS:
            raise ValueError(f"{label(key)}: scale stored as {dtypes[key]}; expected a float tensor")
        src.scales[weight] = key
        src.scale_where[key] = where[key]
        per_row = tuple(shapes[key]) in ((rows,), (rows, 1)) and rows > 1
        name = _SCALE_SUFFIXES[suffix] or ("per-channel weight_scale (LightX2V)" if per_row else
                                           "ComfyUI quantized (weight_scale per tensor)")
        src.formats[name] = src.formats.get(name, 0) + 1
    for key in side:
        del where[key], shapes[key], dtypes[key]
    for key, dtype in dtypes.items():
        if dtype == FP8_DTYPE:
            src.fp8_keys.append(key)
        elif dtype not in _FLOATS:
            raise ValueError(f"{label(key)}: stored as {dtype}; a Wan DiT file holds float tensors (float8_e4m3fn "
                             "with fp32 scales for model.quant=fp8)")
    plain = [k for k in src.fp8_keys if k not in src.scales]
    if plain:
        src.formats["plain fp8 cast (no scale)"] = len(plain)
    if src.fp8_keys and quant != "fp8":
        first = src.fp8_keys[0]
        raise ValueError(f"{label(first)} is stored as float8_e4m3fn ({len(src.fp8_keys)} fp8 tensor(s)): an fp8 "
                         "checkpoint, but model.quant is null; set model.quant=fp8 to load it as it is")
    return src


def _metadata_formats(files) -> dict[str, str]:
    """Layer -> format from ComfyUI's `_quantization_metadata` header entry (prefixes stripped)."""
    out = {}
    for file in files:
        with safe_open(file, framework="pt", device="cpu") as f:
            raw = (f.metadata() or {}).get("_quantization_metadata")
        if not raw:
            continue
        try:
            layers = json.loads(raw).get("layers", {})
        except (ValueError, AttributeError):
            raise ValueError(f"{file}: the header's _quantization_metadata is not JSON with a 'layers' map") from None
        for layer, conf in layers.items():
            out[strip_prefix(layer)] = conf.get("format") if isinstance(conf, dict) else conf
    return out


def _comfy_format(t: torch.Tensor, where: str) -> str:
    try:
        return json.loads(bytes(t.to(torch.uint8).reshape(-1).tolist()).decode("utf-8")).get("format")
    except (ValueError, AttributeError):
        raise ValueError(f"{where}: comfy_quant is not the UTF-8 JSON of a layer config") from None


def _row_scale(scale: Optional[torch.Tensor], rows: int, where: str, device) -> torch.Tensor:
    """A file's scale (none, one value, or one per row) as fp32 [rows, 1]; checked finite and > 0."""
    if scale is None:
        return torch.ones(rows, 1, dtype=torch.float32, device=device)
    s = scale.to(device=device, dtype=torch.float32).reshape(-1, 1)
    if not bool((torch.isfinite(s) & (s > 0)).all()):
        raise ValueError(f"{where}: the weight scale holds NaN, inf or a value <= 0 ({s.flatten()[:4].tolist()} "
                         "...); the checkpoint is corrupt")
    return s.expand(rows, 1) if s.shape[0] == 1 else s


@torch.no_grad()
def copy_piece(model: torch.nn.Module, name: str, start: int, rows: int, tensor: torch.Tensor,
               scale: Optional[torch.Tensor], where: str, work_device=None) -> None:
    """Write a file tensor (rows `start`..`start+rows` of parameter `name`) into the model.

    Into an Fp8Linear's weight: e4m3 tensors as they are (their scale broadcast per row), full
    precision ones quantized per output channel on `work_device`. Anywhere else: the value itself,
    an e4m3 tensor dequantized with its scale."""
    owner_name, _, leaf = name.rpartition(".")
    owner = model.get_submodule(owner_name) if owner_name else model
    param = getattr(owner, leaf)
    device = work_device if work_device is not None else param.device
    if tensor.dtype == FP8_DTYPE and not bool(fp8_is_finite(tensor)):
        raise ValueError(f"{where}: the fp8 weight holds NaN values; the checkpoint is corrupt")
    if isinstance(owner, Fp8Linear) and leaf == "weight":
        if tensor.dtype == FP8_DTYPE:
            q, s = tensor, _row_scale(scale, rows, where, device)
        else:
            q, s = quantize_rows(tensor.to(device))
            if not bool(torch.isfinite(s).all()):
                raise ValueError(f"{where}: the weight holds NaN or inf values; the checkpoint is corrupt")
        param.narrow(0, start, rows).copy_(q)
        owner.weight_scale.narrow(0, start, rows).copy_(s)
        return
    if tensor.dtype == FP8_DTYPE:
        flat = tensor.to(device).reshape(tensor.shape[0] if tensor.ndim else 1, -1)
        tensor = dequantize(flat, _row_scale(scale, flat.shape[0], where, device), torch.float32).view(tensor.shape)
    param.narrow(0, start, rows).copy_(tensor)
