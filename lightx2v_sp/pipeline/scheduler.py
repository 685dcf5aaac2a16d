"""The sampler: the two flow-matching samplers Wan uses, written here so that a run imports no
diffusers before its denoise (its import costs seconds of start-up; BENCHMARKS.md, "Time to video").

- unipc: multistep UniPC in flow mode as Wan2.1's -Diffusers scheduler_config.json sets diffusers'
  UniPCMultistepScheduler (flow_prediction, flow sigmas shifted by `shift`, order 2, bh2,
  lower order on the last step, final sigma 0, x0-predicting corrector).
- euler: flow-matching Euler with the same `shift` (diffusers' FlowMatchEulerDiscreteScheduler).
- `timesteps` (an explicit step list, e.g. [1000, 750, 500, 250] for 4-step distilled Wan): sigma_i =
  t_i / 1000, shifted by `shift` like the default schedule and ended at sigma 0. With euler this is
  the sampler of LightX2V's step-distilled Wan models (x <- x + (sigma_next - sigma) * v).

Both reproduce diffusers' schedules and updates operation for operation (the same dtypes, the same
order of float operations, the scalars on the sample's device), so a run equals diffusers' bit for bit
(tests/test_scheduler_exact.py). Every rank builds its own copy; they step identically because their
inputs are identical.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

SCHEDULERS = ("unipc", "euler")


def make_scheduler(name: str, steps: int, shift: float, num_train_timesteps: int = 1000,
                   timesteps: Sequence[float] | None = None):
    """A sampler with its schedule set: `steps` of them, or `timesteps`. It has `.timesteps`,
    `.sigmas` (one more than the steps, the last 0) and `.step(velocity, t, sample, return_dict=False)`."""
    if steps < 1:
        raise ValueError(f"sample.steps = {steps} must be >= 1; there would be nothing to denoise")
    if shift <= 0:
        raise ValueError(f"sample.shift = {shift} must be > 0 (Wan2.1 uses 3.0 at 480p, 5.0 at 720p)")
    if name not in SCHEDULERS:
        raise ValueError(f"sample.scheduler = {name!r} is not one of {list(SCHEDULERS)}")
    sigmas = None if timesteps is None else np.asarray(timesteps, dtype=np.float64) / num_train_timesteps
    if name == "unipc":
        return UniPCFlow(steps, shift, num_train_timesteps, sigmas)
    return FlowEuler(steps, shift, num_train_timesteps, sigmas)


def _shifted(shift: float, sigma):
    return shift * sigma / (1 + (shift - 1) * sigma)


class _Stepper:
    """What both samplers share: the schedule and where in it the next step is."""

    timesteps: torch.Tensor
    sigmas: torch.Tensor

    def __init__(self):
        self.index: int | None = None

    def _start(self, t) -> None:
        # diffusers' rule for the first step: the position of t in the schedule, the second if it
        # occurs twice (integer timesteps of a fine schedule can repeat)
        hits = (self.timesteps == t).nonzero()
        if len(hits) == 0:
            self.index = len(self.timesteps) - 1  # UniPC's fallback; Euler schedules always hold t
        else:
            self.index = hits[1 if len(hits) > 1 else 0].item()

    def __len__(self) -> int:
        return len(self.timesteps)


class FlowEuler(_Stepper):
    """x <- x + (sigma_next - sigma) * v, in float32, returned in the velocity's dtype."""

    def __init__(self, steps: int, shift: float, num_train_timesteps: int = 1000, sigmas=None):
        super().__init__()
        n = num_train_timesteps
        if sigmas is None:
            # the ends of diffusers' training schedule (float32, shifted once), spaced and shifted again
            train = torch.from_numpy(np.linspace(1, n, n, dtype=np.float32)[::-1].copy()) / n
            train = _shifted(shift, train)
            t = np.linspace(train[0].item() * n, train[-1].item() * n, steps)
            sig = _shifted(shift, t / n)
        else:
            sig = _shifted(shift, np.array(sigmas).astype(np.float32))
        sig = torch.from_numpy(sig).to(dtype=torch.float32)
        self.timesteps = sig * n
        self.sigmas = torch.cat([sig, torch.zeros(1)])

    def step(self, velocity: torch.Tensor, t, sample: torch.Tensor, return_dict: bool = False):
        if self.index is None:
            self._start(t)
        dt = self.sigmas[self.index + 1] - self.sigmas[self.index]
        out = (sample.to(torch.float32) + dt * velocity).to(velocity.dtype)
        self.index += 1
        return (out,)


class UniPCFlow(_Stepper):
    """UniPC (order 2, B(h) = e^h - 1) predicting x0 = x - sigma * v: a predictor each step and, from
    the second, a corrector of the previous predictor with the new velocity."""

    order = 2

    def __init__(self, steps: int, shift: float, num_train_timesteps: int = 1000, sigmas=None):
        super().__init__()
        n = num_train_timesteps
        sig = np.linspace(1, 1 / n, steps + 1)[:-1] if sigmas is None else sigmas
        sig = _shifted(shift, sig)
        if np.fabs(sig[0] - 1) < 1e-6:
            sig[0] -= 1e-6  # log(sigma / alpha) must stay finite at the first step
        self.timesteps = torch.from_numpy((sig * n).copy()).to(dtype=torch.int64)
        self.sigmas = torch.from_numpy(np.concatenate([sig, [0]]).astype(np.float32))
        self.x0s: list = [None] * self.order  # the last two x0 predictions, newest last
        self.warm = 0  # steps taken so far, up to the order: the multistep warm-up
        self.last_sample = None
        self.last_order = None
        self._on_device = self.sigmas

    def _lambda(self, i: int, device):
        """(alpha, sigma, log(alpha / sigma)) at schedule position i, on the sample's device. The sigmas
        go to the device once: diffusers copies each one per use, and a copy from pageable host memory
        waits for the GPU, so its step waited for the step's kernels (the same values either way)."""
        if self._on_device.device != device:
            self._on_device = self.sigmas.to(device)
        sigma = self._on_device[i]
        alpha = 1 - sigma
        return alpha, sigma, torch.log(alpha) - torch.log(sigma)

    def _coefficients(self, to: int, frm: int, device):
        alpha_t, sigma_t, lam_t = self._lambda(to, device)
        _, sigma_s0, lam_s0 = self._lambda(frm, device)
        h = lam_t - lam_s0
        hh = -h
        h_phi_1 = torch.expm1(hh)  # e^-h - 1, which is also B(h) for bh2
        return alpha_t, sigma_t, sigma_s0, lam_s0, h, hh, h_phi_1, h_phi_1

    def _b(self, hh, h_phi_1, b_h, order: int) -> list:
        out, h_phi_k, factorial = [], h_phi_1 / hh - 1, 1
        for i in range(1, order + 1):
            out.append(h_phi_k * factorial / b_h)
            factorial *= i + 1
            h_phi_k = h_phi_k / hh - 1 / factorial
        return out

    def _differences(self, older: list[int], lam_s0, h, m0, device):
        """rk and (m_i - m0) / rk for the older predictions (schedule positions `older`)."""
        rks, d1s = [], []
        for k, pos in enumerate(older, start=2):
            _, _, lam_si = self._lambda(pos, device)
            rk = (lam_si - lam_s0) / h
            rks.append(rk)
            d1s.append((self.x0s[-k] - m0) / rk)
        return rks, d1s

    def _predict(self, sample: torch.Tensor, order: int) -> torch.Tensor:
        i, device, m0 = self.index, sample.device, self.x0s[-1]
        alpha_t, sigma_t, sigma_s0, lam_s0, h, hh, h_phi_1, b_h = self._coefficients(i + 1, i, device)
        _, d1s = self._differences([i - 1] if order == 2 else [], lam_s0, h, m0, device)
        x_t = sigma_t / sigma_s0 * sample - alpha_t * h_phi_1 * m0
        if d1s:  # order 2: rho = 1/2, diffusers' simplified predictor
            rhos = torch.ones(1, dtype=sample.dtype, device=device) * 0.5
            res = torch.einsum("k,bkc...->bc...", rhos, torch.stack(d1s, dim=1))
        else:
            res = 0
        return (x_t - alpha_t * b_h * res).to(sample.dtype)

    def _correct(self, x0: torch.Tensor, last: torch.Tensor, sample: torch.Tensor, order: int) -> torch.Tensor:
        i, device, m0 = self.index, sample.device, self.x0s[-1]
        alpha_t, sigma_t, sigma_s0, lam_s0, h, hh, h_phi_1, b_h = self._coefficients(i, i - 1, device)
        rks, d1s = self._differences([i - 2] if order == 2 else [], lam_s0, h, m0, device)
        if order == 1:
            rhos = torch.ones(1, dtype=last.dtype, device=device) * 0.5
        else:
            rks = torch.stack(rks + [torch.ones((), device=device)])
            r = torch.stack([torch.pow(rks, p) for p in range(order)])
            # solve_ex: linalg.solve's result without its error check, which reads the device's status
            # (a wait for the GPU); R = [[1, 1], [rk, 1]] is singular only for rk = 1 (equal sigmas)
            rhos = torch.linalg.solve_ex(r, torch.stack(self._b(hh, h_phi_1, b_h, order)))[0].to(device).to(last.dtype)
        x_t = sigma_t / sigma_s0 * last - alpha_t * h_phi_1 * m0
        res = torch.einsum("k,bkc...->bc...", rhos[:-1], torch.stack(d1s, dim=1)) if d1s else 0
        return (x_t - alpha_t * b_h * (res + rhos[-1] * (x0 - m0))).to(last.dtype)

    def step(self, velocity: torch.Tensor, t, sample: torch.Tensor, return_dict: bool = False):
        if self.index is None:
            self._start(t)
        x0 = sample - self.sigmas[self.index] * velocity
        if self.index > 0 and self.last_sample is not None:
            sample = self._correct(x0, self.last_sample, sample, self.last_order)
        self.x0s = self.x0s[1:] + [x0]
        order = min(self.order, len(self.timesteps) - self.index, self.warm + 1)  # lower order at the end
        self.last_order, self.last_sample = order, sample
        out = self._predict(sample, order)
        self.warm = min(self.warm + 1, self.order)
        self.index += 1
        return (out,)
