"""The memory plan of a run: GPU and host bytes per rank and stage, before anything is loaded.

    python -m lightx2v_sp.generate --config X --plan [--gpus N] [--gpu-memory GiB]

Weights are counted exactly: every expert's modules are built on the meta device from the
checkpoint's own config files (plan_sizes.shapes_of; a repo id not in the cache fetches only those),
in the run's dtype, and placed as offload.dit places them. Latents and tokens come from
pipeline/geometry.py, the one function the runner uses too (the VAE strides of the model's kind).
Activations and the VAE decode are formulas calibrated on one H100 (BENCHMARKS.md, issue 12):

- DiT forward, bf16, per token held by the rank: (7.2 dim + 1.62 ffn_dim) values. Fitted to the
  activation peaks of Wan2.1-1.3B (1.56 GiB) and 14B (3.62 GiB) at 480p (32760 tokens, one rank):
  the mean of resident (4.21 / 30.27 GiB) and block offload (1.78 / 5.32 GiB) minus their weights.
- VAE decode: plan_sizes.vae_decode_bytes, the decoder's caches counted from its modules plus
  transient activations calibrated on the 480p fp32 whole-frame peak (9.26 GiB); it predicts
  20.75 GiB at 720p (measured 20.71) and half of both in bf16 (measured 4.63 / 10.36).

The plan of one rank is what the runner checks before loading (CUDA only, `memory_check`).
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Optional

import torch

from lightx2v_sp.config import uses_cfg

from .plan_sizes import (DTYPE_BYTES, GIB, Shapes, _numel, _t5_numel, dit_bytes, dit_numel,  # noqa: F401
                         model_shapes, shapes_of, shared_blocks_bytes, vae_decode_bytes)

from .models.quant import t5_bytes_per_param

log = logging.getLogger("lightx2v_sp")

# DiT activation values per local token: a * dim + b * ffn_dim (see the module doc)
DIT_ACT_DIM, DIT_ACT_FFN = 7.2, 1.62
# text encoder: per token, a few hidden states and one FFN intermediate are live at a time
T5_ACT_DMODEL, T5_ACT_FF = 8.0, 2.0
# fraction of a GPU the plan may fill: the CUDA context, allocator rounding and fragmentation need the rest
USABLE = 0.92


@dataclass
class StagePlan:
    stage: str
    gpu: dict = field(default_factory=dict)    # component -> bytes on the GPU at the stage's peak
    host: dict = field(default_factory=dict)   # component -> bytes of host memory held

    @property
    def gpu_total(self) -> int:
        return sum(self.gpu.values())

    @property
    def host_total(self) -> int:
        return sum(self.host.values())


@dataclass
class RankPlan:
    rank: int
    stages: list

    @property
    def gpu_peak(self) -> int:
        return max(s.gpu_total for s in self.stages)

    @property
    def host_peak(self) -> int:
        return max(s.host_total for s in self.stages)

    def peak_stage(self) -> StagePlan:
        return max(self.stages, key=lambda s: s.gpu_total)


# ------------------------------------------------------------------------------------------------
# one rank

def plan_rank(cfg, shapes: Shapes, world: int, rank: int) -> RankPlan:
    from lightx2v_sp.distributed import split_sizes
    from lightx2v_sp.distributed.mesh import resolve_ulysses_degree
    from lightx2v_sp.pipeline.decode import band_layout
    from lightx2v_sp.pipeline.geometry import video_geometry
    from lightx2v_sp.plan_vae_facts import vae_facts

    s = cfg.sample
    mb = DTYPE_BYTES[cfg.model.dtype]
    dit = shapes.dit
    geo = video_geometry(shapes.kind, dit, s)  # the runner's latents and tokens
    _, _, lat_h, lat_w = geo.latent
    ring = cfg.parallel.ring_degree
    ulysses = resolve_ulysses_degree(world, cfg.parallel.ulysses_degree, cfg.parallel.cfg_degree, ring)
    seq_sizes = geo.tokens_per_rank(ulysses * ring)  # over the sequence group (ulysses x ring)
    local_tokens = seq_sizes[rank % (ulysses * ring)]

    # text: the encoder on the GPU (gpu/swap) or the host (cpu) for this stage only
    te = cfg.text_encoder
    te_mode = te.parallel if world > 1 else "replicate"
    t5_numel = _t5_numel(shapes.t5, te_mode, world, rank)
    t5_bytes = int(t5_numel * t5_bytes_per_param(shapes.t5, t5_numel, mb, getattr(te, "quant", None)))
    prompts = 2 if uses_cfg(s) else 1
    t5_tokens = prompts * te.text_len
    if te_mode == "dp":
        t5_tokens = te.text_len * split_sizes(prompts, world)[rank]
    t5_act = t5_tokens * (T5_ACT_DMODEL * shapes.t5.d_model + T5_ACT_FF * shapes.t5.d_ff) * mb
    text = StagePlan("text")
    if te.device in ("gpu", "swap"):
        text.gpu["text encoder"] = t5_bytes
        text.gpu["text activations"] = int(t5_act)
    if te.device == "cpu":  # gpu and swap read it straight to the GPU (pipeline/text.py): no host copy
        text.host["text encoder"] = t5_bytes

    # denoise: every expert's weights where offload.dit puts them (pipeline/experts.py)
    sizes = [dit_bytes(c, cfg.model.dtype, getattr(cfg.model, "quant", None)) for c in shapes.experts]
    experts = f" ({len(sizes)} experts)" if len(sizes) > 1 else ""
    den = StagePlan("denoise")
    if cfg.offload.dit == "block":  # every expert's non-block part resident, two blocks of the active one
        den.gpu["DiT (non-block + 2 blocks)" + experts] = sum(b["other"] for b in sizes) + 2 * max(
            b["block"] for b in sizes)
        local = int(os.environ.get("LOCAL_WORLD_SIZE", world)) or 1
        if cfg.offload.share_host and local > 1 and rank % local:
            den.host["DiT blocks (local rank 0's pinned copy)"] = 0
        else:  # one copy per node (share_host), else one per rank
            den.host["DiT blocks, pinned" + experts] = sum(b["blocks"] for b in sizes)
    elif cfg.offload.dit == "swap":  # the active expert on the GPU, every expert pinned on the host
        den.gpu["DiT (active expert)"] = max(b["resident"] for b in sizes)
        den.host["DiT, pinned" + experts] = sum(b["resident"] for b in sizes)
    else:
        den.gpu["DiT" + experts] = sum(b["resident"] for b in sizes)
    den.gpu["DiT activations"] = int(local_tokens * (DIT_ACT_DIM * dit.dim + DIT_ACT_FFN * dit.ffn_dim) * mb)
    if cfg.cache.method != "none":
        from lightx2v_sp.pipeline.cache.policy import residual_bytes

        den.gpu["step cache residuals"] = residual_bytes(cfg, local_tokens, dit.dim, mb)
    if ring > 1:  # ring attention: K/V block buffers and the partial outputs until the merge
        from lightx2v_sp.attention.ring import ring_memory_bytes

        den.gpu["ring attention buffers"] = ring_memory_bytes(
            seq_sizes, ulysses, rank % (ulysses * ring) // ulysses,
            dit.num_heads // ulysses, dit.dim // dit.num_heads, mb, cfg.parallel.comm_dtype)

    # decode: this rank's bands (pipeline/decode.py's layout)
    vb = DTYPE_BYTES[cfg.vae.dtype]
    vfacts = vae_facts(shapes.vae)
    layout = band_layout(vfacts.unsupported, cfg.vae, lat_h, world)
    receive = 0
    if rank == 0 and world > 1:
        receive = max((geo.strides[1] * sum(b - a for a, b in bands) for bands in layout[1:]), default=0)
    vae = vae_decode_bytes(shapes.vae, (lat_h, lat_w), s.num_frames, vb, layout[rank], receive, geo.strides[1])
    dec = StagePlan("decode")
    on_gpu = cfg.offload.vae != "cpu"
    if layout[rank] and on_gpu:
        dec.gpu["VAE"] = vae["weights"]
        dec.gpu["VAE decode caches"] = vae["caches"]
        dec.gpu["VAE decode activations"] = vae["activations"]
        dec.gpu["video rows"] = vae["video"]
    vae_host = vfacts.numel * vb
    if layout[rank] or rank == 0:
        for st in (text, den, dec):
            st.host["VAE"] = vae_host  # loaded on the host, moved to the GPU for the decode
    if rank == 0:
        dec.host["video (fp32)"] = 3 * s.num_frames * s.height * s.width * 4
    for key in den.host:
        if key.startswith("DiT"):
            dec.host[key] = 0  # released before the decode
    return RankPlan(rank, [text, den, dec])


def make_plan(cfg, world: int, shapes: Optional[Shapes] = None) -> tuple[Shapes, list[RankPlan]]:
    shapes = shapes or model_shapes(cfg.model)
    return shapes, [plan_rank(cfg, shapes, world, r) for r in range(world)]


# ------------------------------------------------------------------------------------------------
# verdict and suggestions

def _gib(n: float) -> str:
    return f"{n / GIB:.2f}"


def fits(ranks: list[RankPlan], gpu_bytes: int) -> bool:
    return all(r.gpu_peak <= USABLE * gpu_bytes for r in ranks)


_FIXES = [  # (setting, overrides applied to a copy of the config)
    ("offload.dit=block", {"offload": {"dit": "block"}}),
    ("model.quant=fp8", {"model": {"quant": "fp8"}}),
    ("vae.dtype=bf16", {"vae": {"dtype": "bf16"}}),
    ("text_encoder.device=cpu", {"text_encoder": {"device": "cpu"}}),
    ("text_encoder.parallel=tp", {"text_encoder": {"parallel": "tp"}}),
]


def _with(cfg, changes: dict):
    import copy

    new = copy.deepcopy(cfg)
    for section, values in changes.items():
        for k, v in values.items():
            setattr(getattr(new, section), k, v)
    return new


def suggestions(cfg, world: int, gpu_bytes: int, shapes: Optional[Shapes] = None) -> list[str]:
    """Single config changes (and their combination) after which every rank fits, with its peak."""
    shapes = shapes or model_shapes(cfg.model)
    out, combined = [], {}
    candidates = list(_FIXES)
    for k in (2, 4, 8, 16):
        if cfg.vae.tiling < k:
            candidates.append((f"vae.tiling={k}", {"vae": {"tiling": k}}))
    for name, change in candidates:
        key, value = name.split("=")
        section, leaf = key.split(".")
        if str(getattr(getattr(cfg, section), leaf)) == value:
            continue
        if leaf == "parallel" and world == 1:
            continue
        new = _with(cfg, change)
        ranks = [plan_rank(new, shapes, world, r) for r in range(world)]
        peak = max(r.gpu_peak for r in ranks)
        if fits(ranks, gpu_bytes):
            out.append(f"set {name}: {_gib(peak)} GiB")
        if peak < max(plan_rank(cfg, shapes, world, r).gpu_peak for r in range(world)):
            for section, values in change.items():
                if section == "vae" and "tiling" in values and "tiling" in combined.get("vae", {}):
                    continue
                combined.setdefault(section, {}).update(values)
    if not out and combined:
        new = _with(cfg, combined)
        ranks = [plan_rank(new, shapes, world, r) for r in range(world)]
        settings = " ".join(f"{s}.{k}={v}" for s, kv in combined.items() for k, v in kv.items())
        verdict = "fits" if fits(ranks, gpu_bytes) else "still does not fit"
        out.append(f"set {settings}: {_gib(max(r.gpu_peak for r in ranks))} GiB ({verdict})")
    return out


def format_plan(cfg, shapes: Shapes, ranks: list[RankPlan], gpu_bytes: int, gpu_source: str) -> str:
    s = cfg.sample
    world = len(ranks)
    lines = [f"Memory plan: {shapes.name}; {s.num_frames}x{s.height}x{s.width}, {world} rank(s); "
             f"DiT {cfg.model.dtype}{' fp8' if getattr(cfg.model, 'quant', None) else ''}, offload.dit={cfg.offload.dit}, text_encoder={cfg.text_encoder.parallel}/"
             f"{cfg.text_encoder.device}, vae {cfg.vae.dtype} {cfg.vae.parallel} tiling={cfg.vae.tiling} "
             f"offload.vae={cfg.offload.vae}",
             f"GPU: {_gib(gpu_bytes)} GiB ({gpu_source}); a rank fits when its peak <= {USABLE:.0%} of it", "",
             "| rank | text GiB | denoise GiB | decode GiB | GPU peak GiB | host GiB | fits |",
             "|---:|---:|---:|---:|---:|---:|---|"]
    for r in ranks:
        cells = [_gib(st.gpu_total) for st in r.stages]
        ok = "yes" if r.gpu_peak <= USABLE * gpu_bytes else "NO"
        lines.append(f"| {r.rank} | {' | '.join(cells)} | {_gib(r.gpu_peak)} | {_gib(r.host_peak)} | {ok} |")
    lines += ["", "Rank 0 by stage and component (GiB, GPU / host):"]
    for st in ranks[0].stages:
        parts = [f"{k} {_gib(v)}" for k, v in st.gpu.items() if v]
        host = [f"{k} {_gib(v)}" for k, v in st.host.items() if v]
        lines.append(f"  {st.stage:8s} GPU {_gib(st.gpu_total):>6s}: {', '.join(parts) or '-'}"
                     f"   | host {_gib(st.host_total)}: {', '.join(host) or '-'}")
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    host_node = sum(r.host_peak for r in ranks[:local])
    lines.append(f"Host memory of one node ({local} local rank(s)): {_gib(host_node)} GiB")
    if fits(ranks, gpu_bytes):
        lines.append("Verdict: fits.")
    else:
        worst = max(ranks, key=lambda r: r.gpu_peak)
        fixes = suggestions(cfg, world, gpu_bytes, shapes)
        lines.append(f"Verdict: does NOT fit: rank {worst.rank} needs {_gib(worst.gpu_peak)} GiB in its "
                     f"{worst.peak_stage().stage} stage. " + ("; ".join(fixes) if fixes else
                                                             "no single setting fixes it; use more GPUs"))
    return "\n".join(lines)


def check_before_loading(cfg, device: torch.device, world: int, rank: int, shapes: Optional[Shapes] = None) -> None:
    """Raise ValueError when this rank's planned peak exceeds the device's free memory (CUDA only).

    `shapes`: what the run read from the checkpoint it resolved (plan_sizes.shapes_of); without them
    they are read here. A model whose size the plan cannot read is not checked: the plan advises, it
    never blocks a run it cannot size.
    """
    if device.type != "cuda" or not torch.cuda.is_available() or not getattr(cfg, "memory_check", True):
        return
    free, _ = torch.cuda.mem_get_info(device)
    try:
        shapes = shapes or model_shapes(cfg.model)
    except ValueError as e:
        log.info("memory plan skipped: %s", e)
        return
    mine = plan_rank(cfg, shapes, world, rank)
    if mine.gpu_peak <= USABLE * free:
        return
    fixes = suggestions(cfg, world, free, shapes)
    raise ValueError(f"rank {rank} needs about {_gib(mine.gpu_peak)} GiB of GPU memory in its "
                     f"{mine.peak_stage().stage} stage, but {device} has {_gib(free)} GiB free; "
                     + ("; ".join(fixes) if fixes else "no single setting fixes it; use more GPUs")
                     + " (python -m lightx2v_sp.generate --plan shows the plan; memory_check=false skips this)")


def gpu_memory_default(gpu_memory_gib: Optional[float]) -> tuple[int, str]:
    if gpu_memory_gib is not None:
        if gpu_memory_gib <= 0:
            raise ValueError(f"--gpu-memory {gpu_memory_gib} must be a positive number of GiB")
        return int(gpu_memory_gib * GIB), "--gpu-memory"
    if torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info()
        return free, f"free on {torch.cuda.get_device_name()}"
    return 24 * GIB, "assumed: an RTX 4090; --gpu-memory sets it"


def main_plan(cfg, gpus: Optional[int], gpu_memory_gib: Optional[float]) -> tuple[str, bool]:
    """The printed plan and whether it fits (the CLI's --plan)."""
    world = gpus if gpus is not None else int(os.environ.get("WORLD_SIZE", "1"))  # --gpus 0 is no "unset"
    if world < 1:
        raise ValueError(f"--gpus {world} must be >= 1")
    from lightx2v_sp.distributed.mesh import check_layout, resolve_ulysses_degree

    shapes = model_shapes(cfg.model)
    p = cfg.parallel
    check_layout(world, resolve_ulysses_degree(world, p.ulysses_degree, p.cfg_degree, p.ring_degree),
                 p.cfg_degree, shapes.dit.num_heads, ring_degree=p.ring_degree)
    gpu_bytes, source = gpu_memory_default(gpu_memory_gib)
    ranks = [plan_rank(cfg, shapes, world, r) for r in range(world)]
    return format_plan(cfg, shapes, ranks, gpu_bytes, source), fits(ranks, gpu_bytes)


def plan_summary(cfg, world: int, rank: int = 0, shapes: Optional[Shapes] = None) -> dict:
    """The plan's GPU bytes per stage of `rank`, for the run summary next to the measured peaks."""
    try:
        mine = plan_rank(cfg, shapes or model_shapes(cfg.model), world, rank)
    except ValueError as e:
        return {"note": f"no plan: {e}"}
    return {"note": f"lightx2v_sp.plan estimate for rank {rank}; compare with peak_memory_bytes",
            "gpu_bytes": {s.stage: s.gpu_total for s in mine.stages},
            "host_bytes": {s.stage: s.host_total for s in mine.stages}}
