"""MagCache ratio files: what a `cache.calibrate` run writes and a `cache.ratios` run reads.

One JSON object: {"lightx2v_sp_magcache_ratios": 1, "steps": N, "cond": [N floats], "uncond": [N floats]
or null (a run without guidance), "sample": {...}, "model": {...}}. Entry i is the mean over all tokens
of ||r_i|| / ||r_{i-1}|| for the branch's blocks residual r (1.0 where there is no previous step: step 0
and an expert's first step). A file is read for exactly the step count it was measured at; published
ratios (published.py) are the exception, interpolated to any count as MagCache does. Written atomically,
and only over a file that is absent or one of ours (the marker).
"""
from __future__ import annotations

import math
import os

from lightx2v_sp.jsonfile import read_json

from ..output import check_parent_writable, write_json

MARKER = "lightx2v_sp_magcache_ratios"


def interpolate(values: list, steps: int) -> list:
    """Nearest entry of a per-step list measured at another step count (MagCache's nearest_interp)."""
    n = len(values)
    if steps == n:
        return list(values)
    if steps == 1:
        return [values[-1]]
    scale = (n - 1) / (steps - 1)
    return [values[int(round(i * scale))] for i in range(steps)]


def _numbers(values, path: str, name: str, steps: int) -> list:
    if not isinstance(values, list) or len(values) != steps:
        size = len(values) if isinstance(values, list) else type(values).__name__
        raise ValueError(f"cache.ratios {path}: '{name}' holds {size} ratios but the file says steps={steps}; "
                         "the file is damaged: calibrate again")
    if not all(isinstance(v, (int, float)) and math.isfinite(v) and v > 0 for v in values):
        raise ValueError(f"cache.ratios {path}: '{name}' must hold positive finite numbers (norm ratios)")
    return [float(v) for v in values]


def read_ratios(path: str, steps: int, need_uncond: bool) -> dict:
    """{"cond": [steps], "uncond": [steps] or None} from a ratios file measured at `steps` steps."""
    if not os.path.isfile(path):
        raise ValueError(f"cache.ratios = {path} does not exist; write it first with a calibration run "
                         f"(cache.method=magcache cache.calibrate=true cache.ratios={path})")
    data = read_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("cond"), list):
        raise ValueError(f"cache.ratios = {path} is not a MagCache ratios file (a JSON object with per-step "
                         "'cond' ratios, as cache.calibrate=true writes)")
    measured = data.get("steps", len(data["cond"]))
    if measured != steps:
        raise ValueError(f"cache.ratios = {path} was measured for {measured} steps; this run has sample.steps="
                         f"{steps}: a ratio belongs to one step of one schedule. Run with sample.steps={measured} "
                         f"or calibrate again with sample.steps={steps}")
    out = {"cond": _numbers(data["cond"], path, "cond", steps), "uncond": None}
    if data.get("uncond") is not None:
        out["uncond"] = _numbers(data["uncond"], path, "uncond", steps)
    elif need_uncond:
        raise ValueError(f"cache.ratios = {path} has no 'uncond' ratios (it was measured without guidance); "
                         "this run uses classifier-free guidance: calibrate again with the same guidance_scale")
    return out


def check_ratios_target(path: str) -> str:
    """The absolute path a calibration may write to (ValueError: unwritable, or not ours to replace)."""
    path = os.path.abspath(os.path.expanduser(path))
    if os.path.isdir(path):
        raise ValueError(f"cache.ratios = {path} is a directory; give a file name such as {path}/ratios.json")
    data = read_json(path) if os.path.isfile(path) else None
    if os.path.lexists(path) and not (isinstance(data, dict) and data.get(MARKER) == 1):
        raise ValueError(f"cache.ratios = {path} exists and is not a ratios file lightx2v_sp wrote; the "
                         "calibration would replace it: remove it or choose another path")
    check_parent_writable(path, "cache.ratios", "the calibration could not be saved, so the run was not started")
    return path


def write_ratios(path: str, cond: list, uncond, steps: int, about: dict) -> None:
    """The ratios file at `path`, atomically (rank 0, at the end of a calibration run)."""
    check_ratios_target(path)  # again: a file may have appeared there during the run
    write_json({MARKER: 1, "steps": steps, "cond": [round(v, 6) for v in cond],
                "uncond": None if uncond is None else [round(v, 6) for v in uncond], **about}, path)
