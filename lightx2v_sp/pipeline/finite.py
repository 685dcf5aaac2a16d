"""Non-finite values are errors that say where they appeared, never an all-black video.

NaN or inf in a weight spreads through every later activation; in the latents it survives to the
decoded frames, which the uint8 conversion turns into black. So the weights of each component are
checked once after loading, the latents after every sampler step and the video after decoding.
Each check is one `isfinite().all()` reduction per tensor and one host sync (per component, per
step, per video): negligible next to the work it guards. The latents are the same bits on every
rank (denoise.py), so every rank finds the same non-finite step by itself: `check_latents` raises
`AgreedError` directly, with no collective per step (and none in the hot loop at all).
"""
from __future__ import annotations

import torch

from lightx2v_sp.models.quant import fp8_is_finite

from .checks import AgreedError


def _all_finite(t: torch.Tensor) -> torch.Tensor:
    """0-dim bool: no NaN or inf in `t`. aminmax reads it once without a temporary and propagates NaN
    (an inf is the max or the min): on the CPU ~10x faster than isfinite().all() on bf16 weights
    (0.64 against 6.8 s/GiB, one thread), which the weights of a component loaded to the host pay."""
    if t.numel() == 0:
        return torch.ones((), dtype=torch.bool, device=t.device)
    if t.dtype in (torch.bfloat16, torch.float16, torch.float32, torch.float64):
        lo, hi = torch.aminmax(t)
        return torch.isfinite(lo) & torch.isfinite(hi)
    if t.dtype == torch.float8_e4m3fn:  # model.quant=fp8: e4m3 has no inf, NaN is a bit pattern
        return fp8_is_finite(t)
    return torch.isfinite(t).all()


def check_weights(module: torch.nn.Module, component: str, path: str) -> None:
    """ValueError naming the first parameter of `module` that holds NaN or inf."""
    named = [(n, p) for n, p in module.named_parameters() if p.is_floating_point() and p.device.type != "meta"]
    if not named:
        return
    flags = torch.stack([_all_finite(p).to(named[0][1].device) for _, p in named])
    if bool(flags.all()):  # the one sync
        return
    bad = [n for (n, _), ok in zip(named, flags.tolist()) if not ok]
    more = f" and {len(bad) - 1} more tensor(s)" if len(bad) > 1 else ""
    raise ValueError(f"the {component} weights at {path} hold NaN or inf values (in {bad[0]}{more}); the "
                     "checkpoint is corrupt and every video would be black. Nothing was generated")


def check_latents(latents: torch.Tensor, step: int, num_steps: int) -> None:
    """AgreedError if the latents after sampler step `step` (1-based) of `num_steps` are not finite."""
    if not bool(torch.isfinite(latents).all()):
        raise AgreedError(f"the latents hold NaN or inf after denoising step {step} of {num_steps} (the DiT's "
                         "prediction overflowed: try model.dtype=bf16 or fp32, or a smaller "
                         "sample.guidance_scale); no video was written")


def check_video(video: torch.Tensor) -> None:
    if not bool(torch.isfinite(video).all()):
        raise ValueError("the decoded video holds NaN or inf values although the latents were finite (the VAE "
                         "decode overflowed: try vae.dtype=fp32, or offload.vae=cpu to decode on the host); no "
                         "video was written")
