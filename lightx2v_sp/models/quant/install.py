"""Which layers are quantized, swapping them in, the matmul each runs, and what it costs.

Quantization is installed on a model like parallelism: the model files define nn.Linear layers and
know nothing of fp8; `quantize_linears` replaces the chosen ones with Fp8Linear (on the meta device
while a loader builds the model, so the full-precision weights never exist in memory at once; or on
loaded weights, quantizing them). The DiT's chosen layers are the linear layers of every block
(self-attention qkv and o, cross-attention q, kv (+ kv_img) and o, the FFN); the patch, time and text
embeddings, the head, norms and modulation tables stay in the compute dtype: they are small and
sensitive. UMT5's are its blocks' q, k, v, o and FFN (gate, fc1, fc2); its embedding table stays.
"""
from __future__ import annotations

import re
from typing import Iterable, Optional

import torch
from torch import nn

from .fp8 import Fp8Linear, matmul_path

QUANT_CHOICES = (None, "fp8")
DIT_LINEARS = re.compile(r"blocks\.\d+\.(self_attn\.(qkv|o)|cross_attn\.(q|kv|kv_img|o)|ffn\.[02])")
T5_LINEARS = re.compile(r"blocks\.\d+\.(attn\.[qkvo]|ffn\.(gate|fc1|fc2))")
SCALE_BYTES_PER_ROW = 4  # one fp32 scale per output channel


def target_names(model: nn.Module, pattern: re.Pattern) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and pattern.fullmatch(n)]


def quantize_linears(model: nn.Module, pattern: re.Pattern) -> list[str]:
    """Replace every nn.Linear whose name matches `pattern` by an Fp8Linear (in place); their names."""
    names = target_names(model, pattern)
    for name in names:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, Fp8Linear.from_linear(getattr(parent, attr)))
    return names


def fp8_layers(model: nn.Module) -> list[tuple[str, Fp8Linear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, Fp8Linear)]


def set_matmul(model: nn.Module, device: torch.device, dtype: torch.dtype, allow_fp8: bool = True,
               fast_accum: bool = False) -> dict:
    """Pick each Fp8Linear's path for running on `device` in `dtype`; {path: number of layers}.
    `fast_accum`: the FP8 GEMM layers accumulate without fp32 promotion (model.fp8_accum=fast)."""
    counts: dict[str, int] = {}
    for _, layer in fp8_layers(model):
        layer.matmul = matmul_path(layer, torch.device(device), dtype, allow_fp8)
        layer.fast_accum = fast_accum and layer.matmul == "fp8"
        counts[layer.matmul] = counts.get(layer.matmul, 0) + 1
    return counts


def owner_of(model: nn.Module, param_name: str) -> Optional[Fp8Linear]:
    """The Fp8Linear whose `weight` is `param_name`, or None (LoRA merging reads and writes through it)."""
    owner_name, _, leaf = param_name.rpartition(".")
    if leaf != "weight":
        return None
    owner = model.get_submodule(owner_name) if owner_name else model
    return owner if isinstance(owner, Fp8Linear) else None


def weight_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def summary(model: nn.Module, source: str, counts: dict) -> dict:
    """What the run's summary records about one quantized model."""
    paths = {"fp8": "fp8 GEMM (torch._scaled_mm, per-token activation scales)",
             "weight_only": "weight-only (dequantized per layer to the compute dtype)"}
    fast = sum(1 for _, layer in fp8_layers(model) if layer.fast_accum)
    return {"quant": "fp8", "source": source, "layers": sum(counts.values()),
            "matmul": {paths[k]: v for k, v in sorted(counts.items())},
            "fp8_accum": {"fast": fast, "exact": counts.get("fp8", 0) - fast}, "weight_bytes": weight_bytes(model)}


def bytes_per_param(linears: Iterable[tuple[int, int]], total_numel: int, dtype_bytes: int,
                    quant: Optional[str]) -> float:
    """Average bytes per parameter of a group of `total_numel` parameters of which `linears` ((out, in)
    shapes) are quantized: 1 byte per weight + a 4-byte scale per row, the rest at `dtype_bytes`."""
    if quant is None:
        return float(dtype_bytes)
    linears = list(linears)
    quantized = sum(o * i for o, i in linears)
    scales = sum(o for o, _ in linears) * SCALE_BYTES_PER_ROW
    return (quantized + scales + (total_numel - quantized) * dtype_bytes) / max(total_numel, 1)


def _linear_shapes(module: nn.Module, pattern: re.Pattern) -> list[tuple[int, int]]:
    return [(m.out_features, m.in_features) for n, m in module.named_modules()
            if isinstance(m, nn.Linear) and pattern.fullmatch(n)]


def t5_bytes_per_param(t5_cfg, numel: int, dtype_bytes: int, quant: Optional[str]) -> float:
    """Bytes per parameter of a UMT5 encoder (or a tp shard) of `numel` parameters in all."""
    if quant is None:
        return float(dtype_bytes)
    from lightx2v_sp.models.t5.model import T5Encoder

    with torch.device("meta"):
        enc = T5Encoder(t5_cfg)
    full = sum(p.numel() for p in enc.parameters())
    # a tp shard holds the same fraction of the quantized and the other parameters, to within rounding
    return bytes_per_param(_linear_shapes(enc, T5_LINEARS), full, dtype_bytes, quant) if numel else 0.0
