"""Denoise stage: load the DiT, lay it out (Ulysses + optional block offload), run the sampler.

Every rank holds the full latents and steps its own scheduler copy; the DiT splits the tokens
over the Ulysses group internally (parallelize_wan) and returns the full prediction, and CFG
ranks swap predictions once per step (guidance.py). Inputs to every step are therefore the same
bits on every rank, and so are the scheduler states.
"""
from __future__ import annotations

import torch
from tqdm import tqdm

from lightx2v_sp.attention.options import UlyssesOptions
from lightx2v_sp.models.wan import WanModel, parallelize_wan
from lightx2v_sp.offload import offload_dit_blocks

from .finite import check_latents
from .guidance import guided_prediction
from .loras import apply_loras
from .scheduler import make_scheduler


def load_dit(path: str, cfg, device: torch.device, dtype: torch.dtype) -> WanModel:
    """The DiT on `device`; on the CPU with offload.dit=block (the offload streams its blocks later).
    `lora:` entries are merged here, before install_parallel lays the weights out."""
    model = WanModel.from_pretrained(path, dtype=dtype, device="cpu" if cfg.offload.dit == "block" else device)
    model.lora_summary = apply_loras(model, cfg, device)
    return model


def install_parallel(model: WanModel, cfg, dims, device: torch.device):
    """Ulysses attention per `parallel.*`, then block offload (which must come after it)."""
    parallelize_wan(model, dims, options=UlyssesOptions.from_config(cfg))
    if cfg.offload.dit == "block":
        return offload_dit_blocks(model, device)
    if cfg.model.compile:
        for block in model.blocks:  # identical blocks share one compiled graph (parameters are inputs)
            block.compile(dynamic=False)
    return None


@torch.no_grad()
def denoise(model: WanModel, latents: torch.Tensor, contexts, cfg, dims, show_progress: bool,
            stats: dict | None = None) -> torch.Tensor:
    """Run `sample.steps` sampler steps from `latents` (fp32); returns the final latents (fp32).

    `stats` (optional) receives this rank's DiT forward count and the timesteps it ran.
    """
    s = cfg.sample
    scheduler = make_scheduler(s.scheduler, s.steps, s.shift, timesteps=s.timesteps)
    batch = latents.shape[0]
    forwards = 0

    def forward(context):
        nonlocal forwards
        forwards += 1
        return model(latents, timestep, context)

    num_steps = len(scheduler.timesteps)
    # `with`: an error or a signal mid-loop still ends the bar's line, so the error starts its own
    with tqdm(scheduler.timesteps, desc="denoise", unit="step", disable=not show_progress, leave=True) as bar:
        for step, t in enumerate(bar, start=1):
            timestep = t.to(device=latents.device, dtype=torch.float32).expand(batch)
            velocity = guided_prediction(forward, contexts.cond, contexts.uncond, s.guidance_scale, dims)
            latents = scheduler.step(velocity, t, latents, return_dict=False)[0]
            check_latents(latents, step, num_steps)
    if stats is not None:
        stats.update(dit_forwards=forwards, steps=num_steps,
                     timesteps=[round(float(t), 3) for t in scheduler.timesteps])
    return latents.float()
