"""Denoise stage: load the DiT, lay it out (Ulysses + optional block offload), run the sampler.

Every rank holds the full latents and steps its own scheduler copy; the DiT splits the tokens
over the Ulysses group internally (parallelize_wan) and returns the full prediction, and CFG
ranks swap predictions once per step (guidance.py). Inputs to every step are therefore the same
bits on every rank, and so are the scheduler states.
"""
from __future__ import annotations

import time

import torch
from tqdm import tqdm

from lightx2v_sp.attention.options import UlyssesOptions
from lightx2v_sp.cache_dir import enable_compile_cache
from lightx2v_sp.models.wan import WanModel, parallelize_wan
from lightx2v_sp.offload import offload_dit_blocks

from .experts import Experts
from .finite import check_latents
from .guidance import guided_prediction
from .loras import apply_loras
from .quant import install_dit_matmul, load_options
from .scheduler import make_scheduler


def load_dit(path: str, cfg, device: torch.device, dtype: torch.dtype, expert: str | None = None,
             from_peer: bool = False) -> WanModel:
    """One DiT (of one or two experts) on `device`; on the CPU with offload.dit=block or swap (the
    offload places it later).

    `lora:` entries (those for `expert`, on a two-expert model) are merged here, before
    install_parallel lays the weights out. `from_peer` (offload.dit=block with offload.share_host on
    a rank other than its node's local rank 0, see blocks_from_local_rank0): the blocks are not read
    at all; local rank 0's shared host copy (with the LoRAs merged) supplies them
    (offload/shared_host.py), so the node reads and holds the blocks once. `model.blocks_loaded`
    tells install_parallel which case it is.
    """
    # model.dit_path(_2) and model.quant (pipeline/quant.py): which file, and fp8 or not
    options = load_options(cfg, int(expert == "low_noise"), 1 if expert is None else 2, device)
    if cfg.offload.dit != "block":
        on_host = cfg.offload.dit == "swap"
        model = WanModel.from_pretrained(path, dtype=dtype, device="cpu" if on_host else device, **options)
        model.lora_summary = apply_loras(model, cfg, device, expert)
        install_dit_matmul(model, cfg, device, dtype)
        return model
    model = WanModel.from_pretrained(path, dtype=dtype, device="cpu",
                                     skip=(lambda name: name.startswith("blocks.")) if from_peer else None, **options)
    model.blocks_loaded = not from_peer
    # a rank that skipped the blocks merges only what it holds; local rank 0 merges the shared blocks
    model.lora_summary = apply_loras(model, cfg, device, expert, skip_blocks=from_peer)
    install_dit_matmul(model, cfg, device, dtype)
    return model


def blocks_from_local_rank0(cfg, device: torch.device, shared_bytes: int) -> bool:
    """Whether this rank skips reading the DiT blocks because its node's local rank 0 shares them.

    `shared_bytes`: what the shared host copies of every expert hold together
    (plan_sizes.shared_blocks_bytes, from the resolved checkpoint's configs). NodeSharedHost falls
    back to private copies when /dev/shm is too small for an arena, and a rank that skipped its blocks
    then has none: so all experts' arenas must fit before the first is made."""
    from lightx2v_sp.offload.shared_host import _shm_free_bytes, local_layout

    local_rank, local_world = local_layout()
    if not (cfg.offload.dit == "block" and cfg.offload.share_host and local_world > 1 and local_rank != 0
            and device.type == "cuda" and torch.cuda.is_available()):
        return False
    return _shm_free_bytes() >= shared_bytes


def install_parallel(model: WanModel, cfg, dims, device: torch.device, transport=None):
    """Ulysses attention per `parallel.*`, then block offload (which must come after it); the block
    offload handle or None. offload.dit=swap is placed by experts.install_experts."""
    parallelize_wan(model, dims, options=UlyssesOptions.from_config(cfg))
    if cfg.offload.dit == "block":
        return offload_dit_blocks(model, device, transport=transport, share_host=cfg.offload.share_host,
                                  weights_loaded=getattr(model, "blocks_loaded", True))
    if cfg.offload.dit == "swap":
        return None
    if cfg.model.compile:
        enable_compile_cache()  # a later run reuses the compiled graphs and kernels
        for block in model.blocks:  # identical blocks share one compiled graph (parameters are inputs)
            block.compile(dynamic=False)
    return None


@torch.no_grad()
def denoise(model: "WanModel | Experts", latents: torch.Tensor, contexts, cfg, dims, show_progress: bool,
            condition: torch.Tensor | None = None, image_context: torch.Tensor | None = None,
            first_frame: torch.Tensor | None = None, stats: dict | None = None, cache=None,
            on_step=None, while_queued=None) -> torch.Tensor:
    """Run `sample.steps` sampler steps from `latents` (fp32); returns the final latents (fp32).

    `model` is one DiT or the `Experts` of a two-expert model (which one runs, and its guidance
    scale, depends on the timestep). `condition` [B, 4 + z, F, H, W] (I2V: mask + image latents)
    is concatenated after the latents on the channel axis at every step; `image_context`
    [B, L, width] (Wan2.1 I2V: CLIP tokens) goes to the DiT's image branch, the same for both passes.
    `first_frame` [B, z, 1, H, W] (Wan2.2 TI2V with an image) replaces the first latent frame of every
    DiT input and of the result, and its tokens get timestep 0 (the others t), as diffusers'
    expand_timesteps does. `stats` (optional) receives this rank's DiT forward count and the
    timesteps it ran. `cache` (a pipeline.cache.StepCache, optional) decides per step and branch whether
    the DiT's blocks run; its decisions go to `stats["cache"]`. `on_step(step, num_steps)` (optional)
    runs after each step: progress and cancellation of served jobs (serve/); it may raise to stop the loop.
    `while_queued()` (optional) runs once per step between queueing the step's DiT forwards and the
    sampler step (which, like the finiteness check after it, may wait for them): host work in the
    GPU's shadow (shadow_load.py).
    """
    s = cfg.sample
    scheduler = make_scheduler(s.scheduler, s.steps, s.shift, timesteps=s.timesteps)
    experts = model if isinstance(model, Experts) else Experts([model], [s.guidance_scale], None)
    batch = latents.shape[0]
    num_steps = len(scheduler.timesteps)
    forwards = 0
    step_times = []  # wall seconds per step: check_latents syncs the device once per step anyway
    last = time.perf_counter()
    # `with`: an error or a signal mid-loop still ends the bar's line, so the error starts its own
    with tqdm(scheduler.timesteps, desc="denoise", unit="step", disable=not show_progress, leave=True) as bar:
        for step, t in enumerate(bar, start=1):
            dit, scale = experts.select(t)
            if cache is not None:
                cache.begin_step(step - 1, experts.active)
            timestep = t.to(device=latents.device, dtype=torch.float32).expand(batch)
            x = latents if condition is None else torch.cat([latents, condition.to(latents.dtype)], dim=1)
            if first_frame is not None:
                x = with_first_frame(latents, first_frame)
                timestep = token_timesteps(timestep, latents.shape[2:], dit.config.patch_size)
            extra = () if image_context is None else (image_context,)

            def forward(context):
                nonlocal forwards
                forwards += 1
                if cache is not None:
                    return cache.forward(dit, 0 if context is contexts.cond else 1, x, timestep, context, *extra)
                return dit(x, timestep, context, *extra)

            velocity = guided_prediction(forward, contexts.cond, contexts.uncond, scale, dims)
            if while_queued is not None:  # host work while the GPU runs the step's queued forwards
                while_queued()
            latents = scheduler.step(velocity, t, latents, return_dict=False)[0]
            check_latents(latents, step, num_steps)  # waits for the step
            if on_step is not None:
                on_step(step, num_steps)
            now = time.perf_counter()
            step_times.append(round(now - last, 4))
            last = now
            if cache is not None:
                bar.set_postfix_str(cache.progress(), refresh=False)
    if first_frame is not None:
        latents = with_first_frame(latents, first_frame)
    if stats is not None:
        stats.update(dit_forwards=forwards, steps=num_steps, step_times_s=step_times,
                     timesteps=[round(float(t), 3) for t in scheduler.timesteps])
        if cache is not None:
            stats["cache"] = cache.summary()
    if cache is not None:
        cache.release()
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
