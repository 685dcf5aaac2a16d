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

from .experts import Experts
from .guidance import guided_prediction
from .scheduler import make_scheduler


def load_dit(path: str, cfg, device: torch.device, dtype: torch.dtype) -> WanModel:
    """One DiT (of one or two experts) on `device`; on the CPU with offload.dit=block or swap (the
    offload places it later)."""
    on_host = cfg.offload.dit in ("block", "swap")
    return WanModel.from_pretrained(path, dtype=dtype, device="cpu" if on_host else device)


def install_parallel(model: WanModel, cfg, dims, device: torch.device, transport=None):
    """Ulysses attention per `parallel.*`, then block offload (which must come after it); the block
    offload handle or None. offload.dit=swap is placed by experts.install_experts."""
    p = cfg.parallel
    parallelize_wan(model, dims, a2a=p.a2a, fuse_qkv=p.fuse_qkv, comm_dtype=p.comm_dtype,
                    backend=cfg.attention.backend)
    if cfg.offload.dit == "block":
        return offload_dit_blocks(model, device, transport=transport)
    if cfg.offload.dit == "swap":
        return None
    if cfg.model.compile:
        for block in model.blocks:  # identical blocks share one compiled graph (parameters are inputs)
            block.compile(dynamic=False)
    return None


@torch.no_grad()
def denoise(model: "WanModel | Experts", latents: torch.Tensor, contexts, cfg, dims, show_progress: bool,
            condition: torch.Tensor | None = None, image_context: torch.Tensor | None = None,
            first_frame: torch.Tensor | None = None) -> torch.Tensor:
    """Run `sample.steps` sampler steps from `latents` (fp32); returns the final latents (fp32).

    `model` is one DiT or the `Experts` of a two-expert model (which one runs, and its guidance
    scale, depends on the timestep). `condition` [B, 4 + z, F, H, W] (I2V: mask + image latents)
    is concatenated after the latents on the channel axis at every step; `image_context`
    [B, L, width] (Wan2.1 I2V: CLIP tokens) goes to the DiT's image branch, the same for both passes.
    `first_frame` [B, z, 1, H, W] (Wan2.2 TI2V with an image) replaces the first latent frame of every
    DiT input and of the result, and its tokens get timestep 0 (the others t), as diffusers'
    expand_timesteps does.
    """
    s = cfg.sample
    scheduler = make_scheduler(s.scheduler, s.steps, s.shift)
    experts = model if isinstance(model, Experts) else Experts([model], [s.guidance_scale], None)
    batch = latents.shape[0]
    for t in tqdm(scheduler.timesteps, desc="denoise", unit="step", disable=not show_progress, leave=True):
        dit, scale = experts.select(t)
        timestep = t.to(device=latents.device, dtype=torch.float32).expand(batch)
        x = latents if condition is None else torch.cat([latents, condition.to(latents.dtype)], dim=1)
        if first_frame is not None:
            x = with_first_frame(latents, first_frame)
            timestep = token_timesteps(timestep, latents.shape[2:], dit.config.patch_size)
        extra = () if image_context is None else (image_context,)
        velocity = guided_prediction(lambda context: dit(x, timestep, context, *extra),
                                     contexts.cond, contexts.uncond, scale, dims)
        latents = scheduler.step(velocity, t, latents, return_dict=False)[0]
    if first_frame is not None:
        latents = with_first_frame(latents, first_frame)
    return latents.float()


def with_first_frame(latents: torch.Tensor, first_frame: torch.Tensor) -> torch.Tensor:
    """`latents` [B, z, F, H, W] with latent frame 0 replaced by `first_frame` [B, z, 1, H, W]."""
    return torch.cat([first_frame.to(latents.dtype).expand(latents.shape[0], -1, -1, -1, -1), latents[:, :, 1:]],
                     dim=2)


def token_timesteps(timestep: torch.Tensor, latent_grid, patch_size) -> torch.Tensor:
    """[B] -> [B, S]: t for every token, 0 for the tokens of the first latent frame (known, not noised)."""
    if patch_size[0] != 1:
        raise ValueError(f"a first-frame image needs one latent frame per token frame; the DiT patches "
                         f"{patch_size[0]} latent frames together")
    f, h, w = (n // p for n, p in zip(latent_grid, patch_size))
    ts = timestep[:, None, None, None].expand(-1, f, h, w).clone()
    ts[:, 0] = 0
    return ts.flatten(1)
