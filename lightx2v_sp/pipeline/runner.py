"""One text-to-video run: preflight -> text -> load DiT -> denoise -> decode -> write.

`run(cfg, device)` is what `python -m lightx2v_sp.generate` calls after joining the process group
(it also runs inside tests' spawned ranks). Every check that could fail on one rank only runs
through `checks.agreed`, so a user error stops all ranks with one message instead of a hang.
Rank 0 decodes and writes; the other ranks wait for its outcome and fail with it.
"""
from __future__ import annotations

import contextlib
import datetime
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.distributed as dist

from lightx2v_sp.config import to_dict
from lightx2v_sp.distributed import CommStats, ParallelDims
from lightx2v_sp.models.vae import WanVAE, to_uint8_frames
from lightx2v_sp.offload import ComponentPlacement, StageMemory

from .checks import agreed, all_gather_objects, check_layout, resolve_ulysses_degree
from .conditioning import image_inputs, needs_image_stage
from .denoise import denoise
from .experts import install_experts, load_experts
from .image import open_image
from .kind import boundary_ratio, check_inputs, detect_kind
from .latents import initial_latents, latent_shape
from .output import check_video_writer, check_writable, summary_path, write_json, write_video
from .paths import model_paths_for
from .text import check_text_encoder_layout, encode_prompts

log = logging.getLogger("lightx2v_sp")

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass
class RunResult:
    latents: torch.Tensor                      # final latents [1, C, F, H, W] fp32 (every rank)
    video: Optional[torch.Tensor] = None       # decoded frames [3, F, H, W] in [-1, 1] fp32 (rank 0)
    output_path: Optional[str] = None          # the mp4 (rank 0)
    summary: dict = field(default_factory=dict)


class _Stages:
    """Wall time, peak device memory and wire traffic of each named stage on this rank."""

    def __init__(self, device: torch.device):
        self.device = device
        self.times: dict[str, float] = {}
        self.memory = StageMemory(device)
        self.comm: dict[str, CommStats] = {}

    @contextlib.contextmanager
    def __call__(self, name: str):
        stats = self.comm.setdefault(name, CommStats())
        start = time.perf_counter()
        with self.memory.stage(name), stats.record():
            yield
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
        self.times[name] = round(time.perf_counter() - start, 4)
        log.info("%-8s %.2fs", name, self.times[name])


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def _preflight(cfg, device: torch.device):
    world, rank = _world()
    out = None
    if rank == 0:  # cheapest first
        out = check_writable(cfg.output.path)
        check_video_writer()
    check_text_encoder_layout(cfg.text_encoder, device, world)
    paths = model_paths_for(cfg.model)
    check_layout(world, _ulysses(cfg), cfg.parallel.cfg_degree, paths.num_heads)
    kind = detect_kind(paths)
    check_inputs(kind, cfg)
    if cfg.image is not None and rank == 0:  # rank 0 encodes it
        open_image(cfg.image)
    return paths, out, kind


def _ulysses(cfg) -> int:
    return resolve_ulysses_degree(_world()[0], cfg.parallel.ulysses_degree, cfg.parallel.cfg_degree)


def _comm_summary(per_rank: list[dict]) -> dict:
    total: dict = {"calls": {}, "bytes": {}}
    for rank_stats in per_rank:
        for stage in rank_stats.values():
            for what in ("calls", "bytes"):
                for kind, n in stage[what].items():
                    total[what][kind] = total[what].get(kind, 0) + n
    total["total_calls"] = sum(total["calls"].values())
    total["total_bytes"] = sum(total["bytes"].values())
    return {"note": "bytes sent; 'total' sums all ranks and stages, 'per_rank' is by rank then stage",
            "total": total, "per_rank": per_rank}


def run(cfg, device: torch.device, progress: bool = True, keep_video: bool = False) -> RunResult:
    """Generate the video described by `cfg` (every rank of the job calls this)."""
    started = time.perf_counter()
    world, rank = _world()
    stages = _Stages(device)
    dtype = DTYPES[cfg.model.dtype]

    with stages("preflight"):
        paths, out_path, kind = agreed("preflight", lambda: _preflight(cfg, device))
        dims = ParallelDims(_ulysses(cfg), cfg.parallel.cfg_degree)
    log.info("layout: %d rank(s) = cfg %d x ulysses %d (%s), device %s, model %s", world, dims.cfg_degree,
             dims.ulysses_degree, cfg.parallel.a2a, device, paths.root)

    with stages("text"):
        contexts = encode_prompts(cfg, paths, dims, device, dtype)

    with stages("load"):
        def load():
            models = load_experts(kind.experts, cfg, device, dtype)
            model = models[0]
            vae = WanVAE.from_pretrained(paths.vae) if rank == 0 else None
            if vae is not None and vae.z_dim != model.config.out_dim:
                raise ValueError(f"the VAE at {paths.vae} has z_dim={vae.z_dim} latent channels, the DiT at "
                                 f"{paths.dit} denoises out_dim={model.config.out_dim}; they are not one model")
            if vae is not None and (vae.temporal_stride, vae.spatial_stride) != kind.vae_strides:
                raise ValueError(f"the VAE at {paths.vae} compresses time x space by {vae.temporal_stride} x "
                                 f"{vae.spatial_stride}, its config.json says {kind.vae_strides}")
            return models, vae
        models, vae = agreed("loading the DiT", load)
        experts = install_experts(models, cfg, dims, device, boundary_ratio(kind, cfg.sample))

    s = cfg.sample
    shape = latent_shape(experts.config.out_dim, s.num_frames, s.height, s.width, *kind.vae_strides)
    image = {}
    if needs_image_stage(kind, cfg):
        with stages("image"):
            image = image_inputs(cfg, kind, vae, shape, experts.config.condition_dim, device, dtype, world, rank)
    with stages("denoise"):
        latents = initial_latents(cfg.seed, shape, device)
        latents = denoise(experts, latents, contexts, cfg, dims, show_progress=progress and rank == 0,
                          **image)
    experts.release()
    prompt_tokens = contexts.num_tokens
    experts_summary = {"kind": kind.name, "boundary_source": kind.boundary_source, **experts.summary()}
    del models, experts, contexts, image
    if device.type == "cuda":
        torch.cuda.empty_cache()

    per_rank = all_gather_objects({"comm": {k: v.as_dict() for k, v in stages.comm.items()},
                                   "peak_memory": stages.memory.as_dict(), "times": dict(stages.times)}, world)
    result = RunResult(latents=latents.cpu())

    def finish():
        if rank != 0:
            return
        with stages("decode"):
            placement = ComponentPlacement(vae.vae, cfg.offload.vae, device, name="vae")
            with placement.on_device():
                video = vae.decode(latents, device=placement.execution_device)[0].cpu()
        with stages("write"):
            write_video(to_uint8_frames(video), out_path, s.fps)
        result.video = video if keep_video else None
        result.output_path = out_path
        result.summary = _summary(cfg, dims, device, paths, shape, stages, per_rank, started, out_path)
        result.summary["text"] = {"prompt_tokens": prompt_tokens, "text_len": cfg.text_encoder.text_len}
        result.summary["experts"] = experts_summary
        write_json(result.summary, summary_path(out_path))

    agreed("decoding and writing the video", finish)
    if rank == 0:
        log.info("wrote %s and %s", out_path, summary_path(out_path))
    return result


def _summary(cfg, dims, device, paths, shape, stages: _Stages, per_rank: list[dict], started: float,
             out_path: str) -> dict:
    import diffusers

    s = cfg.sample
    return {
        "output_path": out_path,
        "summary_path": summary_path(out_path),
        "created": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "layout": {"world_size": dims.world_size, "ulysses_degree": dims.ulysses_degree,
                   "cfg_degree": dims.cfg_degree, "a2a": cfg.parallel.a2a, "fuse_qkv": cfg.parallel.fuse_qkv,
                   "comm_dtype": cfg.parallel.comm_dtype, "attention_backend": cfg.attention.backend,
                   "text_encoder": {"parallel": cfg.text_encoder.parallel, "device": cfg.text_encoder.device},
                   "offload": {"dit": cfg.offload.dit, "vae": cfg.offload.vae},
                   "device": str(device), "process_group": dist.get_backend() if dims.world_size > 1 else None,
                   "nodes": max(1, dims.world_size // int(os.environ.get("LOCAL_WORLD_SIZE", dims.world_size)))},
        "model": {**paths.as_dict(), "tiny": cfg.model.path is None, "dtype": cfg.model.dtype},
        "video": {"frames": s.num_frames, "height": s.height, "width": s.width, "fps": s.fps,
                  "latent_shape": list(shape), "steps": s.steps, "scheduler": s.scheduler, "seed": cfg.seed},
        "stage_times_s": dict(stages.times),
        "total_time_s": round(time.perf_counter() - started, 3),
        "stage_times_s_per_rank": [r["times"] for r in per_rank],
        "peak_memory_bytes": {"note": "peak allocated/reserved device bytes per stage; None where the device "
                                      "is not CUDA. 'rank0' includes decode and write (rank 0 only)",
                              "rank0": stages.memory.as_dict(), "per_rank": [r["peak_memory"] for r in per_rank]},
        "comm": _comm_summary([r["comm"] for r in per_rank]),
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__},
        "config": to_dict(cfg),
    }
