"""Our samplers against diffusers' schedulers configured as Wan's: the same schedule and the same
updates, bit for bit (no tolerance: they do the same float operations in the same order, and a
different order or dtype shows up as a last-bit difference within a few steps)."""
import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

from lightx2v_sp.pipeline.scheduler import make_scheduler


def _diffusers(name, steps, shift, timesteps=None):
    if name == "unipc":  # Wan2.1 -Diffusers scheduler_config.json
        sched = UniPCMultistepScheduler(num_train_timesteps=1000, prediction_type="flow_prediction",
                                        use_flow_sigmas=True, flow_shift=shift, solver_order=2,
                                        solver_type="bh2", lower_order_final=True, final_sigmas_type="zero")
    else:
        sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    if timesteps is None:
        sched.set_timesteps(steps, device="cpu")
    else:
        sched.set_timesteps(sigmas=np.asarray(timesteps, dtype=np.float64) / 1000, device="cpu")
    return sched


CASES = [("unipc", 1, 3.0, None), ("unipc", 2, 3.0, None), ("unipc", 3, 5.0, None), ("unipc", 10, 3.0, None),
         ("unipc", 50, 5.0, None), ("unipc", 40, 1.0, None), ("unipc", 7, 12.0, None),
         ("unipc", 4, 5.0, [1000, 750, 500, 250]), ("unipc", 3, 3.0, [999, 600, 100]),
         ("euler", 1, 3.0, None), ("euler", 4, 5.0, None), ("euler", 30, 3.0, None), ("euler", 9, 1.0, None),
         ("euler", 4, 5.0, [1000, 750, 500, 250]), ("euler", 2, 8.0, [900, 300])]


@pytest.mark.parametrize("name,steps,shift,timesteps", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="CUDA only: the step's scalars are computed on the sample's device"))])
def test_same_schedule_and_trajectory_as_diffusers(name, steps, shift, timesteps, dtype, device):
    ours = make_scheduler(name, steps, shift, timesteps=timesteps)
    ref = _diffusers(name, steps, shift, timesteps)
    assert ours.timesteps.dtype == ref.timesteps.dtype and torch.equal(ours.timesteps, ref.timesteps)
    assert ours.sigmas.dtype == ref.sigmas.dtype and torch.equal(ours.sigmas, ref.sigmas)
    g = torch.Generator().manual_seed(steps)
    x_ours = x_ref = torch.randn(1, 4, 3, 5, 6, generator=g, dtype=torch.float32).to(device)
    for t in ours.timesteps:
        # a velocity that depends on the sample, so an error in one step changes every later one
        v = (0.7 * torch.randn(x_ref.shape, generator=g).to(device) - 0.9 * x_ref.float()).to(dtype)
        x_ours = ours.step(v, t, x_ours, return_dict=False)[0]
        x_ref = ref.step(v, t, x_ref, return_dict=False)[0]
        assert x_ours.dtype == x_ref.dtype
        assert torch.equal(x_ours, x_ref), f"{name} step at t={float(t)}: max diff {(x_ours - x_ref).abs().max()}"
    assert torch.isfinite(x_ours).all()
