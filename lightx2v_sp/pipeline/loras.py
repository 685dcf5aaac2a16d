"""The run's `lora:` entries: checked in preflight, merged into each DiT right after it is loaded.

Merging happens before install_parallel, so Ulysses, CFG-parallel and block offload only ever see
ordinary (merged) weights: block offload pins and streams them, and a step costs nothing extra.
Two-expert models call `apply_loras` once per expert with expert="high_noise" (diffusers'
`transformer`) and "low_noise" (`transformer_2`); entries without `expert` go to both.
"""
from __future__ import annotations

from typing import Optional

import torch

from lightx2v_sp.models.wan.lora import LoraEntry, merge_lora, resolve_lora_file, select_loras


def lora_path(path: str, cfg) -> str:
    """`tiny` names the embedded tiny model's LoRA (built on first use); anything else is a path."""
    if path != "tiny":
        return path
    if cfg.model.path is not None:
        raise ValueError(f"lora path 'tiny' is the embedded tiny model's LoRA, but model.path = {cfg.model.path!r}; "
                         "it only fits the tiny model (model.path: null)")
    from lightx2v_sp.models.tiny import ensure_tiny_lora
    return ensure_tiny_lora()


def check_loras(cfg) -> None:
    """Preflight: every lora.path names a readable file (the keys are checked when they are merged)."""
    for entry in cfg.lora:
        resolve_lora_file(lora_path(entry.path, cfg))


def apply_loras(model, cfg, device: torch.device, expert: Optional[str] = None,
                skip_blocks: bool = False) -> list[dict]:
    """Merge the entries meant for this DiT (the arithmetic on `device`); their summary for the run JSON.

    `skip_blocks`: this rank did not read the blocks (local rank 0 shares them, merged already)."""
    entries = [LoraEntry(lora_path(e.path, cfg), e.scale, e.expert) for e in select_loras(cfg.lora, expert)]
    skip = (lambda name: name.startswith("blocks.")) if skip_blocks else None
    return merge_lora(model, entries, device=device, expert=expert, skip=skip)
