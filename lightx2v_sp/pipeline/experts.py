"""The DiT(s) that denoise one run, and which of them runs at each timestep.

Wan2.2 A14B has two experts of the Wan2.1-14B shape: the high-noise one while
t >= boundary_ratio x num_train_timesteps, the low-noise one after (diffusers' rule), each with
its own guidance scale. One-DiT models are the one-expert case of the same object.

Both experts get the same `parallelize_wan` (every Ulysses variant; CFG-parallel is the runner's and
sees only "a model"). Where their weights live follows `offload.dit`:
- none:  both resident on the device (2 x 28.6 GB bf16 for A14B);
- block: each expert streams its blocks from pinned host memory (two device block buffers per
         expert, allocated on first use); at the switch the idle expert's buffers are freed, so
         the device holds what one offloaded expert needs;
- swap:  the active expert is on the device and the idle one in pinned host memory; the switch
         moves the low-noise expert in (one host-to-device copy of its weights) after the
         high-noise one has been dropped from the device. Timesteps only decrease, so it happens
         once per video. It is not overlapped with compute: both experts would have to fit at once.
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch

from lightx2v_sp.models.wan import WanModel
from lightx2v_sp.offload import ComponentPlacement


class Experts:
    """`select(t)` -> (model, guidance scale) for timestep t, with the weights placed for it."""

    def __init__(self, models: list[WanModel], guidance_scales: list[float], boundary_timestep: Optional[float],
                 placements: Optional[list[ComponentPlacement]] = None, block_offloads: Optional[list] = None):
        assert len(models) == len(guidance_scales) in (1, 2), (len(models), guidance_scales)
        assert len(models) == 1 or boundary_timestep is not None
        configs = {(m.config.in_dim, m.config.out_dim, m.config.num_heads, m.config.model_type) for m in models}
        if len(configs) != 1:
            raise ValueError(f"the two experts have different shapes (in_dim, out_dim, heads, type) {sorted(configs)}; "
                             "they are not one model")
        self.models = models
        self.guidance_scales = guidance_scales
        self.boundary_timestep = boundary_timestep
        self.placements = placements
        self.block_offloads = block_offloads or []
        self.active: Optional[int] = None
        self.num_switches = 0
        self._resident = contextlib.ExitStack()

    @property
    def config(self):
        return self.models[0].config

    def index(self, t) -> int:
        """0 (high-noise, or the only DiT) while t >= the boundary, 1 after."""
        if len(self.models) == 1 or float(t) >= self.boundary_timestep:
            return 0
        return 1

    def select(self, t) -> tuple[WanModel, float]:
        i = self.index(t)
        if i != self.active:
            self._activate(i)
        return self.models[i], self.guidance_scales[i]

    def _activate(self, i: int) -> None:
        if self.active is not None:
            self.num_switches += 1
            self._resident.close()  # swap: the previous expert's device copy is dropped first
            if self.block_offloads:
                self.block_offloads[self.active].release_buffers()
        self._resident = contextlib.ExitStack()
        if self.placements is not None:
            self._resident.enter_context(self.placements[i].on_device())
        self.active = i

    def release(self) -> None:
        """The denoise is over (before the VAE decode): free the device memory held for it and the pinned
        host copies of block-offloaded experts. The experts cannot run afterwards."""
        self._resident.close()
        for handle in self.block_offloads:
            handle.close()
        self.active = None

    def park(self) -> None:
        """Free the device memory held for denoising, keeping what the next job of a load-once run
        (serve/) needs to run them again: unlike `release`, nothing is closed for good."""
        self._resident.close()
        for handle in self.block_offloads:
            handle.release_buffers()
        self.active = None

    def summary(self) -> dict:
        return {"num_experts": len(self.models), "guidance_scales": self.guidance_scales,
                "boundary_timestep": self.boundary_timestep, "switches": self.num_switches}


def load_experts(dirs, cfg, device: torch.device, dtype: torch.dtype) -> list[WanModel]:
    """The DiT(s) from `dirs`, each as denoise.load_dit loads one (on the CPU when offload places it).

    Whether this rank reads the blocks or takes its node's shared host copy is decided once, for
    every expert together, from the experts' own config.json (the shared copies of all of them must
    fit /dev/shm before the first is made)."""
    from .denoise import blocks_from_local_rank0, load_dit

    from_peer = False
    if cfg.offload.dit == "block" and cfg.offload.share_host:
        from_peer = blocks_from_local_rank0(cfg, device, shared_copy_bytes(dirs, cfg))
    names = [None] if len(dirs) == 1 else ["high_noise", "low_noise"]  # lora entries may name an expert
    return [load_dit(d, cfg, device, dtype, expert=name, from_peer=from_peer) for d, name in zip(dirs, names)]


def shared_copy_bytes(dirs, cfg) -> int:
    """Bytes the node's shared host copies of every expert's blocks hold together in /dev/shm."""
    from lightx2v_sp.models.wan.loader import read_config
    from lightx2v_sp.plan_sizes import shared_blocks_bytes

    return shared_blocks_bytes([read_config(d)[2] for d in dirs], cfg.model.dtype, cfg.model.quant)


def install_experts(models: list[WanModel], cfg, dims, device: torch.device, boundary_ratio: Optional[float],
                    num_train_timesteps: int = 1000, transport=None) -> Experts:
    """Ulysses attention on every expert, then the placement per `offload.dit` (after it, as block
    offload requires). `transport` replaces the CUDA one (tests: HostTransport on CPU)."""
    from .denoise import install_parallel

    handles = [install_parallel(m, cfg, dims, device, transport=transport) for m in models]
    offloads = [h for h in handles if h is not None]
    placements = None
    if cfg.offload.dit == "swap":
        placements = [ComponentPlacement(m, "swap", device, name=f"dit expert {i}", transport=transport)
                      for i, m in enumerate(models)]
    scales, boundary = expert_sampling(cfg.sample, len(models), boundary_ratio, num_train_timesteps)
    return Experts(models, scales, boundary, placements, offloads)


def expert_sampling(s, num_experts: int, boundary_ratio: Optional[float],
                    num_train_timesteps: int = 1000) -> tuple[list[float], Optional[float]]:
    """(guidance scale of each expert, boundary timestep or None) of the sample settings `s`."""
    scale_2 = s.guidance_scale if s.guidance_scale_2 is None else s.guidance_scale_2
    boundary = None if num_experts == 1 else boundary_ratio * num_train_timesteps
    return [s.guidance_scale, scale_2][:num_experts], boundary
