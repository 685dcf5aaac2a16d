"""One job of a load-once run (the server, `generate --prompts`): its settings and their checks.

A job is the loaded config with its own prompt, negative prompt, seed, image, output and the sample
settings that leave the loaded models alone (steps, guidance, size, frames). Its config is checked
by the same code as a config (`config.validate`, `kind.check_inputs`, the output and image checks
of the preflight), so a request gets the one-line message `generate` would print for the same
values. Fields arrive as JSON values (a prompt file, a JSON request) or as text (a multipart form);
anything else (a key the job cannot set, a wrong type) is a ValueError naming the field.
"""
from __future__ import annotations

import copy
import difflib
import math
import re
from typing import Any, Optional

from lightx2v_sp.config import validate
from lightx2v_sp.distributed.groups import job_size_rank

from .checks import AgreedError
from .image import open_image
from .kind import check_inputs
from .output import check_writable

# job field -> (type, config key it sets)
FIELDS: dict[str, tuple[type, str]] = {
    "prompt": (str, "prompt"),
    "negative_prompt": (str, "negative_prompt"),
    "seed": (int, "seed"),
    "image": (str, "image"),
    "output": (str, "output.path"),
    "steps": (int, "sample.steps"),
    "guidance_scale": (float, "sample.guidance_scale"),
    "guidance_scale_2": (float, "sample.guidance_scale_2"),
    "height": (int, "sample.height"),
    "width": (int, "sample.width"),
    "num_frames": (int, "sample.num_frames"),
}
# besides FIELDS: size "WIDTHxHEIGHT" and seconds (num_frames = seconds x fps + 1), as OpenAI's API has them
DERIVED = ("size", "seconds")
_SIZE = re.compile(r"^([1-9][0-9]{0,5})x([1-9][0-9]{0,5})$")


class JobCancelled(AgreedError):
    """A job stopped on every rank at the same step (a cancel request, or the server stopping)."""


def _typed(name: str, kind: type, value: Any, where: str, text: bool):
    """`value` as `kind`; from a form (`text`) strings are parsed, from JSON the type must match."""
    if text and isinstance(value, str) and kind is not str:
        try:
            value = kind(value.strip())
        except ValueError:
            raise ValueError(f"{where}: {name} = {value!r} is not {'an integer' if kind is int else 'a number'}") \
                from None
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or isinstance(value, bool):
        want = {str: "a string", int: "an integer", float: "a number"}[kind]
        raise ValueError(f"{where}: {name} must be {want}, got {type(value).__name__} {value!r}")
    if kind is float and not math.isfinite(value):
        raise ValueError(f"{where}: {name} = {value} is not a finite number")
    return value


def job_overrides(item: dict, where: str, allowed: tuple[str, ...], fps: int, max_prompt_chars: int,
                  text: bool = False) -> dict[str, Any]:
    """{config key: value} of one job's fields (`allowed` of FIELDS + DERIVED); ValueError naming the field."""
    if not isinstance(item, dict):
        raise ValueError(f"{where}: a job is a JSON object such as {{\"prompt\": \"a cat\"}}, got "
                         f"{type(item).__name__}")
    out: dict[str, Any] = {}
    for name, value in item.items():
        if name not in allowed:
            best = difflib.get_close_matches(str(name), allowed, n=1, cutoff=0.6)
            hint = f" (did you mean {best[0]}?)" if best else ""
            raise ValueError(f"{where}: unknown field {name!r}{hint}; a job takes {', '.join(allowed)}")
        if name == "size":
            m = _SIZE.match(value) if isinstance(value, str) else None
            if m is None:
                raise ValueError(f"{where}: size = {value!r} must be WIDTHxHEIGHT in pixels, e.g. \"832x480\"")
            out["sample.width"], out["sample.height"] = int(m.group(1)), int(m.group(2))
        elif name == "seconds":  # OpenAI sends it as a string: "4"
            seconds = _typed(name, float, value, where, text=isinstance(value, str))
            if not 0 < seconds <= 3600:
                raise ValueError(f"{where}: seconds = {value!r} must be > 0 and at most 3600")
            out["sample.num_frames"] = round(seconds * fps) + 1  # + 1: the first frame is t = 0
        else:
            kind, key = FIELDS[name]
            out[key] = _typed(name, kind, value, where, text)
            if kind is str and name in ("prompt", "negative_prompt") and len(out[key]) > max_prompt_chars:
                raise ValueError(f"{where}: {name} has {len(out[key])} characters; serve.max_prompt_chars = "
                                 f"{max_prompt_chars}")
    if "size" in item and ("width" in item or "height" in item):
        raise ValueError(f"{where}: give size or width/height, not both")
    if "seconds" in item and "num_frames" in item:
        raise ValueError(f"{where}: give seconds or num_frames, not both")
    return out


def job_config(base, overrides: dict[str, Any]):
    """A copy of the loaded config `base` with `overrides` ({config key: value}), validated as a config."""
    cfg = copy.deepcopy(base)
    for key, value in overrides.items():
        *parents, leaf = key.split(".")
        obj = cfg
        for part in parents:
            obj = getattr(obj, part)
        setattr(obj, leaf, value)
    return validate(cfg)


def check_size(base, cfg) -> None:
    """A job's video has at most as many pixels per frame and frames as the loaded config's: that is the
    size the memory plan was checked for before loading (plan.check_before_loading)."""
    b, s = base.sample, cfg.sample
    if s.height * s.width > b.height * b.width or s.num_frames > b.num_frames:
        raise ValueError(f"a {s.width}x{s.height} video of {s.num_frames} frames is larger than the "
                         f"{b.width}x{b.height}, {b.num_frames} frames this process was started for (the size its "
                         "memory plan was checked at); start it with sample.width/height/num_frames set to the "
                         "largest video it should make")


def check_job(base, kind, cfg) -> Optional[str]:
    """What the preflight checks for one run, for one job of the models loaded with `base` (every rank;
    run it inside `agreed`): inputs and size that fit the model; on rank 0 the output (the checked
    absolute path is returned) and the image."""
    check_inputs(kind, cfg)
    check_size(base, cfg)
    if job_size_rank()[1] != 0:
        return None
    out = check_writable(cfg.output.path)
    if cfg.image is not None:
        open_image(cfg.image)
    return out
