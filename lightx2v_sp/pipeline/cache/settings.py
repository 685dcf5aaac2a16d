"""`cache:` config + the model -> the settings one run caches with, checked before anything loads.

The published constants (published.py) are keyed by model: the kind comes from pipeline/kind.py, the
size from the DiT's config.json (dim 1536 = 1.3B, 5120 = 14B). Wan2.1 I2V-14B has one set for the 480P
and one for the 720P checkpoint (same shapes, different weights): a "480p"/"720p" in model.path picks
one, else the video's area does (up to 832 x 480 = 480P). Models without published values (Wan2.2,
TI2V, the tiny test models) take `cache.coefficients` (TeaCache) or a `cache.ratios` file (MagCache,
written by a `cache.calibrate` run), or stop here with one line saying which models have them.
"""
from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass
from typing import Optional

from lightx2v_sp.config import uses_cfg
from lightx2v_sp.distributed.groups import job_size_rank
from lightx2v_sp.jsonfile import read_json

from . import published
from .ratios import check_ratios_target, interpolate, read_ratios

METHODS = ("none", "teacache", "magcache", "first_block")
# Below this many steps a step changes the latents too much for a reused residual (a 4-step distilled
# schedule moves a quarter of the way per step); the published values are fit to 40-50 steps.
MIN_STEPS = 8
FIRST_BLOCK_ALWAYS = (1, 1)  # steps computed at the start and at the end (the first has nothing to compare)


@dataclass
class CacheSettings:
    method: str                        # teacache | magcache | first_block
    model: Optional[str]               # published key (published.py) or None
    steps: int
    threshold: float
    start_steps: int                   # always computed at the start ...
    end_steps: int                     # ... and at the end
    max_skips: Optional[int]           # consecutive skips per branch; None = no cap
    teacache_input: str = "temb"       # temb (default mode) | e0 (use_ret_steps mode)
    coefficients: Optional[list] = None        # TeaCache rescale polynomial, highest power first
    ratios: Optional[dict] = None              # MagCache {"cond": [steps], "uncond": [steps] or None}
    calibrate: bool = False
    ratios_path: Optional[str] = None          # read (magcache) or written (calibrate)
    source: str = ""

    def as_dict(self) -> dict:
        d = asdict(self)
        d.pop("ratios")  # per-step numbers: in the ratios file / published.py, not every summary
        return d


def model_key(kind_name: str, dim: int, model_path: Optional[str], height: int, width: int) -> Optional[str]:
    """The published.py key of this model, or None."""
    size = {1536: "1.3b", 5120: "14b"}.get(dim)
    if kind_name == "wan2.1-t2v" and size:
        return f"wan2.1-t2v-{size}"
    if kind_name == "wan2.1-i2v" and size == "14b":
        name = os.path.basename(os.path.normpath(model_path or "")).lower()
        for res in ("480p", "720p"):
            if res in name:
                return f"wan2.1-i2v-14b-{res}"
        return "wan2.1-i2v-14b-480p" if height * width <= 832 * 480 else "wan2.1-i2v-14b-720p"
    return None


def dit_dim(dit_dir: str) -> int:
    """The DiT's width from its config.json (official `dim`, or diffusers heads x head dim)."""
    cfg = read_json(os.path.join(dit_dir, "config.json")) or {}
    if "dim" in cfg:
        return int(cfg["dim"])
    return int(cfg.get("num_attention_heads", 0)) * int(cfg.get("attention_head_dim", 0))


def _published_models(table: dict) -> str:
    return ", ".join(table)


def _check_numbers(c, s) -> None:
    for key, value, minimum in [("cache.start_steps", c.start_steps, 0), ("cache.end_steps", c.end_steps, 0),
                                ("cache.max_skips", c.max_skips, 1)]:
        if value is not None and value < minimum:
            raise ValueError(f"config key '{key}' = {value} must be >= {minimum}")
    if c.threshold is not None and (not math.isfinite(c.threshold) or c.threshold < 0):
        raise ValueError(f"cache.threshold = {c.threshold} must be a number >= 0 (0 = never skip); a negative one "
                         "could never be reached")
    if s.steps < MIN_STEPS:
        raise ValueError(f"cache.method={c.method} with a {s.steps}-step schedule: caching reuses the last step's "
                         f"residual, which needs steps that change the latents little (>= {MIN_STEPS} steps; the "
                         "published values are fit to 40-50); a step-distilled schedule has no step to spare. "
                         "Set cache.method=none")


def resolve_cache(cfg, kind_name: str, dim: int, model_path: Optional[str] = None) -> Optional[CacheSettings]:
    """The run's cache settings (None for method none); ValueError on any unusable combination."""
    c, s = cfg.cache, cfg.sample
    if c.method not in METHODS:
        raise ValueError(f"cache.method = {c.method!r} is not one of {list(METHODS)}")
    if c.method == "none":
        if c.calibrate:
            raise ValueError("cache.calibrate=true measures MagCache's ratios: set cache.method=magcache as well")
        return None
    _check_numbers(c, s)
    if c.coefficients is not None and c.method != "teacache":
        raise ValueError(f"cache.coefficients are TeaCache's; cache.method={c.method} would ignore them")
    if c.teacache_ret_steps and c.method != "teacache":
        raise ValueError(f"cache.teacache_ret_steps is a TeaCache mode; cache.method={c.method} would ignore it")
    if c.calibrate and c.method != "magcache":
        raise ValueError(f"cache.calibrate=true measures MagCache's ratios; cache.method={c.method} has none")
    key = model_key(kind_name, dim, model_path, s.height, s.width)
    if c.method == "teacache":
        settings = _teacache(c, key, kind_name, dim)
    elif c.method == "magcache":
        settings = _magcache(c, s, key, kind_name, dim)
    else:
        if c.ratios is not None:
            raise ValueError("cache.ratios is a MagCache file; cache.method=first_block would ignore it")
        start, end = FIRST_BLOCK_ALWAYS
        settings = CacheSettings("first_block", key, s.steps, published.FIRST_BLOCK_THRESHOLD, start, end, None,
                                 source=published.FIRST_BLOCK_SOURCE)
    settings.steps = s.steps
    if c.threshold is not None:
        settings.threshold = float(c.threshold)
    for name in ("start_steps", "end_steps", "max_skips"):
        if getattr(c, name) is not None:
            setattr(settings, name, getattr(c, name))
    if not settings.calibrate and settings.start_steps + settings.end_steps >= s.steps:
        raise ValueError(f"cache.start_steps={settings.start_steps} + cache.end_steps={settings.end_steps} always "
                         f"computed cover all {s.steps} steps: nothing could be skipped; lower them or set "
                         "cache.method=none")
    return settings


def _teacache(c, key, kind_name: str, dim: int) -> CacheSettings:
    mode = "ret_steps" if c.teacache_ret_steps else "default"
    if c.ratios is not None:
        raise ValueError("cache.ratios is a MagCache file; cache.method=teacache would ignore it (TeaCache takes "
                         "cache.coefficients)")
    start, end = published.TEACACHE_ALWAYS[mode]
    if c.coefficients is not None:
        coeffs = [float(v) for v in c.coefficients]
        if not coeffs or not all(math.isfinite(v) for v in coeffs):
            raise ValueError(f"cache.coefficients = {c.coefficients} must be a non-empty list of finite numbers "
                             "(the rescale polynomial, highest power first)")
        threshold = published.TEACACHE_THRESHOLDS.get(key, {}).get(mode)
        if threshold is None and c.threshold is None:
            raise ValueError("cache.coefficients for a model without published TeaCache values need "
                             "cache.threshold as well (nothing published to default to)")
        return CacheSettings("teacache", key, 0, threshold or 0.0, start, end, None,
                             "e0" if mode == "ret_steps" else "temb", coeffs, source="cache.coefficients")
    if key is None:
        raise ValueError(f"cache.method=teacache has published coefficients for "
                         f"{_published_models(published.TEACACHE_COEFFICIENTS)} only; this model is {kind_name} "
                         f"(dim {dim}): give its polynomial as cache.coefficients=[...] or use "
                         "cache.method=first_block (no coefficients needed)")
    return CacheSettings("teacache", key, 0, published.TEACACHE_THRESHOLDS[key][mode], start, end, None,
                         "e0" if mode == "ret_steps" else "temb", published.TEACACHE_COEFFICIENTS[key][mode],
                         source=f"{published.TEACACHE_SOURCE} ({key}, {mode} mode)")


def _magcache(c, s, key, kind_name: str, dim: int) -> CacheSettings:
    defaults = published.MAGCACHE_SETTINGS.get(key, published.MAGCACHE_DEFAULTS)
    start = int(round(defaults["retention"] * s.steps))
    settings = CacheSettings("magcache", key, s.steps, defaults["threshold"], start, 0, defaults["max_skips"])
    if c.calibrate:
        if c.ratios is None:
            raise ValueError("cache.calibrate=true writes the measured ratios to cache.ratios; give a path "
                             "(cache.ratios=ratios.json)")
        path = os.path.abspath(os.path.expanduser(c.ratios))
        if job_size_rank()[1] == 0:  # the rank that writes it (at the end of the run)
            check_ratios_target(path)
        settings.calibrate, settings.ratios_path = True, path
        settings.source = "calibration run (computes every step)"
        return settings
    if c.ratios is not None:
        settings.ratios_path = os.path.abspath(os.path.expanduser(c.ratios))
        settings.ratios = read_ratios(settings.ratios_path, s.steps, need_uncond=uses_cfg(s))
        settings.source = settings.ratios_path
        return settings
    if key is None:
        raise ValueError(f"cache.method=magcache has published ratios for "
                         f"{_published_models(published.MAGCACHE_RATIOS)} only; this model is {kind_name} "
                         f"(dim {dim}): measure them once with cache.calibrate=true cache.ratios=FILE, then run "
                         "with cache.ratios=FILE")
    table = published.MAGCACHE_RATIOS[key]
    settings.ratios = {b: interpolate(table[b], s.steps) for b in ("cond", "uncond")}
    calibrated = len(table["cond"])
    settings.source = (f"{published.MAGCACHE_SOURCE} ({key}, calibrated for {calibrated} steps"
                       + ("" if calibrated == s.steps else f", nearest-step interpolated to {s.steps}") + ")")
    return settings
