"""Read and write UMT5 encoder checkpoints in two layouts.

- "hf": a transformers `UMT5EncoderModel` directory: config.json + model.safetensors, or shards
  listed by model.safetensors.index.json. A full UMT5 (encoder-decoder) checkpoint also loads:
  decoder and lm_head keys are ignored. The embedding may be stored as `shared.weight`,
  `encoder.embed_tokens.weight` or both (they are tied).
- "official": Wan2.1's `models_t5_umt5-xxl-enc-bf16.pth`, a torch state dict with keys
  `token_embedding.weight`, `blocks.N.{norm1,norm2}.weight`, `blocks.N.attn.{q,k,v,o}.weight`,
  `blocks.N.ffn.{gate.0,fc1,fc2}.weight`, `blocks.N.pos_embedding.embedding.weight`, `norm.weight`.
  Its config is a T5 config.json beside it when there is one, else it is read off the shapes.

Loading is lazy: safetensors slices (`get_slice`) and memory-mapped .pth tensors, converted one
at a time into the target dtype and device, so a tensor-parallel rank (`shard=T5Shard(...)`)
reads only its slice of each block weight.
"""
from __future__ import annotations

import json
import os
import re

import torch

from ..parallel_copy import copy_all
from ..quant import T5_LINEARS, quantize_linears, quantize_rows
from ..safetensors_io import save_safetensors
from .model import T5Config, T5Encoder
from .shard import T5Shard

OFFICIAL_FILENAME = "models_t5_umt5-xxl-enc-bf16.pth"
_DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
           "fp32": torch.float32, "float32": torch.float32}

# our parameter name (suffix after blocks.N.) -> file key suffix, per layout
_HF_BLOCK = {
    "norm1.weight": "layer.0.layer_norm.weight",
    "attn.q.weight": "layer.0.SelfAttention.q.weight",
    "attn.k.weight": "layer.0.SelfAttention.k.weight",
    "attn.v.weight": "layer.0.SelfAttention.v.weight",
    "attn.o.weight": "layer.0.SelfAttention.o.weight",
    "attn.rel_bias.weight": "layer.0.SelfAttention.relative_attention_bias.weight",
    "norm2.weight": "layer.1.layer_norm.weight",
    "ffn.gate.weight": "layer.1.DenseReluDense.wi_0.weight",
    "ffn.fc1.weight": "layer.1.DenseReluDense.wi_1.weight",
    "ffn.fc2.weight": "layer.1.DenseReluDense.wo.weight",
}
_OFFICIAL_BLOCK = {
    "attn.rel_bias.weight": "pos_embedding.embedding.weight",
    "ffn.gate.weight": "ffn.gate.0.weight",
}
_HF_IGNORED = re.compile(r"(decoder\..*|lm_head\.weight|encoder\.embed_tokens\.weight|shared\.weight)")


def file_key(name: str, layout: str, embed_key: str = "shared.weight") -> str:
    """File key of our parameter `name` in `layout` ("hf" or "official")."""
    m = re.fullmatch(r"blocks\.(\d+)\.(.+)", name)
    if layout == "official":
        if m:
            return f"blocks.{m.group(1)}.{_OFFICIAL_BLOCK.get(m.group(2), m.group(2))}"
        return name
    if m:
        return f"encoder.block.{m.group(1)}.{_HF_BLOCK[m.group(2)]}"
    return {"token_embedding.weight": embed_key, "norm.weight": "encoder.final_layer_norm.weight"}[name]


def full_shapes(cfg: T5Config) -> dict[str, tuple[int, ...]]:
    """Unsharded shape of every parameter, by our name."""
    with torch.device("meta"):
        enc = T5Encoder(cfg)
    return {n: tuple(p.shape) for n, p in enc.named_parameters()}


# ---------------------------------------------------------------------------------------------
# config
def config_from_hf(d: dict, where: str = "config.json") -> T5Config:
    if d.get("model_type") not in (None, "umt5"):
        raise ValueError(f"{where}: model_type={d.get('model_type')!r}, but this encoder implements UMT5 "
                         "(a relative position bias in every layer); the checkpoint cannot be loaded")
    proj = d.get("feed_forward_proj", "gated-gelu")
    if proj != "gated-gelu" or d.get("dense_act_fn", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
        raise ValueError(f"{where}: feed_forward_proj={proj!r}, dense_act_fn={d.get('dense_act_fn')!r}; "
                         "only UMT5's gated-gelu(tanh) FFN is implemented")
    try:
        return T5Config(vocab_size=d["vocab_size"], d_model=d["d_model"], d_kv=d["d_kv"], num_heads=d["num_heads"],
                        d_ff=d["d_ff"], num_layers=d["num_layers"],
                        num_buckets=d.get("relative_attention_num_buckets", 32),
                        max_distance=d.get("relative_attention_max_distance", 128),
                        eps=d.get("layer_norm_epsilon", 1e-6))
    except KeyError as e:
        raise ValueError(f"{where} lacks the key {e.args[0]!r} needed to build the UMT5 encoder") from None


def config_to_hf(cfg: T5Config) -> dict:
    return {"architectures": ["UMT5EncoderModel"], "model_type": "umt5", "vocab_size": cfg.vocab_size,
            "d_model": cfg.d_model, "d_kv": cfg.d_kv, "num_heads": cfg.num_heads, "d_ff": cfg.d_ff,
            "num_layers": cfg.num_layers, "num_decoder_layers": cfg.num_layers,
            "relative_attention_num_buckets": cfg.num_buckets,
            "relative_attention_max_distance": cfg.max_distance, "layer_norm_epsilon": cfg.eps,
            "feed_forward_proj": "gated-gelu", "dense_act_fn": "gelu_new", "is_gated_act": True,
            "is_encoder_decoder": False, "tie_word_embeddings": True, "pad_token_id": 0, "eos_token_id": 1}


def _config_from_official_shapes(shapes: dict[str, tuple[int, ...]]) -> T5Config:
    """Read the dimensions off the tensors (max_distance and eps are not stored: UMT5's 128, 1e-6)."""
    try:
        vocab, d_model = shapes["token_embedding.weight"]
        num_buckets, num_heads = shapes["blocks.0.pos_embedding.embedding.weight"]
        inner = shapes["blocks.0.attn.q.weight"][0]
        d_ff = shapes["blocks.0.ffn.fc1.weight"][0]
    except KeyError as e:
        raise ValueError(f"official UMT5 checkpoint lacks {e.args[0]!r}; cannot infer its dimensions") from None
    num_layers = 1 + max(int(k.split(".")[1]) for k in shapes if k.startswith("blocks."))
    return T5Config(vocab_size=vocab, d_model=d_model, d_kv=inner // num_heads, num_heads=num_heads,
                    d_ff=d_ff, num_layers=num_layers, num_buckets=num_buckets)


# ---------------------------------------------------------------------------------------------
# lazy tensor sources
class _SafetensorsSource:
    def __init__(self, files: list[str]):
        from safetensors import safe_open

        self._handles = {}
        for f in files:
            h = safe_open(f, framework="pt", device="cpu")
            for k in h.keys():
                self._handles[k] = h

    def keys(self) -> set[str]:
        return set(self._handles)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._handles[key].get_slice(key).get_shape())

    def read(self, key: str, piece: tuple[int, int, int] | None) -> torch.Tensor:
        if piece is None:
            return self._handles[key].get_tensor(key)
        dim, start, stop = piece
        index = [slice(None)] * len(self.shape(key))
        index[dim] = slice(start, stop)
        return self._handles[key].get_slice(key)[tuple(index)]


class _TorchSource:
    def __init__(self, path: str):
        try:
            self._sd = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        except RuntimeError:
            # files written in the legacy (non-zip) format cannot be memory-mapped
            self._sd = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(self._sd, dict):
            raise ValueError(f"{path} holds a {type(self._sd).__name__}, not a state dict of tensors")

    def keys(self) -> set[str]:
        return set(self._sd)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._sd[key].shape)

    def read(self, key: str, piece: tuple[int, int, int] | None) -> torch.Tensor:
        t = self._sd[key]
        return t if piece is None else t.narrow(piece[0], piece[1], piece[2] - piece[1])


def _is_t5_config(path: str) -> dict | None:
    """A T5 config.json, or None (a Wan model directory's config.json describes the DiT)."""
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        d = json.load(f)
    return d if {"d_model", "d_kv", "num_heads"} <= set(d) else None


def _open(path: str) -> tuple[str, object, T5Config]:
    """(layout, source, config) for a checkpoint file or directory."""
    if os.path.isdir(path):
        index = os.path.join(path, "model.safetensors.index.json")
        single = os.path.join(path, "model.safetensors")
        if os.path.isfile(index) or os.path.isfile(single):
            cfg_json = _is_t5_config(os.path.join(path, "config.json"))
            if cfg_json is None:
                raise ValueError(f"{path} has safetensors weights but no UMT5 config.json beside them")
            if os.path.isfile(index):
                with open(index) as f:
                    files = sorted(set(json.load(f)["weight_map"].values()))
                files = [os.path.join(path, x) for x in files]
            else:
                files = [single]
            return "hf", _SafetensorsSource(files), config_from_hf(cfg_json, os.path.join(path, "config.json"))
        official = os.path.join(path, OFFICIAL_FILENAME)
        if os.path.isfile(official):
            return _open(official)
        raise ValueError(f"{path} holds neither a transformers UMT5 checkpoint (config.json + model.safetensors "
                         f"[.index.json]) nor Wan2.1's {OFFICIAL_FILENAME}")
    if not os.path.isfile(path):
        raise ValueError(f"UMT5 checkpoint {path!r} does not exist")
    source = _SafetensorsSource([path]) if path.endswith(".safetensors") else _TorchSource(path)
    keys = source.keys()
    layout = "official" if "token_embedding.weight" in keys else "hf"
    cfg_json = _is_t5_config(os.path.join(os.path.dirname(path), "config.json"))
    if cfg_json is not None:
        cfg = config_from_hf(cfg_json)
    elif layout == "official":
        cfg = _config_from_official_shapes({k: source.shape(k) for k in keys})
    else:
        raise ValueError(f"{path}: a transformers-layout file needs its config.json beside it")
    return layout, source, cfg


def _check_keys(layout: str, keys: set[str], wanted: set[str], path: str) -> None:
    missing = sorted(wanted - keys)
    extra = keys - wanted
    if layout == "hf":
        extra = {k for k in extra if not _HF_IGNORED.fullmatch(k)}
    if missing or extra:
        def show(ks):
            ks = sorted(ks)
            return ", ".join(ks[:12]) + (f" ... ({len(ks)} in all)" if len(ks) > 12 else "")
        raise ValueError(f"UMT5 checkpoint {path} ({layout} layout) does not match the encoder: "
                         f"missing keys [{show(missing)}]; unexpected keys [{show(extra)}]. "
                         "No weights were loaded.")


def resolve_dtype(dtype) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {sorted(_DTYPES)}")
    return _DTYPES[dtype]


def load_t5_encoder(path, dtype=None, device="cpu", shard: T5Shard | None = None, quant: str | None = None,
                    work_device=None) -> T5Encoder:
    """Build a T5Encoder from `path`; with `shard`, only that tensor-parallel rank's slices are read.

    `quant` "fp8": the block linears become Fp8Linear (models/quant) and each of their weights is
    quantized per output channel as it is read (on `work_device`, default `device`): the
    full-precision encoder never sits in memory."""
    path = os.fspath(path)
    layout, source, cfg = _open(path)
    keys = source.keys()
    embed_key = "encoder.embed_tokens.weight" if "encoder.embed_tokens.weight" in keys else "shared.weight"
    shapes = full_shapes(cfg)
    names = {n: file_key(n, layout, embed_key) for n in shapes}
    _check_keys(layout, keys, set(names.values()), path)
    dtype = resolve_dtype(dtype) or source.read(names["token_embedding.weight"], (0, 0, 1)).dtype
    if shard is not None:
        enc = shard.build(cfg)
    else:
        with torch.device("meta"):
            enc = T5Encoder(cfg)
    quantized = set(quantize_linears(enc, T5_LINEARS)) if quant == "fp8" else set()
    state, jobs = {}, []
    on_host = torch.device(device).type == "cpu"
    for name, key in names.items():
        if source.shape(key) != shapes[name]:
            raise ValueError(f"{path}: {key} has shape {source.shape(key)}, the config "
                             f"({cfg}) needs {shapes[name]}; the checkpoint does not match its config")
        piece = shard.param_slice(name, cfg) if shard is not None else None
        layer = name.removesuffix(".weight")
        if layer in quantized:
            q, scale = quantize_rows(source.read(key, piece).to(work_device or device))
            state[name], state[layer + ".weight_scale"] = q.to(device), scale.to(device)
            continue
        if on_host and piece is None and source.read(key, None).dtype == dtype:
            state[name] = source.read(key, None).contiguous()  # memory-mapped: nothing is read until used
            continue
        shape = list(shapes[name])
        if piece is not None:
            shape[piece[0]] = piece[2] - piece[1]
        state[name] = torch.empty(shape, dtype=dtype, device=device)
        jobs.append((state[name], lambda key=key, piece=piece: source.read(key, piece)))
    copy_all(jobs)  # from the file's pages straight to the device (or into host memory), a few at a time
    enc.load_state_dict(state, strict=True, assign=True)
    return enc.eval().requires_grad_(False)


# ---------------------------------------------------------------------------------------------
# writer
def save_t5_encoder(enc: T5Encoder, path, layout: str = "hf", max_shard_bytes: int | None = None,
                    dtype=None) -> str:
    """Write a full (unsharded) encoder as a transformers directory or an official .pth.

    hf: `path` is a directory; with `max_shard_bytes`, weights are split into shards with an index.
    official: `path` is the .pth file, or a directory that gets OFFICIAL_FILENAME. Returns the path
    written (directory or file).
    """
    if enc.shard is not None:
        raise ValueError(f"cannot save a tensor-parallel shard ({enc.shard}); save the full encoder")
    cfg = enc.config
    dtype = resolve_dtype(dtype)
    state = {n: (p.detach().to(dtype) if dtype else p.detach()).cpu().contiguous() for n, p in enc.named_parameters()}
    path = os.fspath(path)
    if layout == "official":
        if (cfg.max_distance, cfg.eps) != (128, 1e-6):
            raise ValueError(f"the official layout stores no config; max_distance={cfg.max_distance}, "
                             f"eps={cfg.eps} would be lost (UMT5 uses 128, 1e-6). Use layout='hf'")
        if os.path.isdir(path):
            path = os.path.join(path, OFFICIAL_FILENAME)
        torch.save({file_key(n, "official"): t for n, t in state.items()}, path)
        return path
    if layout != "hf":
        raise ValueError(f"layout {layout!r} is not 'hf' or 'official'")
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config_to_hf(cfg), f, indent=2)
    save_safetensors({file_key(n, "hf"): t for n, t in state.items()}, path, "model", max_shard_bytes)
    return path


def _from_pretrained(cls, path, dtype=None, device="cpu", shard=None, **kwargs) -> T5Encoder:
    """HF UMT5 directory (safetensors, sharded too) or the official Wan2.1 .pth (load_t5_encoder; kwargs:
    quant, work_device)."""
    return load_t5_encoder(path, dtype=dtype, device=device, shard=shard, **kwargs)


T5Encoder.from_pretrained = classmethod(_from_pretrained)
