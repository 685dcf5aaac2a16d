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

    `lora:` entries are merged here, before install_parallel lays the weights out. With
    offload.share_host, ranks other than their node's local rank 0 do not read the blocks at
    all: local rank 0's shared host copy (with the LoRAs merged) supplies them
    (offload/shared_host.py), so the node reads and holds the 14B blocks once.
    `model.blocks_loaded` tells install_parallel which case it is.
    """
    if cfg.offload.dit != "block":
        model = WanModel.from_pretrained(path, dtype=dtype, device=device)
        model.lora_summary = apply_loras(model, cfg, device)
        return model
    from_peer = _blocks_from_local_rank0(cfg, device, dtype)
    model = WanModel.from_pretrained(path, dtype=dtype, device="cpu",
                                     skip=(lambda name: name.startswith("blocks.")) if from_peer else None)
    model.blocks_loaded = not from_peer
    # a rank that skipped the blocks merges only what it holds; local rank 0 merges the shared blocks
    model.lora_summary = apply_loras(model, cfg, device, skip_blocks=from_peer)
    return model


def _blocks_from_local_rank0(cfg, device: torch.device, dtype: torch.dtype) -> bool:
    from lightx2v_sp.offload.shared_host import _shm_free_bytes, local_layout
    from lightx2v_sp.plan import dit_numel, model_shapes

    local_rank, local_world = local_layout()
    if not (cfg.offload.share_host and local_world > 1 and local_rank != 0 and device.type == "cuda"
            and torch.cuda.is_available()):
        return False
    # NodeSharedHost falls back to private copies when /dev/shm is too small; then this rank needs its own
    needed = dit_numel(model_shapes(cfg.model).dit)["blocks"] * torch.empty(0, dtype=dtype).element_size()
    return _shm_free_bytes() >= needed


def install_parallel(model: WanModel, cfg, dims, device: torch.device):
    """Ulysses attention per `parallel.*`, then block offload (which must come after it)."""
    parallelize_wan(model, dims, options=UlyssesOptions.from_config(cfg))
    if cfg.offload.dit == "block":
        return offload_dit_blocks(model, device, share_host=cfg.offload.share_host,
                                  weights_loaded=getattr(model, "blocks_loaded", True))
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
