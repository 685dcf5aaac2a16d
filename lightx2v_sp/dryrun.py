"""The dry run: everything a run does up to reading weights, at the checkpoint's real shapes, on a CPU.

    python -m lightx2v_sp.generate --config X --dry-run [--gpus N] [--gpu-memory GiB]

With the checkpoint's config files only (a repo id fetches just those, hub.CONFIG_PATTERNS; with
HF_HUB_OFFLINE=1 they come from the cache) it runs the run's own preflight (layout, text-encoder
layout, model paths, kind, inputs, LoRA files), derives the latent and token counts per rank, the
memory plan, and then, on the meta device (dryrun_meta.py): the text encoder on the prompt length,
each expert's LoRA keys against its layers at their shapes, one DiT block per expert at each rank's
token count, the placement of the experts (measured, and held against the plan), and the VAE
decode of each rank's band. It prints what it checked and exits 0, or prints one `error:` line
(status 2; 3 when a rank does not fit the GPU). No GPU, no weights, seconds per config.

Not checked (they need the weights or the run's files): tensor names and dtypes inside the weight
files, the tokenizer's ids against the vocabulary, the output path (a dry run creates no file).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Optional

import torch

from lightx2v_sp.config import uses_cfg

GIB = 1 << 30


@dataclass
class DryRunReport:
    config: str
    world: int
    gpu_bytes: int
    lines: list = field(default_factory=list)
    gpu_peaks: list = field(default_factory=list)   # planned GPU peak per rank
    host_peaks: list = field(default_factory=list)  # planned host bytes per rank
    fits: bool = True

    @property
    def peak(self) -> int:
        return max(self.gpu_peaks)

    def text(self) -> str:
        return "\n".join(self.lines)


def _gib(n: float) -> str:
    return f"{n / GIB:.2f}" if n >= GIB / 100 or n == 0 else f"{n / GIB:.2e}"


class _Step:
    """Names what is being checked, so an error says where it came from."""

    def __init__(self, lines: list):
        self.lines = lines

    def __call__(self, what: str, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except ValueError as e:
            raise ValueError(f"{what}: {e}") from None
        except (AssertionError, RuntimeError) as e:  # a shape check of the run's code, or a meta op's
            raise ValueError(f"{what}: {type(e).__name__}: {e}") from None

    def ok(self, text: str) -> None:
        self.lines.append(f"  ok  {text}")


def dry_run(cfg, world: int, gpu_bytes: int, gpu_source: str = "", name: str = "") -> DryRunReport:
    """Every check of the module doc for `world` ranks against GPUs of `gpu_bytes`; a ValueError names
    the first one that fails. The report holds the printed lines and the plan's peaks per rank."""
    from lightx2v_sp.distributed.mesh import check_layout, resolve_ulysses_degree
    from lightx2v_sp.pipeline.image import open_image
    from lightx2v_sp.pipeline.kind import boundary_ratio, check_inputs, detect_kind
    from lightx2v_sp.pipeline.cache import settings_for_run
    from lightx2v_sp.pipeline.experts import shared_copy_bytes
    from lightx2v_sp.pipeline.geometry import video_geometry
    from lightx2v_sp.pipeline.loras import check_loras
    from lightx2v_sp.pipeline.output import check_video_writer
    from lightx2v_sp.pipeline.paths import model_paths_for
    from lightx2v_sp.pipeline.text import check_text_encoder_layout
    from lightx2v_sp.plan import fits, plan_rank, shapes_of

    from . import dryrun_meta as dm

    if world < 1:
        raise ValueError(f"--gpus {world} must be >= 1")
    report = DryRunReport(name, world, gpu_bytes)
    step = _Step(report.lines)
    s, par = cfg.sample, cfg.parallel
    report.lines.append(f"Dry run: {name or 'config'} on {world} rank(s), no weights, meta device")

    # -- the run's preflight (pipeline/runner.py _preflight), on CUDA, without reading weights
    step("the video writer", check_video_writer)
    step("the text encoder layout", check_text_encoder_layout, cfg.text_encoder, torch.device("cuda"), world)
    paths = step("the model's files", model_paths_for, cfg.model, weights=False)
    step("the LoRA files", check_loras, cfg)
    ring = par.ring_degree
    ulysses = resolve_ulysses_degree(world, par.ulysses_degree, par.cfg_degree, ring)
    step("the layout", check_layout, world, ulysses, par.cfg_degree, paths.num_heads, ring_degree=ring)
    kind = step("the model kind", detect_kind, paths)
    step("the inputs", check_inputs, kind, cfg)
    step("the step cache settings", settings_for_run, cfg, kind, paths)
    if cfg.image is not None:
        step("the image", open_image, cfg.image)
    shapes = step("the model's configs", shapes_of, paths, kind)
    configs = shapes.experts
    step.ok(f"model {cfg.model.path or 'tiny'} -> {paths.root} ({paths.dit_layout} layout): {kind.name}, "
            f"{len(configs)} expert(s) of {configs[0].num_layers} blocks, dim {configs[0].dim}, "
            f"{configs[0].num_heads} heads, VAE strides {kind.vae_strides}")
    step.ok(f"layout: cfg {par.cfg_degree} x ulysses {ulysses}" + (f" x ring {ring}" if ring > 1 else "") +
            f" = {world} rank(s), {configs[0].num_heads} heads -> {configs[0].num_heads // ulysses} per rank")

    # -- latents and tokens (the runner's geometry)
    geo = step("the latent shape", video_geometry, kind, configs[0], s)
    latent, sizes = geo.latent, geo.tokens_per_rank(ulysses * ring)  # over the sequence group
    step.ok(f"video {s.num_frames}x{s.height}x{s.width} -> latents {list(latent)} -> tokens {list(geo.grid)} = "
            f"{geo.tokens}, per rank {sorted(set(sizes), reverse=True)}")

    # -- the memory plan of every rank
    ranks = step("the memory plan", lambda: [plan_rank(cfg, shapes, world, r) for r in range(world)])
    report.gpu_peaks = [r.gpu_peak for r in ranks]
    report.host_peaks = [r.host_peak for r in ranks]
    report.fits = fits(ranks, gpu_bytes)

    # -- text encoder on the prompt length (the tokenizer's, where its files are here; else text_len,
    # the most the encoder sees: every prompt is cut or padded to it)
    te = cfg.text_encoder
    prompts = 2 if uses_cfg(s) else 1
    lengths = step("the tokenizer", _prompt_lengths, paths.tokenizer, [cfg.prompt, cfg.negative_prompt][:prompts],
                   te.text_len)
    if te.parallel == "tp" and world > 1:
        from lightx2v_sp.models.t5 import T5Shard

        for r in range(world):
            step("the UMT5 tensor-parallel shard", T5Shard(r, world).check, shapes.t5)
    encoded = max(lengths) if lengths else te.text_len  # replicate/tp skip the columns of padding only
    context = step("the text encoder forward", dm.text_forward, shapes.t5, prompts, encoded)
    for c in configs:
        if context.shape[-1] != c.text_dim:
            raise ValueError(f"the text encoder gives {context.shape[-1]}-wide tokens, the DiT takes text_dim="
                             f"{c.text_dim}; they are not one model")
    measured = f"prompt tokens {lengths}" if lengths else "no tokenizer files here: text_len"
    step.ok(f"text encoder ({te.parallel}, {te.device}): {prompts} prompt(s) x {encoded} tokens ({measured}) -> "
            f"{list(context.shape)}, each padded to [1, {te.text_len}, {context.shape[-1]}] for the DiT")

    # -- LoRA keys against each expert's layers, at their shapes
    if cfg.lora:
        names = [None] if len(configs) == 1 else ["high_noise", "low_noise"]
        for c, expert in zip(configs, names):
            summary = step("the LoRA keys", _match_loras, cfg, c, expert)
            step.ok(f"LoRA ({expert or 'the DiT'}): " + ", ".join(f"{os.path.basename(e['path'])} updates "
                                                                  f"{e['tensors_updated']} tensors" for e in summary))

    # -- one DiT block per expert at each rank's token count
    x, timestep, image_context = _dit_inputs(cfg, kind, configs[0], latent)
    ctx = dm.meta((1, te.text_len, context.shape[-1]), dm.DTYPES[cfg.model.dtype])
    seen = {}
    for i, c in enumerate(configs):
        for r in range(ulysses * ring):
            key = (i, sizes[r], r == 0, r == ulysses * ring - 1)
            if key in seen:
                continue
            out = step(f"the DiT forward (expert {i}, rank {r})", dm.dit_forward, c, cfg.model.dtype, x, timestep,
                       ctx, image_context, sizes, r, quant=cfg.model.quant, ulysses=ulysses)
            if tuple(out.shape) != (1, *latent):
                raise ValueError(f"the DiT (expert {i}) returned {list(out.shape)} for latents {[1, *latent]}")
            seen[key] = True
    step.ok(f"DiT: {len(configs)} expert(s), one block each at {sorted(set(sizes))} tokens per rank "
            f"(x {list(x.shape)}, timesteps {list(timestep.shape)}) -> {[1, *latent]}")

    # -- where the experts' weights are while denoising, measured, against the plan
    placed = step("the DiT placement", dm.observe_placement, configs, cfg, boundary_ratio(kind, s))
    if cfg.offload.dit == "block" and cfg.offload.share_host and min(world, 8) > 1:
        counted = step("the shared host copy's size", shared_copy_bytes, kind.experts, cfg)
        arenas = sum(placed["block_arenas"])
        if counted < arenas:
            raise ValueError(f"the /dev/shm check of offload.share_host counts {_gib(counted)} GiB, but the shared "
                             f"host copy of {len(configs)} expert(s) holds {_gib(arenas)} GiB of blocks; local ranks "
                             "would skip reading blocks that /dev/shm cannot hold")
        step.ok(f"shared host copy: {_gib(arenas)} GiB of blocks for {len(configs)} expert(s), counted "
                f"{_gib(counted)} GiB before the first is made")
    _check_placement(cfg, ranks[0], placed, step, configs)

    # -- the VAE decode of each rank's band
    for r in range(world):
        piece, rows = step(f"the VAE decode (rank {r})", dm.vae_decode, shapes.vae, cfg.vae, latent, world, r)
        frames = min(latent[1], dm.DECODE_FRAMES)
        if piece is not None and (piece[2], piece[4]) != (1 + geo.strides[0] * (frames - 1), s.width):
            raise ValueError(f"the VAE decode of rank {r} gives {list(piece)}, the video is "
                             f"{s.num_frames}x{s.height}x{s.width}")
        if sum(rows) != s.height or (piece is not None and piece[3] != rows[r]):
            raise ValueError(f"the VAE bands give {rows} pixel rows per rank, the video has {s.height}")
    step.ok(f"VAE decode ({cfg.vae.dtype}, {cfg.vae.parallel}, tiling {cfg.vae.tiling}) of each rank's band, "
            f"{frames} of {latent[1]} latent frames at full size: pixel rows per rank {rows}")

    report.lines += ["", *_stage_order(cfg, kind, world, len(configs), rows), "",
                     _plan_lines(report, ranks, gpu_source)]
    return report


def _prompt_lengths(tokenizer_dir: str, prompts: list, text_len: int) -> Optional[list]:
    """Tokens per prompt (at most text_len) where the tokenizer's vocabulary files are here; None where only
    its config is (the configs-only cache)."""
    from lightx2v_sp.models.t5 import load_tokenizer, tokenize
    from lightx2v_sp.models.t5.tokenizer import WAN_TOKENIZER_SUBDIR

    nested = os.path.join(tokenizer_dir, WAN_TOKENIZER_SUBDIR)
    where = nested if os.path.isdir(nested) else tokenizer_dir
    if not any(os.path.isfile(os.path.join(where, f)) for f in ("tokenizer.json", "spiece.model")):
        return None
    _, mask = tokenize(load_tokenizer(tokenizer_dir), prompts, text_len)
    return [int(n) for n in mask.sum(dim=1)]


def _dit_inputs(cfg, kind, config, latent):
    """The DiT's inputs as the runner builds them: noise (+ the I2V condition), timesteps (per token for
    a TI2V first frame), the CLIP tokens of Wan2.1 I2V."""
    from lightx2v_sp.pipeline.clip import clip_token_shape
    from lightx2v_sp.pipeline.denoise import token_timesteps, with_first_frame

    from .dryrun_meta import DTYPES as dts, meta

    latents = meta((1, *latent))
    timestep = meta((1,))
    x = latents
    if kind.image_input:
        x = torch.cat([latents, meta((1, config.condition_dim, *latent[1:]))], dim=1)
    if kind.first_frame and cfg.image is not None:
        x = with_first_frame(latents, meta((1, latent[0], 1, *latent[2:])))
        timestep = token_timesteps(timestep, latents.shape[2:], config.patch_size)
    image_context = None
    if kind.image_encoder is not None:
        image_context = meta((1, *clip_token_shape(kind.image_encoder)), dts[cfg.model.dtype])
    return x, timestep, image_context


def _match_loras(cfg, config, expert):
    """merge_lora on a meta expert with the files' tensors as meta tensors of their shapes (alphas read)."""
    from lightx2v_sp.models.wan.lora import LoraEntry, merge_lora, resolve_lora_file, select_loras
    from lightx2v_sp.pipeline.loras import lora_path

    from .dryrun_meta import meta_dit

    model = meta_dit(config, cfg.model.dtype, quant=cfg.model.quant)
    chosen = select_loras(cfg.lora, expert)
    files = [resolve_lora_file(lora_path(e.path, cfg)) for e in chosen]
    entries = []
    for path, e in zip(files, chosen):
        tensors, metadata = _lora_shapes(path)
        entries.append(LoraEntry(tensors, e.scale, e.expert, metadata))
    summary = merge_lora(model, entries, device=torch.device("meta"), expert=expert)
    return [dict(item, path=path) for item, path in zip(summary, files)]


def _lora_shapes(path: str):
    """The tensors of a LoRA file as meta tensors (only the header is read), alphas as values."""
    import json

    from safetensors import safe_open

    from .dryrun_meta import meta

    if not path.endswith(".safetensors"):  # a torch state dict has no header to read alone
        from lightx2v_sp.models.wan.lora import read_lora_file

        return read_lora_file(path)
    dt = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64}
    with safe_open(path, framework="pt", device="cpu") as f:
        raw = (f.metadata() or {}).get("lora_adapter_metadata")
        tensors = {}
        for k in f.keys():
            if k.endswith(".alpha"):
                tensors[k] = f.get_tensor(k)
            else:
                sl = f.get_slice(k)
                tensors[k] = meta(sl.get_shape(), dt.get(sl.get_dtype(), torch.float32))
    return tensors, (json.loads(raw) if raw else None)


def _plan_entries(stage, what: str, prefix: str = "DiT") -> int:
    return sum(v for k, v in getattr(stage, what).items() if k.startswith(prefix) and "activations" not in k)


def _check_placement(cfg, rank0, placed: dict, step: _Step, configs) -> None:
    """The plan's DiT bytes on the GPU and in pinned host memory against what the placement code holds."""
    den = next(st for st in rank0.stages if st.stage == "denoise")
    planned_gpu, planned_host = _plan_entries(den, "gpu"), _plan_entries(den, "host")
    measured_gpu, measured_host = placed["device_peak"], placed["host_pinned"]
    for what, planned, measured in (("on the GPU", planned_gpu, measured_gpu),
                                    ("in pinned host memory", planned_host, measured_host)):
        if abs(planned - measured) > 0.02 * max(measured, planned) + (1 << 20):
            raise ValueError(f"the memory plan counts {_gib(planned)} GiB of DiT weights {what} while denoising, "
                             f"but offload.dit={cfg.offload.dit} places {_gib(measured)} GiB there for "
                             f"{len(configs)} expert(s) (measured on the meta device)")
    step.ok(f"DiT placement (offload.dit={cfg.offload.dit}): {_gib(measured_gpu)} GiB on the GPU, "
            f"{_gib(measured_host)} GiB pinned on the host, {placed['switches']} expert switch(es); the plan agrees")


def _stage_order(cfg, kind, world: int, experts: int, rows: list) -> list[str]:
    """The run's stages in order, with where each component is."""
    from lightx2v_sp.pipeline.conditioning import needs_image_stage
    from lightx2v_sp.pipeline.decode import vae_on_every_rank

    te, off = cfg.text_encoder, cfg.offload
    out = ["Stages (in order):",
           "  preflight  layout, model files, kind, inputs, LoRA files, memory plan against free memory",
           f"  text       tokenizer, UMT5 {te.parallel if world > 1 else 'replicate'} "
           f"(text_encoder.device={te.device}), then freed",
           f"  load       DiT x{experts} (offload.dit={off.dit}{', LoRA merged' if cfg.lora else ''}), VAE on "
           f"{'every rank' if vae_on_every_rank(cfg.vae, world) else 'rank 0'} (on the host until used)"]
    if needs_image_stage(kind, cfg):
        clip = ", CLIP" if kind.image_encoder is not None else ""
        out.append(f"  image      rank 0 encodes the image (VAE{clip}), broadcasts the condition")
    out += [f"  denoise    {cfg.sample.steps} steps, cfg {cfg.parallel.cfg_degree} x ulysses "
            f"{world // cfg.parallel.cfg_degree}" + (", two experts" if experts == 2 else ""),
            f"  decode     VAE {cfg.vae.dtype} (offload.vae={off.vae}): pixel rows per rank {rows}, rank 0 gathers",
            "  write      rank 0: mp4 + JSON summary"]
    return out


def _plan_lines(report: DryRunReport, ranks, gpu_source: str) -> str:
    from lightx2v_sp.plan import USABLE

    worst = max(ranks, key=lambda r: r.gpu_peak)
    verdict = "fits" if report.fits else "does NOT fit"
    peaks = sorted({_gib(p) for p in report.gpu_peaks}, key=float, reverse=True)
    return (f"Memory plan: GPU peak per rank {' / '.join(peaks)} GiB (rank {worst.rank}: "
            f"{worst.peak_stage().stage}); host {_gib(max(report.host_peaks))} GiB per rank at most; "
            f"{verdict} {_gib(report.gpu_bytes)} GiB ({gpu_source or 'given'}; usable {USABLE:.0%})")


def intended_world(cfg) -> int:
    """The ranks a config is laid out for: WORLD_SIZE under torchrun, else cfg_degree x ulysses_degree x
    ring_degree (ulysses_degree 0, "all ranks": 2 per CFG group, as the README's torchrun command runs it)."""
    if "WORLD_SIZE" in os.environ:
        return int(os.environ["WORLD_SIZE"])
    return cfg.parallel.cfg_degree * (cfg.parallel.ulysses_degree or 2) * cfg.parallel.ring_degree


# the card a shipped config is written for, by a part of its name (`..._4090x8.yaml`,
# `..._4090x8_offload.yaml`); the others are for 80 GB GPUs
CARD_GIB = {"4090": 24}
DEFAULT_CARD_GIB = 80


def card_gib(config_name: str) -> int:
    parts = os.path.splitext(os.path.basename(config_name))[0].split("_")
    return next((gib for key, gib in CARD_GIB.items() if any(p.startswith(key) for p in parts)), DEFAULT_CARD_GIB)


def check_configs(config_paths, overrides=lambda name: []) -> list[tuple]:
    """Dry-run each config at its intended world size against its card, in this process:
    rows (config, world size, peak per rank GiB, card GiB, fits). A failing check raises, naming the config."""
    from lightx2v_sp.config import load_config

    rows = []
    for path in config_paths:
        name = os.path.basename(path)
        cfg = load_config(path, list(overrides(name)))
        card = card_gib(name)
        try:
            report = dry_run(cfg, intended_world(cfg), card * GIB, f"the card of {name}", name)
        except ValueError as e:
            raise ValueError(f"{name}: {e}") from None
        rows.append((name, report.world, round(report.peak / GIB, 2), card, "yes" if report.fits else "NO"))
    return rows


def format_rows(rows) -> str:
    lines = ["| config | world size | peak per rank GiB | card GiB | fits |", "|---|---:|---:|---:|---|"]
    lines += [f"| {n} | {w} | {p:.2f} | {c} | {f} |" for n, w, p, c, f in rows]
    return "\n".join(lines)


def main_dry_run(cfg, gpus: Optional[int], gpu_memory_gib: Optional[float], name: str = "") -> tuple[str, bool]:
    """The printed dry run and whether every rank fits (the CLI's --dry-run)."""
    from lightx2v_sp.plan import gpu_memory_default

    world = gpus if gpus is not None else intended_world(cfg)
    gpu_bytes, source = gpu_memory_default(gpu_memory_gib)
    report = dry_run(cfg, world, gpu_bytes, source, name)
    return report.text(), report.fits
