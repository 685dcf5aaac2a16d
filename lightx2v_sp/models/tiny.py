"""The embedded tiny model: Wan2.1's architecture at toy sizes, with fixed-seed random weights.

Written once as real checkpoint files into a cache directory and then loaded by the same loaders
as a downloaded Wan2.1 model, so `model.path: null` exercises the whole pipeline (tokenizer, UMT5,
DiT, VAE) on a CPU in seconds. Its videos are noise.

    <cache>/tiny-<TINY_VERSION>/
      config.json, diffusion_pytorch_model.safetensors   DiT, official Wan2.1 layout
      text_encoder/                                      UMT5, transformers layout
      tokenizer/                                         T5-like fast tokenizer (pad 0, eos 1)
      vae/                                               diffusers AutoencoderKLWan
      TINY_MODEL.json                                    written last: marks a complete build

`ensure_tiny_lora()` writes a LoRA for this DiT next to it (<cache>/tiny-<TINY_VERSION>-lora.safetensors,
kohya/ComfyUI-style keys with .alpha and .diff_b); configs name it `lora: [{path: tiny}]`.

Variants (`model.tiny`) mirror the other members of the Wan family, with the same text encoder,
tokenizer and VAE (same seeds) and their own DiT files:

    <cache>/tiny-wan2.2-t2v-a14b-<TINY_VERSION>/   high_noise_model/ + low_noise_model/ (official
                                                  Wan2.2 A14B layout), two differently seeded experts
    <cache>/tiny-wan2.2-i2v-a14b-<TINY_VERSION>/   the same with I2V experts (in_dim 36, model_type i2v)
    <cache>/tiny-wan2.1-i2v-<TINY_VERSION>/        Wan2.1 I2V in the -Diffusers layout: transformer/
                                                  (image branch), image_encoder/ (CLIP vision tower),
                                                  image_processor/, model_index.json
    <cache>/tiny-wan2.2-ti2v-5b-<TINY_VERSION>/    Wan2.2 TI2V in the -Diffusers layout: transformer/
                                                  (48 channels in and out), vae/ (the Wan2.2 VAE shape:
                                                  z_dim 48, 16x spatial), model_index.json with
                                                  expand_timesteps

`<cache>` is $LIGHTX2V_SP_CACHE, else ~/.cache/lightx2v_sp. The build goes to a temporary sibling
directory renamed into place, under an exclusive file lock, so concurrent ranks (or jobs) neither
see a half-written model nor build it twice.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import string
import tempfile

import torch

from lightx2v_sp.cache_dir import cache_root

# Bump when any size, seed or file below changes: older caches are then simply not used.
TINY_VERSION = "v1"
MARKER = "TINY_MODEL.json"
SEED = 20240601

# 12 heads in the DiT and UMT5: divisible by Ulysses / TP degrees 1, 2, 3, 4 and 6.
TINY_WAN = dict(dim=96, num_heads=12, num_layers=2, ffn_dim=192, in_dim=16, out_dim=16, text_dim=64,
                freq_dim=64, text_len=32)
TINY_T5 = dict(vocab_size=256, d_model=64, d_kv=8, num_heads=12, d_ff=128, num_layers=2)
TINY_VAE = dict(base_dim=8, z_dim=16, num_res_blocks=1)
# variant -> DiT shapes per expert (None: the one-DiT tiny model above)
VARIANTS = {
    "wan2.1-t2v": None,
    "wan2.2-t2v-a14b": {"high_noise_model": TINY_WAN, "low_noise_model": TINY_WAN},
    "wan2.2-i2v-a14b": {name: dict(TINY_WAN, in_dim=36, model_type="i2v")
                        for name in ("high_noise_model", "low_noise_model")},
    "wan2.1-i2v": {"transformer": dict(TINY_WAN, in_dim=36, model_type="i2v", image_dim=32)},
    "wan2.2-ti2v-5b": {"transformer": dict(TINY_WAN, in_dim=48, out_dim=48)},
}
# The Wan2.2 VAE's shape at toy size: 48 latent channels, pixels patchified 2x2 (12 channels), 16x space
TINY_VAE22 = dict(base_dim=8, decoder_base_dim=8, z_dim=48, num_res_blocks=1, is_residual=True, in_channels=12,
                  out_channels=12, patch_size=2, scale_factor_spatial=16)
# CLIP vision tower of the tiny Wan2.1 I2V: 32 px / patch 8 = 16 patches + class token = 17 tokens of 32
TINY_CLIP = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32,
                 patch_size=8)

_WORDS = ("a an the cat cats dog tiny small big walks runs on in of and with grass field sky city "
          "street realistic style video blurry low quality bad worst best red green blue").split()


def _check_variant(variant: str) -> None:
    if variant not in VARIANTS:
        raise ValueError(f"model.tiny = {variant!r} is not one of the embedded tiny models {sorted(VARIANTS)}")


def tiny_model_dir(root: str | None = None, variant: str = "wan2.1-t2v") -> str:
    _check_variant(variant)
    name = f"tiny-{TINY_VERSION}" if VARIANTS[variant] is None else f"tiny-{variant}-{TINY_VERSION}"
    return os.path.join(root or cache_root(), name)


def is_built(path: str) -> bool:
    return os.path.isfile(os.path.join(path, MARKER))


def ensure_tiny_model(root: str | None = None, variant: str = "wan2.1-t2v") -> str:
    """Directory of the tiny model `variant`, building it first if no complete copy exists."""
    final = tiny_model_dir(root, variant)
    if is_built(final):
        return final
    # said before the lock: the rank that logs (0) may be the one waiting while a peer builds
    logging.getLogger("lightx2v_sp").info("building the embedded tiny model in %s (once)", final)
    parent = os.path.dirname(final)
    try:
        os.makedirs(parent, exist_ok=True)
        lock = open(os.path.join(parent, f".{os.path.basename(final)}.lock"), "a+")
    except OSError as e:
        raise ValueError(f"cannot write the tiny model cache under {parent} ({e.strerror}); set "
                         "LIGHTX2V_SP_CACHE to a writable directory or set model.path") from None
    with lock, _locked(lock):
        if is_built(final):  # another process built it while we waited
            return final
        tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(final)}.tmp-", dir=parent)
        try:
            # the one-DiT model keeps the one-argument call (tests substitute their own writer)
            write_tiny_model(tmp) if VARIANTS[variant] is None else write_tiny_model(tmp, variant)
            _make_readable(tmp)
            if os.path.isdir(final):  # incomplete leftovers cannot exist (rename is atomic), but be safe
                shutil.rmtree(final)
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return final


def _make_readable(path: str) -> None:
    """mkdtemp makes the directory private; a shared cache should be readable by every user."""
    for d, _, files in os.walk(path):
        os.chmod(d, 0o755)
        for name in files:
            os.chmod(os.path.join(d, name), 0o644)


@contextlib.contextmanager
def _locked(f):
    fcntl.flock(f.fileno(), fcntl.LOCK_EX)
    try:
        yield
    finally:
        fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def write_tiny_model(path: str, variant: str = "wan2.1-t2v") -> None:
    """Write every component of the tiny model `variant` into `path` (an existing, empty directory)."""
    _check_variant(variant)
    experts = VARIANTS[variant]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        if experts is None:
            _write_dit(path)
        for i, (sub, shape) in enumerate((experts or {}).items()):
            torch.manual_seed(SEED + 10 + i)  # each expert its own weights: a wrong switch shows
            _write_dit(os.path.join(path, sub), shape, "diffusers" if sub == "transformer" else "official")
        if variant == "wan2.1-i2v":
            torch.manual_seed(SEED + 3)
            _write_clip(path)
        if variant == "wan2.2-ti2v-5b":
            _write_index(path, {"_class_name": "WanPipeline", "boundary_ratio": None, "expand_timesteps": True,
                                "transformer": ["diffusers", "WanTransformer3DModel"], "transformer_2": [None, None]})
        torch.manual_seed(SEED + 1)
        _write_text_encoder(os.path.join(path, "text_encoder"))
        torch.manual_seed(SEED + 2)
        _write_vae(os.path.join(path, "vae"), TINY_VAE22 if variant == "wan2.2-ti2v-5b" else TINY_VAE)
    _write_tokenizer(os.path.join(path, "tokenizer"))
    with open(os.path.join(path, MARKER), "w") as f:
        variant_keys = {} if experts is None else {"variant": variant}  # the original model's marker is unchanged
        json.dump({"version": TINY_VERSION, **variant_keys, "seed": SEED, "dit": experts or TINY_WAN,
                   "text_encoder": TINY_T5, "vae": TINY_VAE,
                   "note": "random weights: the videos it makes are noise"}, f, indent=2)


def _write_dit(path: str, shape: dict = TINY_WAN, layout: str = "official") -> None:
    from lightx2v_sp.models.wan import WanConfig, WanModel

    model = WanModel(WanConfig(**shape))
    model.save_pretrained(path, layout=layout)


def _write_clip(path: str) -> None:
    """CLIP vision tower + processor and the model_index.json that names them (diffusers layout)."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    CLIPVisionModel(CLIPVisionConfig(**TINY_CLIP)).eval().save_pretrained(os.path.join(path, "image_encoder"))
    size = TINY_CLIP["image_size"]
    CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size}).save_pretrained(
        os.path.join(path, "image_processor"))
    _write_index(path, {"_class_name": "WanImageToVideoPipeline", "boundary_ratio": None, "expand_timesteps": False,
                        "image_encoder": ["transformers", "CLIPVisionModel"],
                        "image_processor": ["transformers", "CLIPImageProcessor"],
                        "transformer": ["diffusers", "WanTransformer3DModel"], "transformer_2": [None, None]})


def _write_index(path: str, index: dict) -> None:
    """A diffusers model_index.json: what the pipeline is and which components it has."""
    index = {**index, "text_encoder": ["transformers", "UMT5EncoderModel"], "tokenizer": ["transformers", "AutoTokenizer"],
             "vae": ["diffusers", "AutoencoderKLWan"], "scheduler": ["diffusers", "UniPCMultistepScheduler"]}
    with open(os.path.join(path, "model_index.json"), "w") as f:
        json.dump(index, f, indent=2)


def _write_text_encoder(path: str) -> None:
    from lightx2v_sp.models.t5.loader import save_t5_encoder
    from lightx2v_sp.models.t5.model import T5Config, T5Encoder

    cfg = T5Config(**TINY_T5)
    enc = T5Encoder(cfg)
    # nn.Embedding's N(0, 1) rows and default Linear init give activations of a sane size at d_model=64
    save_t5_encoder(enc, path, layout="hf")


def _write_vae(path: str, shape: dict = TINY_VAE) -> None:
    from diffusers import AutoencoderKLWan

    if shape["z_dim"] != 16:  # no released statistics at toy size: fixed, non-trivial ones
        gen = torch.Generator().manual_seed(SEED)
        shape = dict(shape, latents_mean=(0.3 * torch.randn(shape["z_dim"], generator=gen)).tolist(),
                     latents_std=(1 + torch.rand(shape["z_dim"], generator=gen)).tolist())
    AutoencoderKLWan(**shape).save_pretrained(path, safe_serialization=True)


def _write_tokenizer(path: str) -> None:
    """A small unigram tokenizer with T5's conventions: <pad>=0, </s>=1 appended, <unk>=2."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    chars = string.ascii_letters + string.digits + string.punctuation
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [("\u2581" + w, -1.0) for w in _WORDS]
    vocab += [("\u2581" + c, -2.5) for c in chars] + [(c, -3.0) for c in chars]
    assert len(vocab) <= TINY_T5["vocab_size"], len(vocab)
    tok = Tokenizer(models.Unigram(vocab, unk_id=2, byte_fallback=False))
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                   model_max_length=512)
    fast.save_pretrained(path)


TINY_LORA = dict(rank=4, alpha=8.0, seed=SEED + 3)


def tiny_lora_path(root: str | None = None) -> str:
    return tiny_model_dir(root) + "-lora.safetensors"


def tiny_lora_state_dict() -> dict[str, torch.Tensor]:
    """A rank-4 LoRA on every linear layer of the tiny DiT's blocks, official names with kohya-style
    lora_down / lora_up / alpha keys, plus bias differences (.diff_b) on the FFN outputs."""
    dim, ffn, rank = TINY_WAN["dim"], TINY_WAN["ffn_dim"], TINY_LORA["rank"]
    shapes = {f"{a}.{p}": (dim, dim) for a in ("self_attn", "cross_attn") for p in "qkvo"}
    shapes.update({"ffn.0": (ffn, dim), "ffn.2": (dim, ffn)})
    gen = torch.Generator().manual_seed(TINY_LORA["seed"])
    out = {}
    for i in range(TINY_WAN["num_layers"]):
        for name, (rows, cols) in shapes.items():
            key = f"diffusion_model.blocks.{i}.{name}"
            # an update of about a tenth of the weights' size: visible in the output, far from dominating it
            out[f"{key}.lora_down.weight"] = torch.randn(rank, cols, generator=gen) / cols**0.5
            out[f"{key}.lora_up.weight"] = torch.randn(rows, rank, generator=gen) * (0.05 / rank**0.5)
            out[f"{key}.alpha"] = torch.tensor(TINY_LORA["alpha"])
        out[f"diffusion_model.blocks.{i}.ffn.2.diff_b"] = torch.randn(dim, generator=gen) * 0.01
    return out


def ensure_tiny_lora(root: str | None = None) -> str:
    """Path of the tiny DiT's LoRA file, written on first use (atomically: a temporary file renamed)."""
    from safetensors.torch import save_file

    path = tiny_lora_path(root)
    if os.path.isfile(path):
        return path
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tiny-lora.tmp-", suffix=".safetensors", dir=os.path.dirname(path))
    os.close(fd)
    try:
        save_file(tiny_lora_state_dict(), tmp, metadata={"format": "pt"})
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)  # identical bytes from every writer, so a race is harmless
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path
