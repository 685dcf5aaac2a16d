"""One text-to-video run: preflight -> text (DiT + VAE loading alongside) -> denoise -> decode -> write.

`run(cfg, device)` is what `python -m lightx2v_sp.generate` calls after joining the process group
(it also runs inside tests' spawned ranks): `load_models` (preflight, text encoder, DiT / experts,
VAE, layout) then `run_job` (this job's prompts, image, denoise, decode, write, summary). The server
and `generate --prompts` (serve/) load once and call `run_job` per job on models that stay loaded.
Every check that could fail on one rank only runs through `checks.agreed`, so a user error stops
all ranks with one message instead of a hang. Every rank decodes a band of the video's rows
(pipeline/decode.py) and rank 0 gathers and writes it; the other ranks wait for its outcome (on its
heartbeat, not a collective timeout: rank0_stage.py) and fail with it.
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

from lightx2v_sp.config import to_dict, uses_cfg
from lightx2v_sp.distributed import CommStats, ParallelDims, check_layout, resolve_ulysses_degree
from lightx2v_sp.distributed.groups import job_size_rank
from lightx2v_sp.models.vae import decodes_without_diffusers, to_uint8_frames
from lightx2v_sp.offload import StageMemory
from lightx2v_sp.plan import check_before_loading, plan_summary, shapes_of
from lightx2v_sp.plan_sizes import Shapes

from .cache import StepCache, cache_summary, settings_for_run
from .checks import agreed, all_gather_objects
from .conditioning import image_inputs, needs_image_stage
from .decode import decode_rows, gather_video, vae_on_every_rank
from .denoise import denoise
from .effective import effective_layout
from .experts import Experts, expert_sampling, install_experts
from .finite import check_video
from .geometry import video_geometry
from .image import open_image
from .kind import ModelKind, boundary_ratio, check_inputs, detect_kind
from .latents import initial_latents
from .loras import check_loras
from .output import OutputPair, check_ours, check_video_writer, check_writable, summary_path
from .paths import ModelPaths, model_paths_for
from .prefetch import (Loader, check_vae_channels, import_shared_packages, load_alongside_text, load_vae_checked,
                       load_weights, vae_loads_later)
from .prompt_cache import PromptCache, prompt_pair
from .quant import run_summary as quant_summary
from .rank0_stage import rank0_stage
from .shadow_load import VAE_IMPORTS, ShadowLoad
from .step_times import first_step_cost
from .text import PromptEncoder, check_text_encoder_layout

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


@dataclass
class Loaded:
    """What `run_job` needs and what stays loaded between jobs."""
    cfg: object                       # the config the models were loaded with
    device: torch.device
    dims: ParallelDims
    paths: ModelPaths
    kind: ModelKind
    shapes: Shapes                    # the resolved checkpoint's configs (the plan's and the geometry's)
    models: Optional[list]            # the DiT(s); None once a one-job run dropped them
    experts: Optional[Experts]
    vae: object                       # WanVAE on rank 0, or on every rank with split decode; else None
    kernel: str                       # the local attention kernel `auto` resolved to
    prompts: PromptCache              # contexts of recent prompt pairs
    text: Optional[PromptEncoder]     # kept loaded by `keep=True`; else dropped after the first pair
    keep: bool                        # many jobs: nothing is dropped after a job
    out_path: Optional[str] = None    # one-job runs: rank 0's checked output path
    cache: object = None              # one-job runs: the step cache settings the preflight checked
    prefetch: dict = field(default_factory=dict)  # how the DiT and VAE load went (prefetch.Loader)
    vae_later: bool = False           # the VAE loads while the video denoises (prefetch.vae_loads_later)

    @property
    def split_decode(self) -> bool:
        return vae_on_every_rank(self.cfg.vae, self.dims.world_size)


Stages = _Stages  # for the job loop (serve/loop.py): one per job


def _preflight(cfg, device: torch.device, job: bool = True):
    world, rank = job_size_rank()
    out = None
    if rank == 0:  # cheapest first
        out = check_writable(cfg.output.path) if job else None
        check_video_writer()
    check_text_encoder_layout(cfg.text_encoder, device, world)
    paths = model_paths_for(cfg.model)
    check_loras(cfg)
    check_layout(world, _ulysses(cfg), cfg.parallel.cfg_degree, paths.num_heads, ring_degree=cfg.parallel.ring_degree)
    kind = detect_kind(paths)
    cache = None
    if job:  # else every job is checked on its own (pipeline/job.py)
        check_inputs(kind, cfg)
        cache = settings_for_run(cfg, kind, paths)
    else:  # the experts are installed with the config's boundary
        boundary_ratio(kind, cfg.sample)
    shapes = shapes_of(paths, kind)  # read once: the plan and the geometry
    # from the config (diffusers' default 16 for the official Wan2.1_VAE.pth): the VAE itself may load
    # only after the denoise
    check_vae_channels(shapes.vae.get("z_dim", 16), shapes.dit.out_dim, paths)
    check_before_loading(cfg, device, world, rank, shapes)  # CUDA only: the plan against free memory
    if job and cfg.image is not None and rank == 0:  # rank 0 encodes it
        open_image(cfg.image)
    return paths, out, kind, shapes, cache


def _ulysses(cfg) -> int:
    p = cfg.parallel
    return resolve_ulysses_degree(job_size_rank()[0], p.ulysses_degree, p.cfg_degree, p.ring_degree)


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
    stages = _Stages(device)
    loaded = load_models(cfg, device, stages)
    return run_job(loaded, cfg, stages, started, loaded.out_path, progress=progress, keep_video=keep_video)


def load_models(cfg, device: torch.device, stages: "_Stages", keep: bool = False, prompt_cache: int = 0) -> Loaded:
    """Preflight, text encoder, DiT(s), VAE, layout: everything a job runs on (every rank calls this).

    keep=False (one job): `cfg` is that job; its prompts are encoded here and the encoder dropped
    (the DiT and VAE load alongside, prefetch.py), and `run_job` drops the DiT before decoding.
    keep=True (many jobs): the jobs are checked one by one, the encoder stays where
    `text_encoder.device` puts it, and the contexts of the last `prompt_cache` prompt pairs are kept.
    """
    world, rank = job_size_rank()
    dtype = DTYPES[cfg.model.dtype]
    split_decode = vae_on_every_rank(cfg.vae, world)

    with stages("preflight"):
        paths, out_path, kind, shapes, cache = agreed("preflight", lambda: _preflight(cfg, device, job=not keep))
        dims = ParallelDims(_ulysses(cfg), cfg.parallel.cfg_degree, timeout_s=cfg.comm.timeout_s,
                            ring_degree=cfg.parallel.ring_degree)
    log.info("layout: %d rank(s) = cfg %d x ulysses %d (%s) x ring %d, device %s, model %s", world, dims.cfg_degree,
             dims.ulysses_degree, cfg.parallel.a2a, dims.ring_degree, device, paths.root)

    # the DiT and VAE reads overlap the text stage (prefetch.py: no collective in the thread)
    geometry = video_geometry(kind, shapes.dit, cfg.sample)  # the kernel's warm-up shapes
    alongside = load_alongside_text(cfg, device, world, rank, shapes)
    prompts = PromptCache(prompt_cache if keep else 1)
    later = vae_loads_later(cfg, kind, keep)  # the VAE: while the video denoises (run_job), or with the DiT
    loader = None
    try:
        with stages("text"):
            import_shared_packages(vae=not later)  # before the thread starts (lazy imports race)
            loader = Loader(lambda: load_weights(cfg, paths, kind, device, dtype,
                                                 (rank == 0 or split_decode) and not later, dims, geometry),
                            device, alongside)
            text = PromptEncoder(cfg, paths, dims, device, dtype, keep=keep)
            if not keep:
                pair = prompt_pair(cfg)
                prompts.put(pair, text.encode(*pair))
                text.close()
                text = None
    except Exception:
        if loader is not None:
            loader.abandon()
        raise

    with stages("load"):
        models, vae, kernel = agreed("loading the DiT", loader.result)
        experts = install_experts(models, cfg, dims, device, boundary_ratio(kind, cfg.sample))
    return Loaded(cfg=cfg, device=device, dims=dims, paths=paths, kind=kind, shapes=shapes, models=models,
                  experts=experts, vae=vae, kernel=kernel, prompts=prompts, text=text, keep=keep, out_path=out_path,
                  cache=cache, prefetch=loader.summary(), vae_later=later)


def run_job(loaded: Loaded, cfg, stages: "_Stages", started: float, out_path: Optional[str], progress: bool = True,
            keep_video: bool = False, on_step=None) -> RunResult:
    """One video on the loaded models: `cfg` is the job's config (the loaded one with the job's prompt,
    seed, image, sample settings and output, checked: pipeline/job.py), `out_path` rank 0's checked
    output path. `on_step(step, num_steps)` runs on every rank after each denoising step (it may raise
    to stop the job, on every rank at the same step)."""
    world, rank = job_size_rank()
    device, dims, kind, vae, kernel, paths = (loaded.device, loaded.dims, loaded.kind, loaded.vae, loaded.kernel,
                                              loaded.paths)
    dtype = DTYPES[cfg.model.dtype]
    split_decode = loaded.split_decode
    experts = loaded.experts  # a job's sample settings may pick other guidance scales and boundary
    experts.guidance_scales, experts.boundary_timestep = expert_sampling(
        cfg.sample, len(experts.models), boundary_ratio(kind, cfg.sample))
    experts.num_switches = 0
    # the step cache's settings depend on the job's steps (a one-job run checked them in preflight)
    cache = loaded.cache if not loaded.keep else agreed("the step cache settings",
                                                         lambda: settings_for_run(cfg, kind, paths))

    pair = prompt_pair(cfg)
    contexts = loaded.prompts.get(pair)
    cached = contexts is not None
    if not cached:
        with stages("text"):
            contexts = loaded.text.encode(*pair)
        loaded.prompts.put(pair, contexts)

    s = cfg.sample
    shape = video_geometry(kind, loaded.shapes.dit, s).latent
    image = {}
    if needs_image_stage(kind, cfg):
        with stages("image"):
            image = image_inputs(cfg, kind, vae, shape, experts.config.condition_dim, device, dtype, world, rank)
    vae_loader = None
    if loaded.vae_later and (rank == 0 or split_decode):  # this rank decodes: its VAE loads in the GPU's shadow
        # decode only: Wan2.1's layout needs no diffusers (models/vae_decoder.py), so nothing to import first
        vae_loader = ShadowLoad(lambda: load_vae_checked(cfg, paths, kind, experts.config.out_dim, decode_only=True),
                                modules=() if decodes_without_diffusers(paths.vae) else VAE_IMPORTS)
    denoise_stats: dict = {}
    try:
        with stages("denoise"):
            latents = initial_latents(cfg.seed, shape, device)
            latents = denoise(experts, latents, contexts, cfg, dims, show_progress=progress and rank == 0,
                              stats=denoise_stats, cache=StepCache(cache, dims) if cache else None, on_step=on_step,
                              while_queued=vae_loader.step if vae_loader is not None else None, **image)
    except BaseException:
        if vae_loader is not None:
            vae_loader.abandon()  # no load outlives a failed run
        raise
    finally:
        if loaded.keep:  # the next job runs them again
            experts.park()
        else:
            experts.release()
    if loaded.vae_later:  # every rank agrees (a collective), also those that do not decode
        with stages("vae"):  # what was left of its load when the denoise ended
            vae = agreed("loading the VAE", vae_loader.result if vae_loader is not None else lambda: None)
    once = first_step_cost(denoise_stats["step_times_s"])
    if once["median_step_s"] is not None:
        log.info("denoise: %.3fs per step after the first, which took %.2fs more (compilation, first-use kernels)",
                 once["median_step_s"], once["first_step_extra_s"])
    lora_summary = [entry for m in loaded.models for entry in getattr(m, "lora_summary", [])]
    quant = quant_summary(loaded.models, cfg)
    prompt_tokens, cut_tokens = contexts.num_tokens, contexts.cut_tokens
    experts_summary = {"kind": kind.name, "boundary_source": kind.boundary_source, **experts.summary()}
    del experts, contexts, image
    if not loaded.keep:  # one job: the DiT's memory goes to the decode
        loaded.models = loaded.experts = None
        loaded.prompts.clear()
        if device.type == "cuda":
            torch.cuda.empty_cache()

    per_rank = all_gather_objects({"comm": {k: v.as_dict() for k, v in stages.comm.items()},
                                   "peak_memory": stages.memory.as_dict(), "times": dict(stages.times),
                                   "dit_forwards": denoise_stats["dit_forwards"],
                                   "host_rss": stages.memory.host_as_dict(),
                                   "cache": denoise_stats.pop("cache", None)}, world)  # in summary["cache"]
    result = RunResult(latents=latents.cpu())
    video, rows = None, [0] * world

    def decode(world_: int, rank_: int, on_frames=None):
        return decode_rows(vae, latents, device, cfg.vae, cfg.offload.vae, world_, rank_, on_frames)

    if split_decode:
        with stages("decode"):  # every rank decodes its band of rows; rank 0 gathers them
            piece, rows = agreed("decoding the video", lambda: decode(world, rank))
            video = gather_video(piece, rows, world, rank)
            del piece

    def finish():
        nonlocal video, rows
        if rank != 0:
            return
        streamed = 0
        if not split_decode:  # rank 0 alone, inside the heartbeat stage: the others wait on rank0_stage
            # the mp4 is encoded while the VAE decodes (video_stream.py), into a temporary file
            stream = outputs.open_video(s.fps, cfg.output.quality)
            with stages("decode"):
                piece, rows = decode(1, 0, on_frames=stream.put)
                video = gather_video(piece, rows, 1, 0)
                rows += [0] * (world - 1)
            streamed = stream.frames
            if streamed not in (0, video.shape[1]):
                raise RuntimeError(f"the decoder handed over {streamed} of the video's {video.shape[1]} frames")
        check_video(video)  # before the commit: a non-finite video stops the encoder, nothing is written
        with stages("write"):  # what is left of the encoding (all of it when nothing was streamed)
            check_ours(out_path)  # again: files may have appeared there during the run
            outputs.stage_video(None if streamed else to_uint8_frames(video), s.fps, cfg.output.quality)
        result.video = video if keep_video else None
        result.output_path = out_path
        result.summary = _summary(cfg, dims, device, paths, shape, stages, per_rank, started, out_path, kernel)
        result.summary["text"] = {"prompt_tokens": prompt_tokens, "text_len": cfg.text_encoder.text_len,
                                  "cut_tokens": cut_tokens}  # beyond text_len, per prompt (warned)
        if loaded.keep:  # many jobs: whether this pair's contexts came from the cache
            result.summary["text"]["prompt_cache"] = "hit" if cached else "miss"
        result.summary["denoise"] = {**denoise_stats, **once, "guidance_scale": s.guidance_scale,
                                     "classifier_free_guidance": uses_cfg(s),  # diffusers: guidance_scale > 1
                                     "dit_forwards_per_rank": [r["dit_forwards"] for r in per_rank],
                                     "note": "dit_forwards: DiT calls on rank 0 (one per step without CFG, two "
                                             "with sequential CFG, one per rank per step with cfg_degree 2)"}
        result.summary["lora"] = lora_summary
        result.summary["quant"] = quant
        result.summary["experts"] = experts_summary
        result.summary["cache"] = cache_summary(cache, [r["cache"] for r in per_rank], cfg, paths.as_dict())
        result.summary["vae"] = {"dtype": cfg.vae.dtype, "parallel": cfg.vae.parallel, "tiling": cfg.vae.tiling,
                                 "pixel_rows_per_rank": rows,
                                 "frames_encoded_while_decoding": streamed,  # the rest after the decode
                                 "module": None if vae is None else type(vae.vae).__name__}  # ours: WanVAEDecoder
        result.summary["memory_plan"] = plan_summary(cfg, world, shapes=loaded.shapes)
        result.summary["prefetch"] = {**loaded.prefetch, "vae_during_denoise": loaded.vae_later,
                                      **(vae_loader.summary() if vae_loader is not None else {"vae_load_s": None})}
        outputs.commit(result.summary)  # the summary, then the video: replaced together

    # the video and its summary replace the previous run's pair together; temporary files go on failure
    with OutputPair(out_path) if rank == 0 else contextlib.nullcontext() as outputs:
        rank0_stage("decoding and writing the video", finish, cfg.comm.timeout_s)  # heartbeat, not a timeout
    if rank == 0:
        log.info("wrote %s and %s", out_path, summary_path(out_path))
    return result


def package_versions() -> dict:
    """The versions that shape the numbers, from the installed metadata: importing diffusers only for
    its version would cost a run seconds of start-up."""
    from importlib.metadata import PackageNotFoundError, version

    out = {"torch": torch.__version__}
    for name in ("diffusers", "transformers", "tokenizers"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def _summary(cfg, dims, device, paths, shape, stages: _Stages, per_rank: list[dict], started: float,
             out_path: str, kernel: str) -> dict:
    s = cfg.sample
    return {
        "output_path": out_path,
        "summary_path": summary_path(out_path),
        "created": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "layout": {"world_size": dims.world_size, "ulysses_degree": dims.ulysses_degree,
                   "cfg_degree": dims.cfg_degree, "ring_degree": dims.ring_degree, "a2a": cfg.parallel.a2a,
                   "fuse_qkv": cfg.parallel.fuse_qkv,
                   "comm_dtype": cfg.parallel.comm_dtype, **effective_layout(cfg, device, kernel),
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
        "host_peak_rss_bytes": {"note": "peak resident set size of each rank's process (ru_maxrss) at the end of "
                                        "each stage: a running maximum since the process started, so a stage's "
                                        "value includes the stages before it",
                                "rank0": stages.memory.host_as_dict(), "per_rank": [r["host_rss"] for r in per_rank]},
        "comm": _comm_summary([r["comm"] for r in per_rank]),
        "versions": package_versions(),
        "config": to_dict(cfg),
    }
