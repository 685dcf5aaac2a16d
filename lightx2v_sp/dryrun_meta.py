"""The dry run's meta-device half: real modules at real shapes, no memory, no weights.

PyTorch's meta device runs a module's forward on shapes and dtypes alone, so a 14B DiT block at
75 600 tokens, the UMT5-XXL encoder on 512 tokens and a 720p VAE decode cost milliseconds to
seconds and no memory. Each function here drives the code a run uses (the model's forward, the
decode of one rank's band, the placement of the experts) and checks what comes out.

- `dit_forward`: the DiT with one block, each rank's slice of the tokens cut where parallelize_wan
  cuts it (its SEQUENCE_PLAN) and Ulysses attention's exchange replaced by its shapes: the local
  kernel sees [B, S, H/P, D], the block [B, S_rank, H, D];
- `text_forward`, `vae_decode`: the encoder and decode_rows (pipeline/decode.py) as they are;
- `observe_placement`: install_experts with a `MetaTransport`, walked through the sampler's
  timesteps; the bytes that end up on the "device" and in pinned host memory are measured from
  what the placement code allocated and bound, not from a formula.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Optional

import torch

META = torch.device("meta")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def meta(shape, dtype=torch.float32) -> torch.Tensor:
    return torch.empty(tuple(shape), dtype=dtype, device=META)


def meta_dit(config, dtype: str, num_layers: Optional[int] = None, quant: Optional[str] = None):
    """A WanModel on the meta device in the run's dtype (fp32 kept where the loader keeps it; with
    model.quant=fp8 the block linears as the loader makes them)."""
    from lightx2v_sp.models.quant import DIT_LINEARS, quantize_linears
    from lightx2v_sp.models.wan import WanModel

    if num_layers is not None:
        config = dataclasses.replace(config, num_layers=num_layers)
    with torch.device("meta"):
        model = WanModel(config)
        model.set_dtype(DTYPES[dtype])
        if quant == "fp8":
            quantize_linears(model, DIT_LINEARS)
    return model.eval().requires_grad_(False)


# ------------------------------------------------------------------------------------------------
# DiT: one rank's forward

class _UlyssesShapes:
    """Ulysses (x ring) attention's shapes without its exchange: [B, S_r, H, D] -> the local kernel on
    [B, S, H/P, D] -> [B, S_r, H, D], P the Ulysses degree (a ring's blocks see the same head count)."""

    def __init__(self, sizes: list[int], rank: int, backend: str, ulysses: Optional[int] = None):
        self.sizes, self.rank, self.backend = sizes, rank, backend
        self.ulysses = ulysses or len(sizes)

    def __call__(self, q, k, v):
        from lightx2v_sp.attention import attention
        from lightx2v_sp.distributed.mesh import heads_error

        b, s_local, h, d = q.shape
        p = self.ulysses
        if h % p:
            raise heads_error(h, p, p)
        if s_local != self.sizes[self.rank]:
            raise ValueError(f"rank {self.rank} holds {s_local} tokens, the split says {self.sizes}")
        full = [meta((b, sum(self.sizes), h // p, d), q.dtype) for _ in range(3)]
        out = attention(*full, backend=self.backend)  # the local kernel on all tokens of my heads
        if tuple(out.shape) != (b, sum(self.sizes), h // p, d):
            raise ValueError(f"the local attention kernel returned {tuple(out.shape)} for {tuple(full[0].shape)}")
        return meta((b, s_local, h, d), out.dtype)


def _cut(t: torch.Tensor, dim: int, sizes: list[int], rank: int) -> torch.Tensor:
    if t.shape[dim] != sum(sizes):
        raise ValueError(f"a tensor of {t.shape[dim]} tokens meets a split of {sum(sizes)} ({sizes})")
    return t.narrow(dim, sum(sizes[:rank]), sizes[rank])


def _emulate_split(model, sizes: list[int], rank: int, backend: str, ulysses: int) -> None:
    """Install parallelize_wan's split points (its SEQUENCE_PLAN) as slicing, and Ulysses' shapes."""
    from lightx2v_sp.models.wan import parallelize as par

    def split_tokens(module, args, tokens):  # [B, S, dim] -> [B, S_r, dim]
        return _cut(tokens, 1, sizes, rank)

    def split_rope(module, args, tables):  # ([S, 1, D], ...) -> ([S_r, 1, D], ...)
        return tuple(_cut(t, 0, sizes, rank) for t in tables)

    def split_times(module, args):  # [B, S, freq] -> [B, S_r, freq]; [B, freq] passes
        return (_cut(args[0], 1, sizes, rank),) if args[0].ndim == 3 else None

    def gather(module, args, out):  # [B, S_r, C*p] -> [B, S, C*p]
        return meta((out.shape[0], sum(sizes), *out.shape[2:]), out.dtype)

    emulation = {par._split_tokens: split_tokens, par._split_rope: split_rope,
                 par._split_token_times: split_times, par._gather_output: gather}
    for name, make, when in par.SEQUENCE_PLAN:
        if make not in emulation:
            raise ValueError(f"parallelize_wan splits the sequence at {name} ({make.__name__}), which the dry run "
                             "does not emulate; teach lightx2v_sp/dryrun_meta.py that split point")
        hook = emulation[make]
        sub = model.get_submodule(name)
        sub.register_forward_pre_hook(hook) if when == "pre" else sub.register_forward_hook(hook)
    for block in model.blocks:
        block.self_attn.attn_fn = _UlyssesShapes(sizes, rank, backend, ulysses)


@torch.no_grad()
def dit_forward(config, dtype: str, x: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor,
                image_context: Optional[torch.Tensor], sizes: list[int], rank: int,
                backend: str = "sdpa", quant: Optional[str] = None, ulysses: Optional[int] = None) -> torch.Tensor:
    """The DiT (one block of `config`) on rank `rank` of a sequence group (Ulysses `ulysses`, default all of
    it, x ring) splitting the tokens `sizes`."""
    extra = () if image_context is None else (image_context,)
    ulysses = ulysses or len(sizes)
    key = (repr(config), dtype, quant, *(tuple(t.shape) for t in (x, timestep, context, *extra)), tuple(sizes),
           rank, ulysses)
    if key not in _FORWARDS:
        model = meta_dit(config, dtype, num_layers=1, quant=quant)
        model.set_attention_backend(backend)
        if len(sizes) > 1:
            _emulate_split(model, sizes, rank, backend, ulysses)
        _FORWARDS[key] = model(x, timestep, context, *extra)
    return _FORWARDS[key]


_FORWARDS: dict = {}  # a forward at the same shapes gives the same shapes: run each once per process


# ------------------------------------------------------------------------------------------------
# text encoder, VAE

@torch.no_grad()
def text_forward(t5_config, num_prompts: int, tokens: int) -> torch.Tensor:
    """UMT5 on `num_prompts` prompts of `tokens` tokens: [n, L, d_model]."""
    from lightx2v_sp.models.t5.model import T5Encoder

    key = ("t5", repr(t5_config), num_prompts, tokens)
    if key not in _FORWARDS:
        with torch.device("meta"):
            encoder = T5Encoder(t5_config).eval()
        ids = torch.zeros((num_prompts, tokens), dtype=torch.long, device=META)
        _FORWARDS[key] = encoder(ids, torch.ones_like(ids))
    return _FORWARDS[key]


_DECODES: dict = {}  # the same decode (VAE, latents, band windows) is not run twice in one process


_VAES: dict = {}


def meta_vae(vae_kwargs: dict, dtype: str):
    """AutoencoderKLWan on the meta device in the decode's dtype (one per config and dtype)."""
    from diffusers import AutoencoderKLWan

    from lightx2v_sp.plan_sizes import vae_init_kwargs

    key = (json.dumps(vae_kwargs, sort_keys=True), dtype)
    if key not in _VAES:
        with torch.device("meta"):
            vae = AutoencoderKLWan(**vae_init_kwargs(vae_kwargs))
        if DTYPES[dtype] != torch.float32:  # (diffusers warns about .to() even where it changes nothing)
            vae = vae.to(DTYPES[dtype])
        _VAES[key] = vae.eval().requires_grad_(False)
    return _VAES[key]


# The decoder runs latent frame by frame: the first frame on its own path, every later one through the
# same modules with the same shapes (its causal caches hold 2 frames). Two latent frames exercise both
# paths at the real height and width; the frames of the whole video follow by arithmetic.
DECODE_FRAMES = 2


def _band_signature(vae, bands, height: int) -> tuple:
    """What the decode of `bands` looks like to the decoder: the rows of every cropped window and where
    the band sits in it. Two middle bands of one size decode through the same shapes."""
    from lightx2v_sp.models.vae_rows import band_window, decoder_stages, unsupported_reason

    if unsupported_reason(vae) is not None or bands == [(0, height)]:
        return tuple(bands)
    stages, _ = decoder_stages(vae.decoder)
    return tuple((s.factor, lo, hi) if lo == 0 or hi == height * s.factor else (s.factor, hi - lo, a * s.factor - lo)
                 for a, b in bands for s in stages for lo, hi in [band_window(a, b, height, s.factor, s.halo)])


@torch.no_grad()
def vae_decode(vae_kwargs: dict, vae_cfg, latent_shape, world: int, rank: int):
    """decode_rows (the runner's decode) of rank `rank` on meta latents [1, C, min(F, 2), H, W]:
    (the shape of this rank's piece of the video or None, every rank's pixel rows)."""
    from lightx2v_sp.models.vae import WanVAE
    from lightx2v_sp.pipeline.decode import _layout, decode_rows

    wan_vae = WanVAE(meta_vae(vae_kwargs, vae_cfg.dtype))
    height = latent_shape[-2]
    layout = _layout(wan_vae, vae_cfg, height, world)
    latents = meta((1, latent_shape[0], min(latent_shape[1], DECODE_FRAMES), *latent_shape[2:]))
    key = (json.dumps(vae_kwargs, sort_keys=True), vae_cfg.dtype, tuple(latents.shape),
           _band_signature(wan_vae.vae, layout[rank], height))
    if key not in _DECODES:
        piece, _ = decode_rows(wan_vae, latents, META, vae_cfg, "gpu", world, rank)
        _DECODES[key] = None if piece is None else tuple(piece.shape)
    return _DECODES[key], [wan_vae.spatial_stride * sum(b - a for a, b in bands) for bands in layout]


# ------------------------------------------------------------------------------------------------
# placement of the experts

class MetaTransport:
    """A Transport whose "device" and "host" are the meta device; it records every host buffer
    (pinned memory on CUDA) and hands out device buffers like CudaTransport."""

    def __init__(self):
        self.device = META
        self.host: list[torch.Tensor] = []

    def host_empty(self, nbytes: int) -> torch.Tensor:
        t = meta((nbytes,), torch.uint8)
        self.host.append(t)
        return t

    def host_free(self, tensor: torch.Tensor) -> None:
        pass  # the record stays: the plan is held against the peak, which came before

    def device_empty(self, nbytes: int) -> torch.Tensor:
        return meta((nbytes,), torch.uint8)

    def copy_async(self, dst, src, after=None):
        return None

    def wait(self, event) -> None:
        pass

    def record(self):
        return None

    def synchronize(self) -> None:
        pass

    def host_bytes(self) -> int:
        return sum(t.numel() for t in self.host)


def _storages(tensors) -> dict[int, int]:
    return {t.untyped_storage()._cdata: t.untyped_storage().nbytes() for t in tensors}


def device_bytes(models, handles, transport: MetaTransport) -> int:
    """Bytes on the device now: every storage the models' tensors use that is not a host buffer,
    plus the block buffers the offload handles hold."""
    host = _storages(transport.host)
    tensors = [t for m in models for t in list(m.parameters()) + list(m.buffers())]
    tensors += [f for h in handles for f in getattr(h, "_dev_flat", []) if f is not None]
    return sum(n for key, n in _storages(tensors).items() if key not in host)


def _tiny_block_inputs(config, dtype: str):
    """Inputs of one block at one token: enough to run the offload hooks (they see weights, not tokens)."""
    dt = DTYPES[dtype]
    hd = config.dim // config.num_heads
    rope = (meta((1, 1, hd)), meta((1, 1, hd)))
    image = meta((1, 1, config.dim), dt) if config.image_dim is not None else None
    return meta((1, 1, config.dim), dt), meta((1, 6, config.dim)), meta((1, 1, config.dim), dt), rope, image


@torch.no_grad()
def observe_placement(configs, cfg, boundary_ratio: Optional[float]) -> dict:
    """install_experts on meta experts, walked through the sampler's timesteps (one block forward
    per expert, which allocates what block offload allocates): the peak device bytes of the DiT
    weights, the pinned host bytes, and the host arena of each block offload."""
    from lightx2v_sp.distributed import ParallelDims
    from lightx2v_sp.pipeline.experts import install_experts
    from lightx2v_sp.pipeline.scheduler import make_scheduler

    models = [meta_dit(c, cfg.model.dtype, quant=cfg.model.quant) for c in configs]
    run_cfg = _one_process(cfg)
    transport = MetaTransport()
    experts = install_experts(models, run_cfg, ParallelDims(), META, boundary_ratio, transport=transport)
    handles = experts.block_offloads
    s = cfg.sample
    scheduler = make_scheduler(s.scheduler, s.steps, s.shift, timesteps=s.timesteps)
    peak, active = 0, None
    for t in scheduler.timesteps:
        dit, _ = experts.select(t)
        if dit is not active:  # a switch (or the first step): what is placed changes only here
            active = dit
            dit.blocks[0](*_tiny_block_inputs(dit.config, cfg.model.dtype))
            peak = max(peak, device_bytes(models, handles, transport))
    experts.release()
    arenas = [h.block_nbytes * len(h.blocks) for h in handles if hasattr(h, "block_nbytes")]
    return {"device_peak": peak, "host_pinned": transport.host_bytes(), "block_arenas": arenas,
            "switches": experts.num_switches}


def _one_process(cfg):
    import copy

    out = copy.deepcopy(cfg)
    out.model.compile = False  # torch.compile has nothing to compile on the meta device
    out.offload.share_host = False  # one process: the same arenas, none of the node's collectives
    out.attention.backend = "sdpa"  # the kernel a GPU picks is no matter of shapes
    return out
