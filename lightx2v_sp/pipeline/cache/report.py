"""The run summary's `cache` section, and the ratios file of a calibration run (rank 0, at the end).

Every rank records its own decisions (policy.StepCache.summary); the runner gathers them with the
other per-rank numbers. The section holds one record per branch (the ranks of a branch's group must
agree, and `ranks_agree` says whether they did), the forwards that ran the blocks and those that
reused a residual.
"""
from __future__ import annotations

from typing import Optional

from .ratios import write_ratios
from .settings import CacheSettings


def cache_summary(settings: Optional[CacheSettings], per_rank: list, cfg, about_model: dict) -> dict:
    """The summary section from every rank's StepCache.summary() (None entries: no cache)."""
    if settings is None:
        return {"method": "none"}
    branches: dict = {}
    agree = True
    for record in per_rank:
        for name, entry in record["branches"].items():
            first = branches.setdefault(name, entry)
            same = {k: first[k] for k in ("computed", "skipped")} == {k: entry[k] for k in ("computed", "skipped")}
            agree = agree and same
    computed = sum(len(b["computed"]) for b in branches.values())
    skipped = sum(len(b["skipped"]) for b in branches.values())
    out = {**settings.as_dict(), "branches": branches, "ranks_agree": agree,
           "forwards_computed": computed, "forwards_skipped": skipped,
           "expert_switches": per_rank[0]["expert_switches"],
           "note": "per branch: the 0-based steps whose DiT blocks ran ('computed') or reused the branch's last "
                   "residual ('skipped'), and the value each decision compared with the threshold; forwards "
                   "count both branches once (not per rank)"}
    if settings.calibrate:
        out["ratios_written"] = _write_calibration(settings, branches, cfg, about_model)
    return out


def _write_calibration(settings: CacheSettings, branches: dict, cfg, about_model: dict) -> str:
    def per_step(name: str):
        if name not in branches:
            return None
        measured = {int(k): v for k, v in branches[name]["calibration"].items()}
        return [measured.get(i, 1.0) for i in range(settings.steps)]

    s = cfg.sample
    about = {"note": "MagCache per-step magnitude ratios: mean over tokens of ||r_i|| / ||r_{i-1}||, r = the DiT "
                     "blocks' output minus their input; 1.0 where there is no previous step",
             "model": about_model,
             "sample": {"steps": s.steps, "scheduler": s.scheduler, "shift": s.shift, "timesteps": s.timesteps,
                        "guidance_scale": s.guidance_scale, "height": s.height, "width": s.width,
                        "num_frames": s.num_frames}}
    write_ratios(settings.ratios_path, per_step("cond"), per_step("uncond"), settings.steps, about)
    return settings.ratios_path
