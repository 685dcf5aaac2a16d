"""The run's quantization settings: where each DiT's weights come from, how they load, what ran.

- `model.dit_path` / `model.dit_path_2` name the DiT weights (high-noise / low-noise expert) as a
  file or directory; the DiT config and the other components still come from `model.path`. Checked
  in preflight (they exist, and their number matches the model's experts).
- `model.quant: fp8` loads the block linears as e4m3 + per-output-channel scales (models/quant), and
  picks each layer's matmul for the run's device: the FP8 GEMM on sm89+ in bf16, weight-only else.
- `text_encoder.quant: fp8` does the same to UMT5's block linears, always weight-only.
The summary's `quant` entry records the source format, the layers and the matmul path of each.
"""
from __future__ import annotations

import logging
import os
from typing import Optional

import torch

from lightx2v_sp.models.quant import set_matmul, summary

log = logging.getLogger("lightx2v_sp")


def _resolve(value: Optional[str], key: str) -> Optional[str]:
    if value is None:
        return None
    path = os.path.abspath(os.path.expanduser(value))
    if not (os.path.isfile(path) or os.path.isdir(path)):
        raise ValueError(f"{key} = {value!r} does not exist; give a .safetensors file or a directory of them")
    return path


def check_dit_weights(cfg_model, dits: list[str]) -> None:
    """Preflight: the weight files exist, one per expert, and their headers fit the DiT configs in
    `dits` (names, shapes, fp8 formats and scales), before anything is loaded or encoded."""
    from lightx2v_sp.models.wan import load_wan

    for config_dir, weights in zip(dits, dit_weights(cfg_model, len(dits))):
        if weights is not None:
            load_wan(config_dir, dtype=torch.bfloat16, device="meta", weights=weights,
                     quant=getattr(cfg_model, "quant", None))


def dit_weights(cfg_model, num_experts: int) -> list[Optional[str]]:
    """[weights of each expert] (None: the DiT directory's own); ValueError for a mismatch."""
    first = _resolve(cfg_model.dit_path, "model.dit_path")
    second = _resolve(cfg_model.dit_path_2, "model.dit_path_2")
    if num_experts == 1 and second is not None:
        raise ValueError(f"model.dit_path_2 = {cfg_model.dit_path_2!r} is for two-expert models (Wan2.2 A14B), but "
                         "this model has one DiT; drop it")
    if num_experts == 2 and (first is None) != (second is None):
        raise ValueError("this model has two experts: give model.dit_path (high-noise) and model.dit_path_2 "
                         "(low-noise) together, or neither; one of them alone would mix two checkpoints")
    return [first, second][:num_experts]


def load_options(cfg, expert_index: int, num_experts: int, device: torch.device) -> dict:
    """Keyword arguments of WanModel.from_pretrained for one expert: weights, quant, work device."""
    weights = dit_weights(cfg.model, num_experts)[expert_index]
    return {"weights": weights, "quant": cfg.model.quant, "work_device": device}


def install_dit_matmul(model, cfg, device: torch.device, dtype: torch.dtype) -> None:
    """Each fp8 layer's matmul for `device`, logged and kept for the summary (`model.quant_summary`)."""
    if cfg.model.quant is None:
        model.quant_summary = None
        return
    fast = cfg.model.fp8_accum == "fast"
    counts = set_matmul(model, device, dtype, fast_accum=fast)
    model.quant_summary = summary(model, getattr(model, "quant_source", None) or "quantized on load", counts)
    log.info("DiT fp8: %d linear layers (%s); matmul %s; FP8 GEMM accumulation %s", model.quant_summary["layers"],
             model.quant_summary["source"], model.quant_summary["matmul"], model.quant_summary["fp8_accum"])
    if fast and not counts.get("fp8"):
        log.warning("model.fp8_accum=fast has no effect here: no layer runs the FP8 GEMM on %s in %s "
                    "(weight-only path); the summary records it", device, dtype)


def run_summary(models, cfg) -> dict:
    te = {"quant": cfg.text_encoder.quant, "matmul": "weight_only" if cfg.text_encoder.quant else None}
    return {"dit": [getattr(m, "quant_summary", None) for m in models], "text_encoder": te,
            "note": "dit: one entry per expert (null: compute dtype); matmul: layers per path; "
                    "fp8_accum: FP8 GEMM layers per accumulation (model.fp8_accum)"}
