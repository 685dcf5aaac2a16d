"""The typed config tree: dataclasses are the omegaconf schema; YAML + `key=value` overrides.

Every field carries a one-line doc in `metadata["doc"]`; `describe()` prints them all.
Unknown keys, wrong types and values outside a field's choices are `ValueError`s that name the
key (with a "did you mean" hint for typos).
"""
from __future__ import annotations

import difflib
import math
import re
from dataclasses import MISSING, asdict, dataclass, field, fields, is_dataclass
from typing import Any, List, Optional, Sequence

import yaml
from omegaconf import MISSING as REQUIRED
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from lightx2v_sp.attention.names import BACKEND_CHOICES
from lightx2v_sp.distributed.collectives import A2A_METHODS
from lightx2v_sp.distributed.wire import COMM_DTYPES

from .config_raw import is_optional, is_string_field, override_text, yaml_strings


def _f(default: Any, doc: str, choices: Sequence[Any] | None = None):
    meta = {"doc": doc}
    if choices is not None:
        meta["choices"] = tuple(choices)
    return field(default=default, metadata=meta)


@dataclass
class ModelConfig:
    path: Optional[str] = _f(None, "Wan2.1 model directory (official or diffusers layout) or Hugging Face repo id "
                                   "(org/name, fetched into HF_HUB_CACHE); null = embedded tiny model")
    revision: Optional[str] = _f(None, "branch, tag or commit of a repo id in model.path; null = main")
    dtype: str = _f("bf16", "compute dtype of the DiT and text encoder", ["bf16", "fp16", "fp32"])
    text_encoder_path: Optional[str] = _f(None, "UMT5 checkpoint (HF dir or official .pth; or repo id[/subfolder]); "
                                                "null = found under model.path")
    tokenizer_path: Optional[str] = _f(None, "tokenizer directory (or repo id[/subfolder]); "
                                             "null = found under model.path")
    vae_path: Optional[str] = _f(None, "VAE (diffusers dir or official Wan2.1_VAE.pth; or repo id[/subfolder]); "
                                       "null = found under model.path")
    tiny: str = _f("wan2.1-t2v", "which embedded tiny model model.path=null means (tests, CPU demos)",
                   ["wan2.1-t2v", "wan2.1-i2v", "wan2.2-t2v-a14b", "wan2.2-i2v-a14b", "wan2.2-ti2v-5b"])
    compile: bool = _f(False, "torch.compile the DiT blocks: ~1.12x faster forward on an H100 (BENCHMARKS.md); "
                              "the first step pays the compilation")
    quant: Optional[str] = _f(None, "DiT weights: null = the compute dtype; fp8 = the block linears in e4m3 with "
                                    "fp32 per-output-channel scales (half the bytes; FP8 GEMM with per-token "
                                    "activation scales on sm89+ in bf16, else weight-only). Full-precision "
                                    "checkpoints are quantized while they load; fp8 files (model.dit_path) load "
                                    "as they are", [None, "fp8"])
    fp8_accum: str = _f("exact", "model.quant=fp8, FP8 GEMM path: exact = fp32 accumulation (Hopper's periodic "
                                 "promotion); fast = the tensor cores' own accumulator, opt-in: 6% faster CFG "
                                 "step at 14B 480p on an H100, relative L2 against bf16 0.0717 instead of "
                                 "0.0698 (BENCHMARKS.md, FP8 weights)", ["exact", "fast"])
    dit_path: Optional[str] = _f(None, "DiT weights from another file or directory (.safetensors: a community "
                                       "fp8 / scaled_fp8 / ComfyUI / LightX2V file, any prefix); the config, text "
                                       "encoder and VAE still come from model.path. Two-expert models: the "
                                       "high-noise expert's. null = the DiT under model.path")
    dit_path_2: Optional[str] = _f(None, "two-expert models (Wan2.2 A14B): the low-noise expert's weights, with "
                                         "model.dit_path the high-noise one's")


@dataclass
class SampleConfig:
    steps: int = _f(50, "number of denoising steps")
    guidance_scale: float = _f(5.0, "classifier-free guidance scale; <= 1 turns guidance off (diffusers' rule): one "
                                     "DiT forward per step, no negative prompt encoded")
    guidance_scale_2: Optional[float] = _f(None, "two-expert models: guidance scale of the low-noise expert "
                                                 "(guidance_scale is the high-noise one's); null = guidance_scale. "
                                                 "Used only when guidance_scale > 1 turns guidance on")
    boundary_ratio: Optional[float] = _f(None, "two-expert models: the high-noise expert runs while timestep >= "
                                               "boundary_ratio x 1000; null = from the checkpoint")
    shift: float = _f(5.0, "flow-matching timestep shift (Wan: 5.0 at 720p, 3.0 at 480p)")
    scheduler: str = _f("unipc", "sampler: UniPC in flow mode or flow-match Euler (step-distilled models: euler)",
                        ["unipc", "euler"])
    timesteps: Optional[List[float]] = _f(None, "explicit step list in (0, 1000], decreasing, shifted by `shift` "
                                                "like the default schedule (distilled Wan: [1000, 750, 500, 250]); "
                                                "its length must equal `steps`; null = `steps` evenly spaced")
    height: int = _f(480, "video height in pixels (multiple of 16)")
    width: int = _f(832, "video width in pixels (multiple of 16)")
    num_frames: int = _f(81, "number of frames (4k + 1)")
    fps: int = _f(16, "frames per second of the written mp4")
    image_resize: str = _f("stretch", "how the I2V image meets height x width: stretch (diffusers' default) or "
                                      "crop (keep the aspect ratio, scale to cover, cut the centre)",
                           ["stretch", "crop"])


@dataclass
class ParallelConfig:
    ulysses_degree: int = _f(0, "ranks that split the token sequence (Ulysses, contiguous ranks); "
                                "0 = auto: every rank that cfg_degree and ring_degree leave")
    cfg_degree: int = _f(1, "1, or 2 to run the conditional and unconditional passes on two rank groups", [1, 2])
    a2a: str = _f("all_to_all", "Ulysses exchange: one all_to_all_single, or pairwise round-robin (PCIe)",
                  A2A_METHODS)
    fuse_qkv: bool = _f(True, "move q, k and v in one collective per direction")
    comm_dtype: Optional[str] = _f(None, "null = send in compute dtype; fp8 = e4m3 payload + scales in one buffer "
                                         "(the Ulysses exchanges and the ring's K/V blocks)", COMM_DTYPES)
    ring_degree: int = _f(1, "ring attention over groups of ulysses_degree ranks (USP): world = cfg x ulysses x "
                             "ring; K/V blocks pass to one neighbour at a time. For more GPUs than heads, or a "
                             "slow link between nodes (the ring crosses it, Ulysses stays inside a node)")


@dataclass
class AttentionConfig:
    backend: str = _f("auto", "local attention kernel: auto = the fastest exact one installed for the GPU "
                              "(FlashAttention-4, -3, cuDNN SDPA, FlashAttention-2, SDPA); flash_attn = the best "
                              "installed FlashAttention; sdpa_* pin one of PyTorch's SDPA implementations; "
                              "sage is quantized (lossy) and runs only when named", BACKEND_CHOICES)
    warmup: bool = _f(True, "call the kernel once on the run's shapes while the text stage runs: FlashAttention-4 "
                            "compiles there (or loads from its disk cache) instead of in step 1, and is checked "
                            "against SDPA (auto falls back when it fails)")


@dataclass
class TextEncoderConfig:
    parallel: str = _f("replicate", "UMT5 layout over the ranks", ["replicate", "tp", "dp"])
    device: str = _f("gpu", "where the encoder runs: gpu or swap (read from disk straight to the GPU for the text "
                            "stage, freed after it: the same in a one-shot run) or cpu", ["gpu", "cpu", "swap"])
    text_len: int = _f(512, "tokens per prompt (Wan2.1 uses 512)")
    quant: Optional[str] = _f(None, "null = the compute dtype; fp8 = UMT5's block linears in e4m3 with fp32 "
                                    "per-output-channel scales, weight-only (dequantized per layer; it runs once "
                                    "per prompt): about half of its 11 GB", [None, "fp8"])


@dataclass
class ImageEncoderConfig:
    device: str = _f("gpu", "Wan2.1 I2V's CLIP image encoder (rank 0 encodes, broadcasts): gpu, cpu (runs there) "
                            "or swap (GPU only for its stage)", ["gpu", "cpu", "swap"])


@dataclass
class OffloadConfig:
    dit: str = _f("none", "DiT weights: resident, per-block from pinned CPU memory with prefetch, or swap (pinned "
                          "CPU memory, on the GPU only while it denoises: the idle expert of a two-expert model "
                          "stays on the host)", ["none", "block", "swap"])
    vae: str = _f("gpu", "where the VAE lives: gpu, cpu or swap", ["gpu", "cpu", "swap"])
    share_host: bool = _f(True, "with dit=block, the ranks of one node share one pinned host copy of the blocks "
                                "(POSIX shared memory in /dev/shm) instead of one copy each")


@dataclass
class VaeConfig:
    dtype: str = _f("fp32", "VAE decode dtype: fp32, or bf16 (about half the decode memory and time)", ["fp32", "bf16"])
    parallel: str = _f("split", "split: every rank decodes a band of latent rows (exact: halos, no blending) and "
                                "rank 0 gathers the video; rank0: rank 0 decodes alone", ["split", "rank0"])
    tiling: int = _f(1, "row bands each decoding rank works through one after another (exact, like split); "
                        ">1 lowers the decode peak on one GPU at the cost of recomputing the halo rows")


@dataclass
class CommConfig:
    symmetric_memory: bool = _f(False, "allocate text-encoder collective buffers from NCCL symmetric memory")
    timeout_s: int = _f(600, "collective timeout in seconds; a dead rank fails the job instead of hanging")


@dataclass
class LoraConfig:
    path: str = _f(REQUIRED, "LoRA file (.safetensors, or a directory holding one): diffusers/PEFT, official/"
                            "ComfyUI or kohya (lora_unet_) keys; `tiny` = the embedded tiny model's LoRA")
    scale: float = _f(1.0, "strength: the file's update (after its alpha / rank) is multiplied by this")
    expert: Optional[str] = _f(None, "two-expert models (Wan2.2 A14B): the expert it applies to; null = every "
                                     "expert (a one-DiT model accepts only null)", [None, "high_noise", "low_noise"])


@dataclass
class CacheConfig:
    method: str = _f("none", "step caching: skip the DiT's blocks at steps where their output is predicted to change "
                             "little and reuse the last residual (per guidance branch, the same decision on every "
                             "rank). teacache and magcache use published Wan2.1 values (T2V 1.3B/14B, I2V 480p/720p)",
                     ["none", "teacache", "magcache", "first_block"])
    threshold: Optional[float] = _f(None, "skip while the method's change measure stays below this (0 = never skip); "
                                          "null = the published value for the model (teacache 0.08 T2V-1.3B, 0.2 "
                                          "T2V-14B, 0.26 I2V-480p, 0.3 I2V-720p; magcache 0.12 / 0.24; first_block "
                                          "0.05)")
    start_steps: Optional[int] = _f(None, "steps always computed at the start; null = the method's (teacache 1, 5 "
                                          "with teacache_ret_steps; magcache 20% of the steps; first_block 1)")
    end_steps: Optional[int] = _f(None, "steps always computed at the end; null = the method's (teacache 1, 0 with "
                                        "teacache_ret_steps; magcache 0; first_block 1)")
    max_skips: Optional[int] = _f(None, "most consecutive skipped steps per branch; null = the method's (magcache's "
                                        "published K: 4 for T2V-1.3B, 6 for 14B; none for the others)")
    teacache_ret_steps: bool = _f(False, "TeaCache's use_ret_steps mode: measure the time projection (e0) instead of "
                                         "the time embedding, with its own published coefficients")
    coefficients: Optional[List[float]] = _f(None, "TeaCache rescale polynomial (highest power first) for a model "
                                                    "without published ones, or to override them")
    ratios: Optional[str] = _f(None, "MagCache per-step ratios file (JSON) for a model without published ratios; "
                                     "with calibrate=true, the file the calibration writes")
    calibrate: bool = _f(False, "magcache: compute every step and write this model's per-step magnitude ratios to "
                                "cache.ratios, for later runs to read")


@dataclass
class OutputConfig:
    path: str = _f("outputs/video.mp4", "mp4 written by rank 0 (atomically); a .json summary goes next to it")
    quality: int = _f(8, "H.264 quality of the mp4, 1-9 (imageio's scale: x264 crf = 51 x (1 - quality / 10)): "
                         "8 = crf 10, near lossless, large files; 5 = crf 25, diffusers' export_to_video default: "
                         "a fraction of the bytes and a faster write (BENCHMARKS.md, Time to video)")


@dataclass
class ServeConfig:
    host: str = _f("127.0.0.1", "address the HTTP server (python -m lightx2v_sp.serve) binds; 127.0.0.1 = this machine "
                                "only; 0.0.0.0 opens it to the network: set an API key (api_key_env) first")
    port: int = _f(8000, "TCP port of the HTTP server; 0 = a free port the system picks (the URL is printed)")
    queue_size: int = _f(8, "jobs that may wait behind the running one; a request beyond them is refused with 429")
    api_key_env: Optional[str] = _f("LIGHTX2V_SP_API_KEY", "environment variable holding the API key: when it is set "
                                                          "and not empty, every /v1 request needs the header "
                                                          "'Authorization: Bearer <key>' (else 401); null = no key")
    output_dir: str = _f("outputs/serve", "the server's own directory: its videos, summaries and uploaded images, "
                                          "named by job id (no name or path from a request is used)")
    max_request_bytes: int = _f(16 << 20, "largest request body in bytes (JSON or multipart, an image included); "
                                          "larger requests are refused with 413")
    max_prompt_chars: int = _f(20000, "longest prompt or negative prompt a request may carry, in characters")
    keep_jobs: int = _f(1000, "finished jobs the server remembers for GET /v1/videos; older ones are forgotten "
                              "(their files stay in output_dir)")
    prompt_cache: int = _f(16, "server and generate --prompts: text contexts of this many recent prompt pairs "
                               "stay cached, so a repeated pair is not encoded again; 0 = none")


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig, metadata={"doc": "checkpoint and dtype"})
    prompt: str = _f("A cat walks on the grass, realistic style.", "text prompt")
    image: Optional[str] = _f(None, "image (png, jpg, ...) that conditions image-to-video models: their first "
                                    "frame; required by I2V checkpoints, refused by text-to-video ones")
    negative_prompt: str = _f("", "negative prompt for classifier-free guidance")
    seed: int = _f(42, "seed of the initial latents; same seed -> same video on any layout")
    device: str = _f("auto", "auto = cuda when available, else cpu", ["auto", "cuda", "cpu"])
    memory_check: bool = _f(True, "on CUDA, stop before loading when the memory plan (--plan) says a rank's "
                                  "peak exceeds its GPU's free memory, with the setting that would fit")
    sample: SampleConfig = field(default_factory=SampleConfig, metadata={"doc": "sampling schedule and video size"})
    parallel: ParallelConfig = field(default_factory=ParallelConfig, metadata={"doc": "sequence / CFG parallelism"})
    attention: AttentionConfig = field(default_factory=AttentionConfig, metadata={"doc": "local attention kernel"})
    text_encoder: TextEncoderConfig = field(default_factory=TextEncoderConfig, metadata={"doc": "UMT5 placement"})
    image_encoder: ImageEncoderConfig = field(default_factory=ImageEncoderConfig,
                                              metadata={"doc": "CLIP image encoder placement (Wan2.1 I2V)"})
    offload: OffloadConfig = field(default_factory=OffloadConfig, metadata={"doc": "CPU offload"})
    vae: VaeConfig = field(default_factory=VaeConfig, metadata={"doc": "VAE decode: dtype, split over ranks, tiling"})
    comm: CommConfig = field(default_factory=CommConfig, metadata={"doc": "communication settings"})
    output: OutputConfig = field(default_factory=OutputConfig, metadata={"doc": "where results go"})
    cache: CacheConfig = field(default_factory=CacheConfig, metadata={"doc": "step caching (TeaCache, MagCache, "
                                                                             "first-block cache)"})
    serve: ServeConfig = field(default_factory=ServeConfig, metadata={"doc": "the HTTP server and load-once modes"})
    lora: List[LoraConfig] = field(default_factory=list, metadata={
        "doc": "LoRA adapters merged into the DiT weights at load, in order: a list of {path, scale, expert}; "
               "command line: lora='[{path: a.safetensors, scale: 0.8}]', then lora.0.scale=0.5 edits an entry "
               "and lora.1.path=b.safetensors appends one"})


def _leaf_fields(cls, prefix: str = ""):
    """Yield (dotted key, dataclass field) for every leaf of the schema."""
    for f in fields(cls):
        key = f"{prefix}{f.name}"
        sub = f.default_factory if f.default_factory is not MISSING else None
        if sub is not None and is_dataclass(sub):
            yield from _leaf_fields(sub, key + ".")
        else:
            yield key, f


def _all_keys() -> list[str]:
    keys = []
    for key, _ in _leaf_fields(RunConfig):
        keys.append(key)
        parts = key.split(".")
        keys.extend(".".join(parts[:i]) for i in range(1, len(parts)))
    return sorted(set(keys))


def _did_you_mean(key: str) -> str:
    keys = _all_keys()
    leaf = key.split(".")[-1]
    best = difflib.get_close_matches(key, keys, n=1, cutoff=0.5)
    if not best:  # a right leaf under a wrong section, e.g. "ulysses_degree=2"
        best = [k for k in keys if k.split(".")[-1] == leaf][:1]
    if not best:
        best = difflib.get_close_matches(leaf, keys, n=1, cutoff=0.5)
    return f" (did you mean {best[0]}?)" if best else ""


def _type_name(f) -> str:
    t = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    return t.replace("Optional[", "").rstrip("]") + (" or null" if "Optional" in str(f.type) else "")


def _field_of(key: str):
    return dict(_leaf_fields(RunConfig)).get(key)


_LORA_ENTRY = "each lora entry is {path: FILE, scale: FLOAT, expert: null|high_noise|low_noise}"
_LORA_INDEX = re.compile(r"^lora\.(\d+)\.(\w+)$")


def _wrap(err: OmegaConfBaseException, source: str) -> ValueError:
    key = getattr(err, "full_key", None) or ""
    if str(key).startswith("lora") or getattr(err, "object_type", None) is LoraConfig:
        msg = (getattr(err, "msg", None) or str(err)).split("\n")[0]
        return ValueError(f"{source}: invalid lora entry ({key}): {msg}; {_LORA_ENTRY}")
    if isinstance(err, ConfigKeyError) or "not in struct" in str(err) or "has no attribute" in str(err):
        return ValueError(f"{source}: unknown config key '{key}'{_did_you_mean(key)}; the run would ignore it")
    if isinstance(err, ValidationError):
        f = _field_of(key)
        expected = _type_name(f) if f is not None else "a mapping of its own keys (a config section)"
        value = (getattr(err, "msg", None) or str(err)).split("\n")[0]
        return ValueError(f"{source}: config key '{key}' expects {expected}: {value}")
    return ValueError(f"{source}: invalid config: {str(err).splitlines()[0]}")


def _check_choices(cfg: RunConfig) -> None:
    for key, f in _leaf_fields(RunConfig):
        choices = f.metadata.get("choices")
        if choices is None:
            continue
        obj = cfg
        for part in key.split("."):
            obj = getattr(obj, part)
        if obj not in choices:
            raise ValueError(f"config key '{key}' = {obj!r} is not one of {list(choices)}")


SEED_RANGE = (-(2 ** 63), 2 ** 64 - 1)  # what torch.Generator.manual_seed accepts
# Upper bounds, checked before any text encoding or loading. They sit far above every released Wan
# setting (1280x720, 81 frames, 50 steps) and far below sizes that can never fit.
MAX_SIDE = 4096      # 4096x4096 x 81 frames is ~1.4M tokens per step, 38x Wan's 720p
MAX_FRAMES = 1025    # 4k+1; 64 s at 16 fps, 12.7x Wan's 81 frames
MAX_STEPS = 1000     # the flow-matching schedules have 1000 training timesteps: more would repeat them
UPPER_BOUND_WHY = {"height": "beyond 4K a video's tokens cannot fit in any GPU's memory",
                   "width": "beyond 4K a video's tokens cannot fit in any GPU's memory",
                   "num_frames": "longer videos cannot fit in any GPU's memory (Wan is trained on 81 frames)",
                   "steps": "the sampler has 1000 training timesteps; more steps would repeat them"}


def uses_cfg(sample: SampleConfig) -> bool:
    """Whether a run does classifier-free guidance: diffusers' WanPipeline rule, `guidance_scale > 1`.

    At <= 1 it runs one DiT forward per step and encodes no negative prompt, for both experts of a
    two-expert model (guidance_scale_2 is then unused); above 1 both experts run both passes, each
    with its own scale."""
    return sample.guidance_scale > 1.0


def validate(cfg: RunConfig) -> RunConfig:
    """Value checks that types alone cannot express."""
    _check_choices(cfg)
    s, p = cfg.sample, cfg.parallel
    for key, value, minimum in [("sample.steps", s.steps, 1), ("sample.height", s.height, 16),
                                ("sample.width", s.width, 16), ("sample.num_frames", s.num_frames, 1),
                                ("sample.fps", s.fps, 1), ("parallel.ulysses_degree", p.ulysses_degree, 0),
                                ("parallel.ring_degree", p.ring_degree, 1),
                                ("comm.timeout_s", cfg.comm.timeout_s, 1), ("text_encoder.text_len", cfg.text_encoder.text_len, 1),
                                ("vae.tiling", cfg.vae.tiling, 1), ("output.quality", cfg.output.quality, 1)]:
        if value < minimum:
            raise ValueError(f"config key '{key}' = {value} must be >= {minimum}")
    for key, value in [("sample.guidance_scale", s.guidance_scale), ("sample.guidance_scale_2", s.guidance_scale_2),
                       ("sample.shift", s.shift)]:
        if value is not None and not math.isfinite(value):
            raise ValueError(f"config key '{key}' = {value} is not a finite number; every latent would be "
                             "NaN and the video black")
    if s.shift <= 0:
        raise ValueError(f"config key 'sample.shift' = {s.shift} must be > 0 (it divides the timesteps)")
    if not SEED_RANGE[0] <= cfg.seed <= SEED_RANGE[1]:
        raise ValueError(f"config key 'seed' = {cfg.seed} is outside torch.Generator's range "
                         f"[{SEED_RANGE[0]}, {SEED_RANGE[1]}] (-2**63 .. 2**64-1)")
    if cfg.output.quality > 9:
        raise ValueError(f"config key 'output.quality' = {cfg.output.quality} must be <= 9: 10 is x264's lossless "
                         "mode (crf 0), whose High 4:4:4 Predictive profile most players and browsers do not play")
    for key, value, maximum in [("sample.steps", s.steps, MAX_STEPS), ("sample.height", s.height, MAX_SIDE),
                                ("sample.width", s.width, MAX_SIDE), ("sample.num_frames", s.num_frames, MAX_FRAMES)]:
        if value > maximum:
            raise ValueError(f"config key '{key}' = {value} must be <= {maximum}: {UPPER_BOUND_WHY[key.split('.')[1]]}")
    if s.height % 16 or s.width % 16:
        raise ValueError(f"sample.height x sample.width = {s.height}x{s.width} must be multiples of 16 "
                         "(VAE stride 8 x patch 2); the latents could not be patchified")
    if (s.num_frames - 1) % 4:
        raise ValueError(f"sample.num_frames = {s.num_frames} must be 4k+1 (the VAE compresses time by 4), "
                         f"e.g. {(s.num_frames - 1) // 4 * 4 + 1} or {(s.num_frames - 1) // 4 * 4 + 5}")
    if cfg.model.compile and cfg.offload.dit == "block":
        raise ValueError("model.compile=true with offload.dit=block: the block-offload hooks swap weights "
                         "between calls, which a compiled block would not see; choose one of the two")
    if cfg.model.compile and cfg.offload.dit == "swap":
        raise ValueError("model.compile=true with offload.dit=swap: the swap moves the DiT's weights between the "
                         "host and the GPU, which compiled blocks are not checked against; choose one of the two")
    if s.boundary_ratio is not None and not 0.0 <= s.boundary_ratio <= 1.0:
        raise ValueError(f"sample.boundary_ratio = {s.boundary_ratio} must be in [0, 1] (a fraction of the 1000 "
                         "training timesteps); null takes it from the checkpoint")
    if not uses_cfg(s) and s.guidance_scale_2 not in (None, 1.0):
        raise ValueError(f"sample.guidance_scale_2 = {s.guidance_scale_2} needs the unconditional pass, which "
                         f"sample.guidance_scale = {s.guidance_scale} (<= 1) turns off (no negative prompt is "
                         "encoded); set guidance_scale > 1 or guidance_scale_2 = 1")
    if p.cfg_degree == 2 and not uses_cfg(s):
        raise ValueError(f"parallel.cfg_degree=2 needs classifier-free guidance, but sample.guidance_scale="
                         f"{s.guidance_scale} (<= 1) skips the unconditional pass; half of the ranks would idle")
    _validate_timesteps(s)
    _validate_quant(cfg)
    _validate_serve(cfg.serve)
    for i, entry in enumerate(cfg.lora):
        if not entry.path:
            raise ValueError(f"lora.{i}.path is empty; {_LORA_ENTRY}")
        experts = next(f for f in fields(LoraConfig) if f.name == "expert").metadata["choices"]
        if entry.expert not in experts:
            raise ValueError(f"lora.{i}.expert = {entry.expert!r} is not one of {list(experts)}")
    return cfg


def _validate_serve(v: ServeConfig) -> None:
    if not 0 <= v.port < 65536:
        raise ValueError(f"config key 'serve.port' = {v.port} is not a TCP port (1..65535, or 0 for any free one)")
    for key, value, minimum in [("queue_size", v.queue_size, 1), ("max_request_bytes", v.max_request_bytes, 1024),
                                ("max_prompt_chars", v.max_prompt_chars, 1), ("keep_jobs", v.keep_jobs, 1),
                                ("prompt_cache", v.prompt_cache, 0)]:
        if value < minimum:
            raise ValueError(f"config key 'serve.{key}' = {value} must be >= {minimum}")
    if not v.host or not v.output_dir:
        raise ValueError("config keys 'serve.host' and 'serve.output_dir' must not be empty")


def _validate_timesteps(s: SampleConfig) -> None:
    if s.timesteps is None:
        return
    t = list(s.timesteps)
    if len(t) != s.steps:
        raise ValueError(f"sample.timesteps has {len(t)} entries {t} but sample.steps = {s.steps}; set "
                         f"sample.steps={len(t)} (or drop sample.timesteps): the run would not know which to follow")
    if any(not 0 < v <= 1000 for v in t) or any(a <= b for a, b in zip(t, t[1:])):
        raise ValueError(f"sample.timesteps = {t} must be strictly decreasing values in (0, 1000] (1000 = pure "
                         "noise); the sampler would step backwards or past the end")


def _validate_quant(cfg: RunConfig) -> None:
    m = cfg.model
    if m.fp8_accum != "exact" and m.quant != "fp8":
        raise ValueError(f"model.fp8_accum = {m.fp8_accum!r} sets how FP8 GEMMs accumulate, but model.quant = "
                         f"{m.quant!r} runs none; set model.quant=fp8, or drop model.fp8_accum")
    if m.dit_path_2 is not None and m.dit_path is None:
        raise ValueError(f"model.dit_path_2 = {m.dit_path_2!r} names the low-noise expert's weights, but "
                         "model.dit_path (the high-noise expert's) is null; give both, or neither")
    for key, value in (("model.dit_path", m.dit_path), ("model.dit_path_2", m.dit_path_2)):
        if value is not None and not value.strip():
            raise ValueError(f"{key} is empty; give a .safetensors file or directory, or null")


def _normalize_lora(node) -> None:
    """`lora: [a.safetensors]` (bare paths) means `lora: [{path: a.safetensors}]`."""
    if isinstance(node, DictConfig) and isinstance(node.get("lora"), ListConfig):
        node.lora = [{"path": e} if isinstance(e, str) else e for e in node.lora]


def _apply_lora_index(conf, key: str, value: str):
    """`lora.N.field=value`: edit entry N, or append it when N is the list's length."""
    m = _LORA_INDEX.match(key)
    index, name = int(m.group(1)), m.group(2)
    if index > len(conf.lora):
        raise ValueError(f"command line: {key}: the lora list has {len(conf.lora)} entries, so the next one is "
                         f"lora.{len(conf.lora)}; entries are added in order")
    if index == len(conf.lora):
        if name != "path":
            raise ValueError(f"command line: {key} would add lora entry {index} without a path; give "
                             f"lora.{index}.path first")
        conf.lora.append(LoraConfig(path=value))
    OmegaConf.update(conf, key, OmegaConf.from_dotlist([f"v={value}"]).v)  # typed: the schema checks the value
    return conf


def _read_yaml(path: str):
    try:
        loaded = OmegaConf.load(path)
    except FileNotFoundError:
        raise ValueError(f"config file not found: {path}") from None
    except IsADirectoryError:
        raise ValueError(f"--config {path} is a directory; give a YAML file (e.g. configs/wan_t2v_tiny.yaml)") from None
    except OSError as e:
        raise ValueError(f"config file {path} could not be read: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"config file {path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ValueError(f"config file {path} is not valid YAML: {problem}{where}") from None
    except OmegaConfBaseException as err:
        raise _wrap(err, path) from None
    if not isinstance(loaded, DictConfig):
        raise ValueError(f"{path}: the top level of a config must be a mapping of keys, "
                         f"not a {type(loaded).__name__}")
    return loaded


def _string_fields() -> dict:
    return {key: f for key, f in _leaf_fields(RunConfig) if is_string_field(f)}


def _blank(conf: DictConfig, key: str, value) -> None:
    """Put a neutral placeholder where a raw string goes (it must never reach OmegaConf)."""
    node = conf
    *parents, leaf = key.split(".")
    for part in parents:
        node = node.get(part) if isinstance(node, DictConfig) else None
    if isinstance(node, DictConfig) and leaf in node:
        node[leaf] = value


def load_config(path: str | None = None, overrides: Sequence[str] = ()) -> RunConfig:
    """Schema defaults <- YAML at `path` <- `key=value` overrides; validated, as a `RunConfig`.

    String fields bypass OmegaConf (no interpolation, no YAML parsing of override values):
    see config_raw.py.
    """
    conf = OmegaConf.structured(RunConfig)
    strings = _string_fields()
    raw: dict[str, Optional[str]] = {}
    if path is not None:
        loaded = _read_yaml(path)
        raw.update(yaml_strings(path, strings))
        for key, value in raw.items():
            _blank(loaded, key, None if value is None else "")
        try:
            _normalize_lora(loaded)
            conf = OmegaConf.merge(conf, loaded)
        except OmegaConfBaseException as err:
            raise _wrap(err, path) from None
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override '{item}' is not of the form key=value (e.g. parallel.ulysses_degree=2)")
        key, value = item.split("=", 1)
        if key in strings:
            raw[key] = override_text(value, is_optional(strings[key]))
            continue
        try:
            if _LORA_INDEX.match(key):
                conf = _apply_lora_index(conf, key, item.split("=", 1)[1])
                continue
            override = OmegaConf.from_dotlist([item])
            _normalize_lora(override)
            conf = OmegaConf.merge(conf, override)
        except OmegaConfBaseException as err:
            if not key.startswith("lora"):
                err.full_key = key  # the whole dotted key, even when omegaconf stops at its first bad part
            raise _wrap(err, "command line") from None
    try:
        cfg = OmegaConf.to_object(conf)
    except OmegaConfBaseException as err:
        raise _wrap(err, path or "config") from None
    for key, value in raw.items():
        if value is None and not is_optional(strings[key]):
            raise ValueError(f"config key '{key}' expects str, not null")
        *parents, leaf = key.split(".")
        obj = cfg
        for part in parents:
            obj = getattr(obj, part)
        setattr(obj, leaf, value)
    return validate(cfg)


def to_dict(cfg: RunConfig) -> dict:
    """Plain nested dict (no OmegaConf round trip: a prompt's `${...}` must stay text)."""
    return asdict(cfg)


def describe(cfg: Optional[RunConfig] = None) -> str:
    """One line per key: name, value and doc (for --help-config).

    The value is `cfg`'s (what a run with that config would use; the schema default is added where
    they differ), or the schema default without `cfg`.
    """
    lines = []
    for key, f in _leaf_fields(RunConfig):
        choices = f.metadata.get("choices")
        extra = f" {list(choices)}" if choices else ""
        value = f.default_factory() if f.default is MISSING and f.default_factory is not MISSING else f.default
        default = value
        if cfg is not None:
            value = cfg
            for part in key.split("."):
                value = getattr(value, part)
            if value != default:
                extra += f" (schema default {default!r})"
        lines.append(f"{key} = {value!r}{extra}  # {f.metadata.get('doc', '')}")
        if key == "lora":
            for sub in fields(LoraConfig):
                sub_choices = sub.metadata.get("choices")
                lines.append(f"lora.N.{sub.name} = {'(required)' if sub.default == REQUIRED else repr(sub.default)}"
                             f"{f' {list(sub_choices)}' if sub_choices else ''}  # {sub.metadata['doc']}")
    return "\n".join(lines)
