"""Where each component of a Wan2.1 model lives on disk, for both released layouts.

official (Wan-AI/Wan2.1-T2V-*):          diffusers (Wan-AI/Wan2.1-T2V-*-Diffusers):
  config.json                 DiT           model_index.json
  diffusion_pytorch_model*.safetensors      transformer/   DiT
  models_t5_umt5-xxl-enc-bf16.pth  UMT5     text_encoder/  UMT5
  google/umt5-xxl/            tokenizer     tokenizer/
  Wan2.1_VAE.pth              VAE           vae/
Wan2.2 A14B keeps two DiTs (experts): official high_noise_model/ + low_noise_model/, diffusers
transformer/ + transformer_2/ (named in model_index.json); `dit` is the high-noise one, `dit_2`
the low-noise one. Each component is looked up in either place (the embedded tiny model mixes them), and
`model.text_encoder_path` / `tokenizer_path` / `vae_path` override the lookup one by one.
Any of them may be a Hugging Face repo id instead of a directory (hub.py fetches it).

`weights=False` (the memory plan and the dry run) resolves the same paths from the config files
alone: a DiT is its config.json, a diffusers component its folder with config.json, and in the
official layout the UMT5 / VAE .pth files (which carry no config) are taken as named, unchecked.
"""
from __future__ import annotations

import glob
import os
from dataclasses import asdict, dataclass
from typing import Optional

from lightx2v_sp.jsonfile import read_json

T5_OFFICIAL = "models_t5_umt5-xxl-enc-bf16.pth"
VAE_OFFICIAL = "Wan2.1_VAE.pth"
TOKENIZER_OFFICIAL = os.path.join("google", "umt5-xxl")
TOKENIZER_FILES = ("tokenizer.json", "spiece.model", "tokenizer_config.json")
HIGH_NOISE_DIR, LOW_NOISE_DIR = "high_noise_model", "low_noise_model"


@dataclass
class ModelPaths:
    root: str
    dit: str
    dit_layout: str            # "official" | "diffusers"
    text_encoder: str
    tokenizer: str
    vae: str
    num_heads: int             # DiT attention heads (read from its config, for the layout check)
    dit_2: Optional[str] = None  # the low-noise expert of a two-expert (Wan2.2 A14B) model

    def as_dict(self) -> dict:
        return asdict(self)


def _has_weights(d: str) -> bool:
    return bool(glob.glob(os.path.join(d, "diffusion_pytorch_model*.safetensors")))


def _find_dit(root: str, problems: list[str], weights: bool = True) -> tuple[Optional[str], str, int]:
    """(dir, layout, num_heads) of the DiT under root (official at the top, diffusers in transformer/)."""
    top = read_json(os.path.join(root, "config.json"))
    if top is not None and "num_heads" in top and "dim" in top:
        if _has_weights(root) or not weights:
            return root, "official", int(top["num_heads"])
        problems.append(f"DiT weights diffusion_pytorch_model*.safetensors next to {root}/config.json")
        return None, "official", 0
    sub = os.path.join(root, "transformer")
    cfg = read_json(os.path.join(sub, "config.json"))
    if cfg is not None and "num_attention_heads" in cfg:
        if _has_weights(sub) or not weights:
            return sub, "diffusers", int(cfg["num_attention_heads"])
        problems.append(f"DiT weights diffusion_pytorch_model*.safetensors in {sub}")
        return None, "diffusers", 0
    high = os.path.join(root, HIGH_NOISE_DIR)
    cfg = read_json(os.path.join(high, "config.json"))
    if cfg is not None and "num_heads" in cfg:
        if _has_weights(high) or not weights:
            return high, "official", int(cfg["num_heads"])
        problems.append(f"DiT weights diffusion_pytorch_model*.safetensors in {high}")
        return None, "official", 0
    problems.append(f"a DiT: config.json + diffusion_pytorch_model.safetensors in {root} (official) "
                    f"or in {sub} (diffusers)")
    return None, "", 0


def _find_second_expert(root: str, dit: Optional[str], layout: str, problems: list[str],
                        weights: bool = True) -> Optional[str]:
    """The low-noise expert's directory when the checkpoint names one (None for one-DiT models)."""
    if dit is None:
        return None
    if layout == "official":
        if os.path.basename(dit) != HIGH_NOISE_DIR:
            return None
        low = os.path.join(root, LOW_NOISE_DIR)
    else:
        entry = (read_json(os.path.join(root, "model_index.json")) or {}).get("transformer_2")
        if not entry or entry[0] is None:
            return None
        low = os.path.join(root, "transformer_2")
    if (_has_weights(low) or not weights) and read_json(os.path.join(low, "config.json")) is not None:
        return low
    problems.append(f"the low-noise expert: config.json + diffusion_pytorch_model*.safetensors in {low}")
    return None


def _first(candidates: list[str], ok) -> Optional[str]:
    return next((c for c in candidates if ok(c)), None)


def _t5_ok(p: str) -> bool:
    if os.path.isfile(p):
        return True
    return os.path.isdir(p) and os.path.isfile(os.path.join(p, "config.json")) and bool(
        glob.glob(os.path.join(p, "model*.safetensors*")))


def _tokenizer_ok(p: str) -> bool:
    return os.path.isdir(p) and any(os.path.isfile(os.path.join(p, f)) for f in TOKENIZER_FILES)


def _config_ok(p: str) -> bool:
    """Without weights: a file (taken as named) or a folder with its config.json."""
    return os.path.isfile(p) or os.path.isfile(os.path.join(p, "config.json"))


def _vae_ok(p: str) -> bool:
    if os.path.isfile(p):
        return True
    return os.path.isdir(p) and os.path.isfile(os.path.join(p, "config.json")) and bool(
        glob.glob(os.path.join(p, "diffusion_pytorch_model*.safetensors")))


def resolve_model_paths(root: str, text_encoder_path: Optional[str] = None, tokenizer_path: Optional[str] = None,
                        vae_path: Optional[str] = None, weights: bool = True) -> ModelPaths:
    """Component paths under `root`; a ValueError naming everything missing and where it looked.

    `weights=False`: from the config files alone (see the module doc)."""
    root = os.path.abspath(os.path.expanduser(root))
    if not os.path.isdir(root):
        raise ValueError(f"model.path {root} is not a directory; point it at a downloaded Wan2.1-T2V "
                         "directory (official or -Diffusers layout) or a Hugging Face repo id such as "
                         "Wan-AI/Wan2.1-T2V-1.3B-Diffusers, or set model.path=null for the tiny model")
    problems: list[str] = []
    dit, layout, heads = _find_dit(root, problems, weights)
    dit_2 = _find_second_expert(root, dit, layout, problems, weights)

    def pick(override, candidates, ok, what):
        configs_only = not weights and ok is not _tokenizer_ok
        if configs_only:
            ok = _config_ok
        if override is not None:
            override = os.path.abspath(os.path.expanduser(override))
            if ok(override) or (configs_only and override.endswith(".pth")):  # a named file: read with the weights
                return override
            problems.append(f"{what} at {override} (set explicitly)")
            return None
        found = _first(candidates, ok)
        if found is None and configs_only and layout == "official":
            return candidates[0]  # the official .pth: named by the layout, it has no config to read
        if found is None:
            problems.append(f"{what} at {' or '.join(candidates)}")
        return found

    t5 = pick(text_encoder_path, [os.path.join(root, T5_OFFICIAL), os.path.join(root, "text_encoder")],
              _t5_ok, "the UMT5 text encoder")
    tok = pick(tokenizer_path, [os.path.join(root, TOKENIZER_OFFICIAL), os.path.join(root, "tokenizer")],
               _tokenizer_ok, "the tokenizer")
    vae = pick(vae_path, [os.path.join(root, VAE_OFFICIAL), os.path.join(root, "vae")], _vae_ok, "the VAE")
    if problems:
        raise ValueError(f"model directory {root} is incomplete; missing: " + "; ".join(problems)
                         + ". Nothing was loaded")
    return ModelPaths(root=root, dit=dit, dit_layout=layout, text_encoder=t5, tokenizer=tok, vae=vae,
                      num_heads=heads, dit_2=dit_2)


def model_paths_for(cfg_model, weights: bool = True) -> ModelPaths:
    """Paths for `cfg.model`: the given directory or repo id, or the embedded tiny model (built on first use).

    `weights=False`: a repo id fetches only its config files (hub.CONFIG_PATTERNS) and nothing needs
    weights (the memory plan, the dry run)."""
    from .hub import resolve_path, split_repo_id

    revision = getattr(cfg_model, "revision", None)
    if cfg_model.path is None:
        from lightx2v_sp.models.tiny import ensure_tiny_model

        root = ensure_tiny_model(variant=getattr(cfg_model, "tiny", "wan2.1-t2v"))
    else:  # a local directory, or a Hugging Face repo id fetched into the hub cache (hub.py)
        root = resolve_path(cfg_model.path, "model", revision, configs_only=not weights,
                            precheck=_refuse_before_download)
    main_repo = (split_repo_id(cfg_model.path) or (None,))[0] if cfg_model.path else None
    paths = resolve_model_paths(root, *(resolve_path(getattr(cfg_model, f"{what}_path"), what, revision, main_repo,
                                                     configs_only=not weights)
                                        for what in ("text_encoder", "tokenizer", "vae")), weights=weights)
    if weights and hasattr(cfg_model, "dit_path"):  # model.dit_path(_2): one per expert, headers fit (pipeline/quant.py)
        from .quant import check_dit_weights

        check_dit_weights(cfg_model, [d for d in (paths.dit, paths.dit_2) if d])
    return paths


def _refuse_before_download(root: str) -> None:
    """A Hub repo's configs (hub.resolve_repo fetches them first): refuse a checkpoint we cannot run
    before its weights (and the files no loader reads) are downloaded."""
    from .kind import unsupported_official

    reason = unsupported_official(root)
    if reason is not None:
        raise ValueError(reason)
