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
from lightx2v_sp.offload import offload_dit_blocks

from .guidance import guided_prediction
from .scheduler import make_scheduler


def load_dit(path: str, cfg, device: torch.device, dtype: torch.dtype) -> WanModel:
    """The DiT on `device`; on the CPU with offload.dit=block (the offload streams its blocks later).

    With offload.share_host, ranks other than their node's local rank 0 do not read the blocks at
    all: local rank 0's shared host copy supplies them (offload/shared_host.py), so the node reads
    and holds the 14B blocks once. `model.blocks_loaded` tells install_parallel which case it is.
    """
    if cfg.offload.dit != "block":
        return WanModel.from_pretrained(path, dtype=dtype, device=device)
    from_peer = _blocks_from_local_rank0(cfg, device, dtype)
    model = WanModel.from_pretrained(path, dtype=dtype, device="cpu",
                                     skip=(lambda name: name.startswith("blocks.")) if from_peer else None)
    model.blocks_loaded = not from_peer
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
    p = cfg.parallel
    parallelize_wan(model, dims, a2a=p.a2a, fuse_qkv=p.fuse_qkv, comm_dtype=p.comm_dtype,
                    backend=cfg.attention.backend)
    if cfg.offload.dit == "block":
        return offload_dit_blocks(model, device, share_host=cfg.offload.share_host,
                                  weights_loaded=getattr(model, "blocks_loaded", True))
    if cfg.model.compile:
        for block in model.blocks:  # identical blocks share one compiled graph (parameters are inputs)
            block.compile(dynamic=False)
    return None


@torch.no_grad()
def denoise(model: WanModel, latents: torch.Tensor, contexts, cfg, dims, show_progress: bool) -> torch.Tensor:
    """Run `sample.steps` sampler steps from `latents` (fp32); returns the final latents (fp32)."""
    s = cfg.sample
    scheduler = make_scheduler(s.scheduler, s.steps, s.shift)
    batch = latents.shape[0]
    for t in tqdm(scheduler.timesteps, desc="denoise", unit="step", disable=not show_progress, leave=True):
        timestep = t.to(device=latents.device, dtype=torch.float32).expand(batch)
        velocity = guided_prediction(lambda context: model(latents, timestep, context),
                                     contexts.cond, contexts.uncond, s.guidance_scale, dims)
        latents = scheduler.step(velocity, t, latents, return_dict=False)[0]
    return latents.float()
