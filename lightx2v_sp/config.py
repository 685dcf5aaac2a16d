"""The typed config tree: dataclasses are the omegaconf schema; YAML + `key=value` overrides.

Every field carries a one-line doc in `metadata["doc"]`; `describe()` prints them all.
Unknown keys, wrong types and values outside a field's choices are `ValueError`s that name the
key (with a "did you mean" hint for typos).
"""
from __future__ import annotations

import difflib
from dataclasses import MISSING, dataclass, field, fields, is_dataclass
from typing import Any, Optional, Sequence

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError


def _f(default: Any, doc: str, choices: Sequence[Any] | None = None):
    meta = {"doc": doc}
    if choices is not None:
        meta["choices"] = tuple(choices)
    return field(default=default, metadata=meta)


@dataclass
class ModelConfig:
    path: Optional[str] = _f(None, "Wan2.1 model directory (official or diffusers layout); null = embedded tiny model")
    dtype: str = _f("bf16", "compute dtype of the DiT and text encoder", ["bf16", "fp16", "fp32"])
    text_encoder_path: Optional[str] = _f(None, "UMT5 checkpoint (HF dir or official .pth); null = found under model.path")
    tokenizer_path: Optional[str] = _f(None, "tokenizer directory; null = found under model.path")
    vae_path: Optional[str] = _f(None, "VAE (diffusers dir or official Wan2.1_VAE.pth); null = found under model.path")
    tiny: str = _f("wan2.1-t2v", "which embedded tiny model model.path=null means (tests, CPU demos)",
                   ["wan2.1-t2v", "wan2.1-i2v", "wan2.2-t2v-a14b", "wan2.2-i2v-a14b", "wan2.2-ti2v-5b"])
    compile: bool = _f(False, "torch.compile the DiT blocks: ~1.12x faster forward on an H100 (BENCHMARKS.md); "
                              "the first step pays the compilation")


@dataclass
class SampleConfig:
    steps: int = _f(50, "number of denoising steps")
    guidance_scale: float = _f(5.0, "classifier-free guidance scale; 1.0 disables the unconditional pass")
    guidance_scale_2: Optional[float] = _f(None, "two-expert models: guidance scale of the low-noise expert "
                                                 "(guidance_scale is the high-noise one's); null = guidance_scale")
    boundary_ratio: Optional[float] = _f(None, "two-expert models: the high-noise expert runs while timestep >= "
                                               "boundary_ratio x 1000; null = from the checkpoint")
    shift: float = _f(5.0, "flow-matching timestep shift (Wan: 5.0 at 720p, 3.0 at 480p)")
    scheduler: str = _f("unipc", "sampler: UniPC in flow mode or flow-match Euler", ["unipc", "euler"])
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
                                "0 = auto: every rank that cfg_degree leaves")
    cfg_degree: int = _f(1, "1, or 2 to run the conditional and unconditional passes on two rank groups", [1, 2])
    a2a: str = _f("all_to_all", "Ulysses exchange: one all_to_all_single, or pairwise round-robin (PCIe)",
                  ["all_to_all", "round_robin"])
    fuse_qkv: bool = _f(True, "move q, k and v in one collective per direction")
    comm_dtype: Optional[str] = _f(None, "null = send in compute dtype; fp8 = e4m3 payload + scales in one buffer",
                                   [None, "fp8"])


@dataclass
class AttentionConfig:
    backend: str = _f("auto", "local attention kernel (sdpa_* pin one of PyTorch's SDPA implementations)",
                      ["auto", "sdpa", "sdpa_cudnn", "sdpa_flash", "sdpa_efficient", "sdpa_math", "flash_attn", "sage"])


@dataclass
class TextEncoderConfig:
    parallel: str = _f("replicate", "UMT5 layout over the ranks", ["replicate", "tp", "dp"])
    device: str = _f("gpu", "where the encoder lives: gpu, cpu (runs there) or swap (GPU only for its stage)",
                     ["gpu", "cpu", "swap"])
    text_len: int = _f(512, "tokens per prompt (Wan2.1 uses 512)")


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


@dataclass
class CommConfig:
    symmetric_memory: bool = _f(False, "allocate text-encoder collective buffers from NCCL symmetric memory")
    timeout_s: int = _f(600, "collective timeout in seconds; a dead rank fails the job instead of hanging")


@dataclass
class OutputConfig:
    path: str = _f("outputs/video.mp4", "mp4 written by rank 0 (atomically); a .json summary goes next to it")


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig, metadata={"doc": "checkpoint and dtype"})
    prompt: str = _f("A cat walks on the grass, realistic style.", "text prompt")
    image: Optional[str] = _f(None, "image (png, jpg, ...) that conditions image-to-video models: their first "
                                    "frame; required by I2V checkpoints, refused by text-to-video ones")
    negative_prompt: str = _f("", "negative prompt for classifier-free guidance")
    seed: int = _f(42, "seed of the initial latents; same seed -> same video on any layout")
    device: str = _f("auto", "auto = cuda when available, else cpu", ["auto", "cuda", "cpu"])
    sample: SampleConfig = field(default_factory=SampleConfig, metadata={"doc": "sampling schedule and video size"})
    parallel: ParallelConfig = field(default_factory=ParallelConfig, metadata={"doc": "sequence / CFG parallelism"})
    attention: AttentionConfig = field(default_factory=AttentionConfig, metadata={"doc": "local attention kernel"})
    text_encoder: TextEncoderConfig = field(default_factory=TextEncoderConfig, metadata={"doc": "UMT5 placement"})
    image_encoder: ImageEncoderConfig = field(default_factory=ImageEncoderConfig,
                                              metadata={"doc": "CLIP image encoder placement (Wan2.1 I2V)"})
    offload: OffloadConfig = field(default_factory=OffloadConfig, metadata={"doc": "CPU offload"})
    comm: CommConfig = field(default_factory=CommConfig, metadata={"doc": "communication settings"})
    output: OutputConfig = field(default_factory=OutputConfig, metadata={"doc": "where results go"})


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


def _wrap(err: OmegaConfBaseException, source: str) -> ValueError:
    key = getattr(err, "full_key", None) or ""
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


def validate(cfg: RunConfig) -> RunConfig:
    """Value checks that types alone cannot express."""
    _check_choices(cfg)
    s, p = cfg.sample, cfg.parallel
    for key, value, minimum in [("sample.steps", s.steps, 1), ("sample.height", s.height, 16),
                                ("sample.width", s.width, 16), ("sample.num_frames", s.num_frames, 1),
                                ("sample.fps", s.fps, 1), ("parallel.ulysses_degree", p.ulysses_degree, 0),
                                ("comm.timeout_s", cfg.comm.timeout_s, 1), ("text_encoder.text_len", cfg.text_encoder.text_len, 1)]:
        if value < minimum:
            raise ValueError(f"config key '{key}' = {value} must be >= {minimum}")
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
    if s.guidance_scale == 1.0 and s.guidance_scale_2 not in (None, 1.0):
        raise ValueError(f"sample.guidance_scale_2 = {s.guidance_scale_2} needs the unconditional pass, which "
                         "sample.guidance_scale = 1.0 turns off (no negative prompt is encoded); set "
                         "guidance_scale != 1 or guidance_scale_2 = 1")
    if p.cfg_degree == 2 and s.guidance_scale == 1.0:
        raise ValueError("parallel.cfg_degree=2 needs classifier-free guidance, but sample.guidance_scale=1.0 "
                         "skips the unconditional pass; half of the ranks would idle")
    return cfg


def load_config(path: str | None = None, overrides: Sequence[str] = ()) -> RunConfig:
    """Schema defaults <- YAML at `path` <- `key=value` overrides; validated, as a `RunConfig`."""
    conf = OmegaConf.structured(RunConfig)
    if path is not None:
        try:
            loaded = OmegaConf.load(path)
            if not isinstance(loaded, DictConfig):
                raise ValueError(f"{path}: the top level of a config must be a mapping of keys, "
                                 f"not a {type(loaded).__name__}")
            conf = OmegaConf.merge(conf, loaded)
        except FileNotFoundError:
            raise ValueError(f"config file not found: {path}") from None
        except OmegaConfBaseException as err:
            raise _wrap(err, path) from None
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override '{item}' is not of the form key=value (e.g. parallel.ulysses_degree=2)")
        key = item.split("=", 1)[0]
        try:
            conf = OmegaConf.merge(conf, OmegaConf.from_dotlist([item]))
        except OmegaConfBaseException as err:
            err.full_key = key  # the whole dotted key, even when omegaconf stops at its first bad part
            raise _wrap(err, "command line") from None
    try:
        cfg = OmegaConf.to_object(conf)
    except OmegaConfBaseException as err:
        raise _wrap(err, path or "config") from None
    return validate(cfg)


def to_dict(cfg: RunConfig) -> dict:
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)


def describe() -> str:
    """One line per key: name, default and doc (for --help-config)."""
    lines = []
    for key, f in _leaf_fields(RunConfig):
        choices = f.metadata.get("choices")
        extra = f" {list(choices)}" if choices else ""
        lines.append(f"{key} = {f.default!r}{extra}  # {f.metadata.get('doc', '')}")
    return "\n".join(lines)
