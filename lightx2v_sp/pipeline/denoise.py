"""Denoise stage: load the DiT, lay it out (Ulysses + optional block offload), run the sampler.

Every rank holds the full latents and steps its own scheduler copy; the DiT splits the tokens
over the Ulysses group internally (parallelize_wan) and returns the full prediction, and CFG
ranks swap predictions once per step (guidance.py). Inputs to every step are therefore the same
bits on every rank, and so are the scheduler states.
"""
from __future__ import annotations

import torch
from tqdm import tqdm

from lightx2v_sp.models.wan import WanModel, parallelize_wan
from lightx2v_sp.models.wan.lora import LoraEntry, merge_lora, resolve_lora_file, select_loras
from lightx2v_sp.offload import offload_dit_blocks

from .guidance import guided_prediction
from .scheduler import make_scheduler


def load_dit(path: str, cfg, device: torch.device, dtype: torch.dtype, expert: str | None = None) -> WanModel:
    """The DiT on `device`; on the CPU with offload.dit=block (the offload streams its blocks later).

    `cfg.lora` entries (those for `expert` on a two-expert model) are merged here, before
    install_parallel: block offload pins and streams the merged weights.
    """
    model = WanModel.from_pretrained(path, dtype=dtype, device="cpu" if cfg.offload.dit == "block" else device)
    entries = [LoraEntry(lora_path(e.path, cfg), e.scale, e.expert) for e in select_loras(cfg.lora, expert)]
    model.lora_summary = merge_lora(model, entries, device=device)
    return model


def check_loras(cfg) -> None:
    """Preflight: every lora.path names a readable file (the keys are checked when they are merged)."""
    for entry in cfg.lora:
        resolve_lora_file(lora_path(entry.path, cfg))


def lora_path(path: str, cfg) -> str:
    """`tiny` names the embedded tiny model's LoRA (built on first use); anything else is a path."""
    if path != "tiny":
        return path
    if cfg.model.path is not None:
        raise ValueError(f"lora path 'tiny' is the embedded tiny model's LoRA, but model.path = {cfg.model.path!r}; "
                         "it only fits the tiny model (model.path: null)")
    from lightx2v_sp.models.tiny import ensure_tiny_lora
    return ensure_tiny_lora()


def install_parallel(model: WanModel, cfg, dims, device: torch.device):
    """Ulysses attention per `parallel.*`, then block offload (which must come after it)."""
    p = cfg.parallel
    parallelize_wan(model, dims, a2a=p.a2a, fuse_qkv=p.fuse_qkv, comm_dtype=p.comm_dtype,
                    backend=cfg.attention.backend)
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

    for t in tqdm(scheduler.timesteps, desc="denoise", unit="step", disable=not show_progress, leave=True):
        timestep = t.to(device=latents.device, dtype=torch.float32).expand(batch)
        velocity = guided_prediction(forward, contexts.cond, contexts.uncond, s.guidance_scale, dims)
        latents = scheduler.step(velocity, t, latents, return_dict=False)[0]
    if stats is not None:
        stats.update(dit_forwards=forwards, steps=len(scheduler.timesteps),
                     timesteps=[round(float(t), 3) for t in scheduler.timesteps])
    return latents.float()
