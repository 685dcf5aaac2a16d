"""StepCache: per step and per guidance branch, run the DiT's blocks or reuse their last residual.

The sampler loop (pipeline/denoise.py) calls `begin_step(step, expert)` once per step and
`forward(dit, branch, ...)` instead of `dit(...)`. The DiT runs in its three stages (WanModel.embed ->
run_blocks -> finish); a skipped forward runs the embeddings and the head and adds the branch's cached
residual to the tokens in between:

- teacache:    the relative L1 change of the time embedding (`temb`, or `e0` in use_ret_steps mode)
               since the branch's last step, through the rescale polynomial, accumulates; the blocks
               are skipped while the sum stays below the threshold (reset when they run);
- magcache:    the published (or calibrated) per-step norm ratios multiply up; the blocks are
               skipped while the accumulated |1 - ratio| stays below the threshold;
- first_block: block 0 always runs; the rest are skipped while its residual differs from the one
               of the branch's last computed step by less than the threshold (relative L1).

Every rank of a Ulysses group decides the same: the token metrics are summed over the group
(metrics.sequence_sums), and the other inputs (the timestep embedding of a per-sample timestep, the
ratio tables) are the same on every rank. CFG-parallel ranks hold one branch each and decide for it.
The cached residuals are this rank's token slice, one per branch, dropped at an expert switch (the
next step computes) and by `release()`. With `calibrate`, every step computes and the mean norm
ratio of consecutive residuals is recorded per branch (written to a file by the runner).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from lightx2v_sp.config import uses_cfg

from . import metrics
from .settings import CacheSettings

BRANCHES = ("cond", "uncond")


@dataclass
class _Branch:
    name: str                                 # cond | uncond
    residual: Optional[torch.Tensor] = None   # [B, S_r, dim] blocks' (teacache, magcache) or blocks 1..N's
    previous: Optional[torch.Tensor] = None   # teacache: last step's embedding; first_block: block 0's residual
    accumulated: float = 0.0                  # teacache: rescaled change; magcache: error
    ratio: float = 1.0                        # magcache: product of the ratios since the last computed step
    skips: int = 0                            # consecutive skipped steps
    computed: list = field(default_factory=list)
    skipped: list = field(default_factory=list)
    metric: dict = field(default_factory=dict)          # step -> the value the decision compared
    calibration: dict = field(default_factory=dict)     # step -> mean norm ratio (calibrate)


def residual_bytes(cfg, local_tokens: int, dim: int, element_bytes: int) -> int:
    """Device bytes the cache keeps on one rank (for the memory plan): [S_r, dim] residuals per branch this
    rank runs, one (teacache, magcache; a calibration's new residual briefly makes two) or two (first_block:
    the rest's residual and block 0's)."""
    per_branch = 2 if cfg.cache.method == "first_block" or cfg.cache.calibrate else 1
    branches = 2 if uses_cfg(cfg.sample) and cfg.parallel.cfg_degree == 1 else 1
    return local_tokens * dim * element_bytes * per_branch * branches


class StepCache:
    def __init__(self, settings: CacheSettings, dims):
        self.settings = settings
        self.group, self.size = dims.sp_group, dims.sp_size
        self.branches: dict[int, _Branch] = {}
        self.step = 0
        self.expert: Optional[int] = None
        self.expert_switches: list[int] = []

    # -- the sampler loop's two calls ------------------------------------------------------
    def begin_step(self, step: int, expert: Optional[int] = None) -> None:
        """`step` 0-based; a new `expert` (two-expert models) starts every branch afresh."""
        if expert != self.expert and self.expert is not None:
            self.expert_switches.append(step)
            for state in self.branches.values():
                state.residual = state.previous = None
        self.expert, self.step = expert, step

    def forward(self, dit, branch: int, x, timestep, context, *extra) -> torch.Tensor:
        """What `dit(x, timestep, context, *extra)` returns, with the blocks run or their residual reused."""
        state = self.branches.get(branch)
        if state is None:
            state = self.branches[branch] = _Branch(BRANCHES[branch])
        inputs = dit.embed(x, timestep, context, *extra)
        tokens = inputs.tokens
        method = self.settings.method
        if method == "first_block":
            out0 = dit.run_blocks(inputs, tokens, 0, 1)
            first = out0 - tokens
            if self._decide(state, first):
                out = out0 + state.residual
            else:
                out = dit.run_blocks(inputs, out0, 1)
                state.residual, state.previous = out - out0, first
        elif self._decide(state, inputs.temb if self.settings.teacache_input == "temb" else inputs.e0):
            out = tokens + state.residual
        else:
            out = dit.run_blocks(inputs, tokens)
            residual = out - tokens
            if self.settings.calibrate and state.residual is not None:
                state.calibration[self.step] = metrics.mean_norm_ratio(residual, state.residual, self.group, self.size)
            state.residual = residual
        return dit.finish(out, inputs)

    # -- decisions ---------------------------------------------------------------------------
    def _forced(self, state: _Branch) -> bool:
        s = self.settings
        return (s.calibrate or state.residual is None or self.step < s.start_steps
                or self.step >= s.steps - s.end_steps or (s.max_skips is not None and state.skips >= s.max_skips))

    def _decide(self, state: _Branch, signal: torch.Tensor) -> bool:
        """True: skip the blocks at this step. Records the decision."""
        s = self.settings
        forced = self._forced(state)
        value = None
        if s.method == "teacache":
            # per-sample embeddings ([B, dim] / [B, 6, dim]) are the same on every rank; per-token ones
            # (Wan2.2 TI2V: [B, S_r, ...]) are this rank's slice and are summed over the group
            per_token = signal.ndim == (3 if s.teacache_input == "temb" else 4)
            if not forced and state.previous is not None:
                group, size = (self.group, self.size) if per_token else (None, 1)
                change = metrics.relative_l1(signal, state.previous, group, size)
                value = sum(c * change ** p for p, c in enumerate(reversed(s.coefficients)))
                state.accumulated += value
            state.previous = signal
        elif s.method == "magcache" and not forced:
            state.ratio *= s.ratios[state.name][self.step]
            state.accumulated += abs(1.0 - state.ratio)
            value = state.accumulated
        elif s.method == "first_block" and not forced:
            value = metrics.relative_l1(signal, state.previous, self.group, self.size)
        if value is not None:
            state.metric[self.step] = round(value, 6)
        # teacache and magcache compare what accumulated since the last computed step, first_block the change
        compared = value if s.method == "first_block" else state.accumulated
        skip = not forced and s.threshold > 0 and compared < s.threshold
        if skip:
            state.skips += 1
            state.skipped.append(self.step)
        else:
            state.skips, state.accumulated, state.ratio = 0, 0.0, 1.0
            state.computed.append(self.step)
        return skip

    # -- reporting ---------------------------------------------------------------------------
    def progress(self) -> str:
        """For the progress bar: skipped forwards so far."""
        return f"skipped {sum(len(st.skipped) for st in self.branches.values())}"

    def summary(self) -> dict:
        """This rank's decisions: per branch the steps computed and skipped and the compared values."""
        out = {"branches": {}, "expert_switches": self.expert_switches}
        for b, st in sorted(self.branches.items()):
            entry = {"computed": st.computed, "skipped": st.skipped, "metric": st.metric}
            if self.settings.calibrate:
                entry["calibration"] = st.calibration
            out["branches"][st.name] = entry
        return out

    def release(self) -> None:
        """Drop the cached residuals (device memory) at the end of the denoising."""
        for state in self.branches.values():
            state.residual = state.previous = None
