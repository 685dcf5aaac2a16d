"""The sampler: diffusers' flow-matching schedulers configured as Wan2.1 uses them.

- unipc: UniPCMultistepScheduler in flow mode (flow_prediction, flow sigmas shifted by `shift`),
  the settings of the Wan2.1 -Diffusers scheduler_config.json (order 2, bh2, final sigma 0).
- euler: FlowMatchEulerDiscreteScheduler with the same `shift`.
- `timesteps` (an explicit step list, e.g. [1000, 750, 500, 250] for 4-step distilled Wan): sigma_i =
  t_i / 1000, shifted by `shift` like the default schedule and ended at sigma 0. With euler this is
  the sampler of LightX2V's step-distilled Wan models (x <- x + (sigma_next - sigma) * v).
Every rank builds its own copy; they step identically because their inputs are identical.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

SCHEDULERS = ("unipc", "euler")


def make_scheduler(name: str, steps: int, shift: float, num_train_timesteps: int = 1000,
                   timesteps: Sequence[float] | None = None):
    """A diffusers scheduler with `set_timesteps` already called (`steps` of them, or `timesteps`)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

    if steps < 1:
        raise ValueError(f"sample.steps = {steps} must be >= 1; there would be nothing to denoise")
    if shift <= 0:
        raise ValueError(f"sample.shift = {shift} must be > 0 (Wan2.1 uses 3.0 at 480p, 5.0 at 720p)")
    if name == "unipc":
        sched = UniPCMultistepScheduler(num_train_timesteps=num_train_timesteps, prediction_type="flow_prediction",
                                        use_flow_sigmas=True, flow_shift=shift, solver_order=2,
                                        solver_type="bh2", lower_order_final=True, final_sigmas_type="zero")
    elif name == "euler":
        sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=num_train_timesteps, shift=shift)
    else:
        raise ValueError(f"sample.scheduler = {name!r} is not one of {list(SCHEDULERS)}")
    if timesteps is None:
        sched.set_timesteps(steps, device="cpu")
    else:
        # both schedulers shift custom sigmas with their own shift, as they do the default ones
        sigmas = np.asarray(timesteps, dtype=np.float64) / num_train_timesteps  # UniPC needs an array, not a list
        sched.set_timesteps(sigmas=sigmas, device="cpu")
    return sched
