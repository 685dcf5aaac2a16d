"""LoRA adapters for the Wan DiT: read the file formats diffusers' Wan loader accepts, merge into the weights.

A LoRA adds `scale * s * up @ down` to a linear weight (s = alpha / rank, or 1 without an alpha);
some files also carry full differences (`.diff` for a weight or any named tensor, `.diff_b` for a
bias, `.diff_m` for a block's or the head's modulation table) and PEFT's `lora_B.bias`. Every update
must have exactly the shape of the tensor it lands on (a transposed difference is an error, not a
silent merge). Merging happens once, at load, in fp32 and is then rounded to the parameter's
dtype (an fp8 layer, model.quant=fp8: its dequantized weight plus the update is quantized again with
fresh per-output-channel scales), so a sampling step costs nothing extra and every later layout (Ulysses, CFG-parallel,
block offload) sees ordinary weights.

Key layouts (any leading `transformer.`, `diffusion_model.`, `model.diffusion_model.` or
`base_model.model.` is dropped):
  diffusers / PEFT   blocks.0.attn1.to_q.lora_A.weight, .lora_B.weight, .lora_B.bias;
                     alpha from the file's `lora_adapter_metadata` (lora_alpha, alpha_pattern,
                     use_rslora), as written by diffusers' save_lora_weights; none -> s = 1
  official / ComfyUI blocks.0.self_attn.q.lora_A.weight or .lora_down/.lora_up, .alpha, .diff, .diff_b;
                     blocks.0.modulation.diff (ComfyUI) or blocks.0.diff_m (LightX2V) for modulation
  kohya / musubi     lora_unet_blocks_0_self_attn_q.lora_down.weight, .lora_up.weight, .alpha
Fused projections: a LoRA on q, k or v lands in its row slice of our fused `qkv` / `kv`
weight (keymap.native_pieces gives the slices).

Where diffusers differs: it drops `.diff`/`.diff_b` on norms, `.diff` on most layers and a
time_projection `.diff_b` without weights, and does not read `.diff_m`; here every difference is
applied to the tensor it names, as the tools that write such files (LightX2V, ComfyUI) do.
`.diff_m` follows LightX2V's loader (lightx2v/utils/lora_loader.py: `<module>.diff_m` is added to
`<module>.modulation`) and Kijai's WanVideoWrapper (which renames it `<module>.modulation.diff`). DoRA files are refused: merging
them as plain LoRA would give a different model.

Two-expert models (Wan2.2 A14B): `merge_lora` works on one model; call it once per expert with
the entries meant for it (`select_loras(entries, "high_noise")` for `transformer`,
`"low_noise"` for `transformer_2`; an entry without `expert` goes to every expert) and
expert=... so that a file holding both experts (keys under high_noise_model. / low_noise_model.
or transformer_2.) gives each expert its own part.
"""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from typing import Iterable, Optional, Sequence

import torch
from safetensors import safe_open

from ..quant import owner_of
from .keymap import native_pieces

LORA_FILE = "pytorch_lora_weights.safetensors"  # the name diffusers' save_lora_weights writes
_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "transformer.", "base_model.model.")
_KOHYA_PREFIX = "lora_unet_"
# one file for both experts of a two-expert model: its keys say which expert they belong to
_EXPERT_PREFIXES = {"high_noise_model.": "high_noise", "low_noise_model.": "low_noise", "transformer_2.": "low_noise"}
# file key endings -> what the tensor is
_SUFFIXES = ((".lora_A.weight", "down"), (".lora_down.weight", "down"), (".lora_B.weight", "up"),
             (".lora_up.weight", "up"), (".lora_B.bias", "up_bias"), (".alpha", "alpha"),
             (".diff_b", "diff_b"), (".diff_m", "diff_m"), (".diff", "diff"))


@dataclass
class LoraEntry:
    """One adapter to merge: a file (or an in-memory state dict) and its strength."""
    source: object              # path to a .safetensors / .pt file or a directory holding one; or a dict
    scale: float = 1.0
    expert: Optional[str] = None
    metadata: Optional[dict] = None  # PEFT adapter config for an in-memory dict (keys as in the file)


@dataclass
class _Module:
    parts: dict = field(default_factory=dict)   # kind -> tensor
    keys: list = field(default_factory=list)    # file keys, for error messages
    files: dict = field(default_factory=dict)   # kind -> its file key


@dataclass
class Delta:
    """One update to one tensor: coeff * (up @ down), or coeff * diff (down None); formed where it is merged.

    `up` and `down` are as in the file: a pair's product has up's rows and down's trailing dims
    (a conv LoRA's down is [rank, in, *kernel]); `files` are the file keys it came from."""
    key: str
    coeff: float
    up: torch.Tensor
    down: Optional[torch.Tensor] = None
    files: tuple = ()

    @property
    def shape(self) -> tuple:
        return tuple(self.up.shape) if self.down is None else (self.up.shape[0], *self.down.shape[1:])

    def value(self, device) -> torch.Tensor:
        up = self.up.to(device=device, dtype=torch.float32)
        if self.down is None:
            return up * self.coeff
        product = up.flatten(1) @ self.down.flatten(1).to(device=device, dtype=torch.float32)
        return product.reshape(self.shape) * self.coeff


def select_loras(entries: Iterable, expert: Optional[str]) -> list:
    """Entries meant for `expert` (None: a one-DiT model, which takes only entries without `expert`)."""
    entries = list(entries)
    if expert is None:
        named = [e for e in entries if getattr(e, "expert", None) is not None]
        if named:
            raise ValueError(f"lora entries {[str(getattr(e, 'path', getattr(e, 'source', e))) for e in named]} "
                             f"name an expert ({named[0].expert!r}), but this model has a single DiT; the "
                             "expert key is for two-expert models (Wan2.2 A14B). Remove it")
        return entries
    return [e for e in entries if getattr(e, "expert", None) in (None, expert)]


def resolve_lora_file(path: str) -> str:
    if os.path.isdir(path):
        named = os.path.join(path, LORA_FILE)
        found = [named] if os.path.isfile(named) else sorted(
            os.path.join(path, f) for f in os.listdir(path) if f.endswith(".safetensors"))
        if len(found) != 1:
            raise ValueError(f"LoRA directory {path!r} holds {len(found)} .safetensors files "
                             f"({[os.path.basename(f) for f in found]}); name the file in lora.path")
        return found[0]
    if not os.path.isfile(path):
        raise ValueError(f"LoRA file not found: {path!r} (lora.path must be a .safetensors file, a .pt/.pth/.bin "
                         "state dict, or a directory with one .safetensors file)")
    return path


def read_lora_file(path: str) -> tuple[dict[str, torch.Tensor], Optional[dict]]:
    """(tensors, PEFT adapter metadata or None) of a LoRA file."""
    path = resolve_lora_file(path)
    if path.endswith(".safetensors"):
        try:
            with safe_open(path, framework="pt", device="cpu") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
            raw = meta.get("lora_adapter_metadata")
            return tensors, (json.loads(raw) if raw else None)
        except Exception as e:  # noqa: BLE001 - a truncated or foreign file is one user error
            raise ValueError(f"cannot read LoRA file {path!r} as safetensors: {e}") from None
    try:
        tensors = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the same user error
        raise ValueError(f"cannot read LoRA file {path!r} as safetensors or a torch state dict: {e}") from None
    if not isinstance(tensors, dict):
        raise ValueError(f"LoRA file {path!r} holds a {type(tensors).__name__}, not a state dict of tensors")
    return tensors, None


def lora_targets(model) -> dict[str, tuple[str, int, int]]:
    """Tensor key (official and diffusers names) -> (our parameter, first row, rows)."""
    targets = {}
    for name, p in model.named_parameters():
        for layout in ("official", "diffusers"):
            try:
                pieces = native_pieces(name, p.shape[0], layout)
            except KeyError:  # a tensor without a diffusers name is still reachable by its official one
                continue
            for key, start, rows in pieces:
                targets[key] = (name, start, rows)
    return targets


def _kohya_names(targets) -> dict[str, str]:
    """lora_unet_ module names (dots as underscores) -> dotted module names, from the model's own keys."""
    out = {}
    for key in targets:
        module = key.rsplit(".", 1)[0] if key.endswith((".weight", ".bias")) else key
        out[module.replace(".", "_")] = module
    return out


def _split_key(key: str, kohya: dict[str, str]) -> Optional[tuple[str, str]]:
    """(dotted module name, kind) of a file key, or None when it is no LoRA key we know."""
    for suffix, kind in _SUFFIXES:
        if key.endswith(suffix):
            module = key[: -len(suffix)]
            break
    else:
        return None
    if module.startswith(_KOHYA_PREFIX):
        return (kohya[module[len(_KOHYA_PREFIX):]], kind) if module[len(_KOHYA_PREFIX):] in kohya else None
    for prefix in _PREFIXES:
        if module.startswith(prefix):
            module = module[len(prefix):]
            break
    return module, kind


def _peft_alpha(metadata: Optional[dict], module: str, rank: int) -> float:
    """s = alpha / rank (or / sqrt(rank) with rsLoRA) from a PEFT config; 1 without one."""
    if not metadata:
        return 1.0
    meta = {k.removeprefix("transformer."): v for k, v in metadata.items()}
    if meta.get("use_dora"):
        raise ValueError("the LoRA's adapter config says use_dora=true; DoRA adapters cannot be merged as "
                         "plain LoRA (the result would be a different model)")
    alpha = meta.get("lora_alpha", rank)
    for pattern, value in (meta.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?{pattern}$", module):  # PEFT matches a pattern as a module-name suffix
            alpha = value
            break
    return alpha / (math.sqrt(rank) if meta.get("use_rslora") else rank)


def lora_deltas(tensors: dict[str, torch.Tensor], metadata: Optional[dict], targets, scale: float,
                source: str, expert: Optional[str] = None) -> list[Delta]:
    """The updates one LoRA file makes, already multiplied by `scale`, keyed by target tensor name.

    Keys under an expert prefix (high_noise_model., low_noise_model., transformer_2.) are used only
    when merging into that expert (`expert`); on a one-DiT model (expert None) they match nothing.
    """
    kohya = _kohya_names(targets)
    experts = dict(_EXPERT_PREFIXES)
    if any(k.startswith("transformer_2.") for k in tensors):  # then transformer. is the other expert's
        experts["transformer."] = "high_noise"
    modules: dict[str, _Module] = {}
    unknown = []
    for file_key, t in tensors.items():
        key = file_key
        if key.endswith(".dora_scale") or "lora_magnitude_vector" in key:
            raise ValueError(f"LoRA {source}: {key!r} is a DoRA tensor; DoRA adapters cannot be merged as plain "
                             "LoRA (the result would be a different model)")
        prefix = next((p for p in experts if key.startswith(p)), None)
        if prefix is not None and expert is not None:
            if experts[prefix] != expert:
                continue  # the other expert's part of the file
            key = key[len(prefix):]
        split = _split_key(key, kohya) if prefix is None or expert is not None else None
        if split is None:
            unknown.append(file_key)
            continue
        m = modules.setdefault(split[0], _Module())
        m.parts[split[1]] = t
        m.keys.append(file_key)
        m.files[split[1]] = file_key
    deltas = []
    for module, m in modules.items():
        parts = m.parts
        found = []
        if "down" in parts or "up" in parts:
            if "down" not in parts or "up" not in parts:
                unknown += m.keys  # half a pair cannot be merged
                continue
            down, up = parts["down"], parts["up"]
            rank = down.shape[0]
            if up.dim() < 2 or up.shape[1] != rank or any(n != 1 for n in up.shape[2:]):
                raise ValueError(f"LoRA {source}: {module} has down {tuple(down.shape)} and up {tuple(up.shape)}; "
                                 "their ranks differ")
            s = parts["alpha"].item() / rank if "alpha" in parts else _peft_alpha(metadata, module, rank)
            found.append(Delta(f"{module}.weight", scale * s, up, down, (m.files["down"], m.files["up"])))
            if "up_bias" in parts:
                found.append(Delta(f"{module}.bias", scale * s, parts["up_bias"], files=(m.files["up_bias"],)))
        elif "alpha" in parts or "up_bias" in parts:
            unknown += m.keys  # an alpha or a lora_B bias without its pair
            continue
        if "diff" in parts:
            weight = f"{module}.weight" if f"{module}.weight" in targets else module  # e.g. blocks.0.modulation
            found.append(Delta(weight, scale, parts["diff"], files=(m.files["diff"],)))
        if "diff_b" in parts:
            found.append(Delta(f"{module}.bias", scale, parts["diff_b"], files=(m.files["diff_b"],)))
        if "diff_m" in parts:  # LightX2V: blocks.0.diff_m -> blocks.0.modulation, head.diff_m -> head.modulation
            found.append(Delta(f"{module}.modulation", scale, parts["diff_m"], files=(m.files["diff_m"],)))
        if all(d.key in targets for d in found):
            deltas += found
        else:
            unknown += m.keys
    if unknown:
        shown = ", ".join(sorted(unknown)[:12]) + (f" ... and {len(unknown) - 12} more" if len(unknown) > 12 else "")
        raise ValueError(f"LoRA {source}: {len(unknown)} key(s) match no layer of this Wan DiT: {shown}. Keys must "
                         "name DiT layers in the official (blocks.0.self_attn.q), diffusers (blocks.0.attn1.to_q) "
                         "or kohya (lora_unet_blocks_0_self_attn_q) layout, as pairs of lora_A/lora_B "
                         "(lora_down/lora_up) weights, optionally with .alpha, .diff, .diff_b, .diff_m; the run would "
                         "silently miss part of the adapter" + (
                             ". Keys under high_noise_model., low_noise_model. or transformer_2. belong to an expert "
                             "of a two-expert model (Wan2.2 A14B)" if any(k.startswith(tuple(_EXPERT_PREFIXES))
                                                                         for k in unknown) else ""))
    return deltas


@torch.no_grad()
def merge_lora(model, entries: Sequence[LoraEntry], device: Optional[torch.device] = None,
               expert: Optional[str] = None, skip=None) -> list[dict]:
    """Add every entry's deltas to `model`'s weights (in place); a summary per entry.

    All deltas for one parameter are summed in fp32 and the sum is rounded once to the parameter's
    dtype. `device`: where the arithmetic runs (e.g. the GPU while the weights sit in host memory).
    `expert`: which expert of a two-expert model `model` is (None: a one-DiT model).
    `skip(name)` True: a parameter this process did not load (another supplies it, merged).
    """
    if not entries:
        return []
    targets = lora_targets(model)
    params = dict(model.named_parameters())
    by_param: dict[str, list[tuple[int, int, Delta]]] = {}
    summary = []
    for entry in entries:
        if isinstance(entry.source, dict):
            tensors, metadata, source = entry.source, entry.metadata, "(in-memory state dict)"
        else:
            source = str(entry.source)
            tensors, metadata = read_lora_file(source)
        deltas = lora_deltas(tensors, metadata, targets, float(entry.scale), source, expert)
        for delta in deltas:
            name, start, rows = targets[delta.key]
            _check_shape(delta, (rows, *params[name].shape[1:]), source)
            by_param.setdefault(name, []).append((start, rows, delta))
        summary.append({"path": source, "scale": float(entry.scale), "expert": entry.expert,
                        "tensors_updated": len(deltas)})
    for name, pieces in by_param.items():
        if skip is not None and skip(name):
            continue
        p = params[name]
        fp8 = owner_of(model, name)  # an fp8 layer: merge into its dequantized weight, then quantize again
        work = fp8.dequantized(torch.float32, device or p.device) if fp8 is not None else \
            p.detach().to(device=device or p.device, dtype=torch.float32, copy=True)
        for start, rows, delta in pieces:
            work.narrow(0, start, rows).add_(delta.value(work.device))
        if fp8 is not None:
            fp8.set_weight(work)  # fresh per-row scales
        else:
            p.copy_(work.to(p.dtype))
    return summary


def _check_shape(delta: Delta, want: tuple, source: str) -> None:
    """ValueError unless the update has exactly the target's shape: the same element count in another
    layout (a transposed difference, a flattened table) would merge as scrambled values."""
    if delta.shape == tuple(want):
        return
    what = " + ".join(delta.files) or delta.key
    hint = ("its transpose: the file stores it the other way round" if sorted(delta.shape) == sorted(want)
            and len(want) == 2 else "the adapter was trained for a different model size or layout")
    raise ValueError(f"LoRA {source}: {what} updates {delta.key} with shape {delta.shape}, but the model's tensor "
                     f"is {tuple(want)} ({hint}); nothing was merged")
