"""The Wan2.1 text-to-video DiT: math only. Sequence parallelism is installed by parallelize.py.

Native parameter names follow the official Wan2.1 checkpoint, except that self-attention keeps
q, k and v in one `qkv` projection and cross-attention keeps k and v in one `kv` projection (one
GEMM instead of three / two); loader.py maps both on-disk layouts onto these names.

Precision: weights and activations run in the compute dtype; the time embedding and the
modulation tables stay in fp32 (as in the official model), and every `1 + scale` is formed in
fp32 before it is rounded to the compute dtype.
"""
from __future__ import annotations

import functools
import math
from typing import NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from lightx2v_sp.attention import attention

from .config import WanConfig

# Parameters whose names contain one of these stay fp32 whatever the compute dtype.
FP32_PARAM_PATTERNS = ("modulation", "time_embedding.")


def keeps_fp32(name: str) -> bool:
    return any(p in name for p in FP32_PARAM_PATTERNS)


def sinusoidal_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """[B] timesteps -> [B, dim] fp32, cos half then sin half (Wan's order)."""
    half = dim // 2
    freqs = torch.exp(torch.arange(half, dtype=torch.float32, device=t.device) * (-math.log(10000.0) / half))
    angles = t.float()[:, None] * freqs
    return torch.cat([angles.cos(), angles.sin()], dim=1)


def modulation(table: torch.Tensor, e: torch.Tensor, scale_rows: tuple[int, ...], dtype: torch.dtype):
    """Rows of `table + e` in `dtype`; `scale_rows` hold 1 + scale.

    e [B, rows, dim] (one timestep per sample) -> [B, 1, dim] each; e [B, S, rows, dim] (one per
    token, Wan2.2 TI2V) -> [B, S, dim] each.
    """
    m = table + e
    m = m.movedim(2, 1) if m.ndim == 4 else m.unsqueeze(2)  # fp32 [B, rows, S or 1, dim]
    m[:, list(scale_rows)] += 1
    return m.to(dtype).unbind(1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs (x0, x1) of [B, S, H, D] by the angles in cos/sin [S, 1, D].

    `cos` repeats each pair's cosine twice and `sin` holds (-sin, +sin), so the complex product
    (x0 + i x1)(c + i s) is x * cos + swap(x) * sin: three kernels, computed in fp32 and written
    straight back in x's dtype.
    """
    swapped = x.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)  # (x1, x0) per pair
    return torch.addcmul(x * cos, swapped, sin, out=torch.empty_like(x))


def default_attn_fn(backend: str = "auto"):
    return functools.partial(attention, backend=backend)


class PatchEmbed(nn.Module):
    """Conv3d with kernel == stride, computed as one GEMM over the patches (output is token-major)."""

    def __init__(self, in_dim: int, dim: int, patch_size: tuple[int, int, int]):
        super().__init__()
        self.patch_size = patch_size
        self.weight = nn.Parameter(torch.empty(dim, in_dim, *patch_size))
        self.bias = nn.Parameter(torch.empty(dim))
        fan_in = in_dim * math.prod(patch_size)
        nn.init.uniform_(self.weight, -1 / math.sqrt(fan_in), 1 / math.sqrt(fan_in))
        nn.init.uniform_(self.bias, -1 / math.sqrt(fan_in), 1 / math.sqrt(fan_in))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, C, F, H, W] -> [B, S, dim]
        b, c, f, h, w = x.shape
        pt, ph, pw = self.patch_size
        x = x.view(b, c, f // pt, pt, h // ph, ph, w // pw, pw).permute(0, 2, 4, 6, 1, 3, 5, 7)
        x = x.reshape(b, (f // pt) * (h // ph) * (w // pw), c * pt * ph * pw)
        return F.linear(x, self.weight.flatten(1), self.bias)


class ImageEmbedding(nn.Module):
    """CLIP image tokens [B, L, image_dim] -> [B, L, dim] (official `img_emb.proj`: LN, Linear, GELU,
    Linear, LN; indices 0, 1, 3, 4 hold weights)."""

    def __init__(self, image_dim: int, dim: int):
        super().__init__()
        self.proj = nn.Sequential(nn.LayerNorm(image_dim), nn.Linear(image_dim, image_dim), nn.GELU(),
                                  nn.Linear(image_dim, dim), nn.LayerNorm(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


class RotaryEmbedding(nn.Module):
    """3-D RoPE tables for a (frames, height, width) token grid, in token order, as [S, 1, D] fp32.

    The tables depend on the grid alone, so the last grid's are kept: every denoise step of a video
    reuses them instead of rebuilding them (some twenty small kernels per forward). Callers only read them.
    """

    def __init__(self, config: WanConfig):
        super().__init__()
        self.dims = config.rope_dims
        self.theta = config.rope_theta
        self._last: tuple[tuple, tuple[torch.Tensor, torch.Tensor]] | None = None

    def forward(self, grid: tuple[int, int, int], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        key = (tuple(grid), torch.device(device), torch.is_inference_mode_enabled())
        if self._last is None or self._last[0] != key:
            self._last = (key, self._tables(grid, device))
        return self._last[1]

    def _tables(self, grid: tuple[int, int, int], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        cos_parts, sin_parts = [], []
        for axis, (n, d) in enumerate(zip(grid, self.dims)):
            # angles in float64 (as Wan does) on a small [n, d/2] table, then expanded over the grid
            inv = self.theta ** (-torch.arange(0, d, 2, dtype=torch.float64, device=device) / d)
            angles = torch.arange(n, dtype=torch.float64, device=device)[:, None] * inv
            shape = [1, 1, 1, d // 2]
            shape[axis] = n
            cos_parts.append(angles.cos().float().view(shape).expand(*grid, d // 2))
            sin_parts.append(angles.sin().float().view(shape).expand(*grid, d // 2))
        cos = torch.cat(cos_parts, dim=-1).reshape(-1, 1, sum(self.dims) // 2)  # [S, 1, D/2]
        sin = torch.cat(sin_parts, dim=-1).reshape(-1, 1, sum(self.dims) // 2)
        return cos.repeat_interleave(2, dim=-1), torch.stack([-sin, sin], dim=-1).flatten(-2)


class SelfAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, eps: float, qk_norm: bool):
        super().__init__()
        self.dim, self.num_heads = dim, num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.o = nn.Linear(dim, dim)
        self.norm_q = nn.RMSNorm(dim, eps=eps) if qk_norm else nn.Identity()
        self.norm_k = nn.RMSNorm(dim, eps=eps) if qk_norm else nn.Identity()
        # [B, S, H, D] q, k, v -> [B, S, H, D]; parallelize_wan swaps in Ulysses attention here.
        self.attn_fn = default_attn_fn()

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        b, s, _ = x.shape
        q, k, v = self.qkv(x).split(self.dim, dim=-1)
        hd = self.dim // self.num_heads  # explicit: a rank may hold 0 tokens, where -1 cannot be inferred
        q = apply_rope(self.norm_q(q).view(b, s, self.num_heads, hd), *rope)
        k = apply_rope(self.norm_k(k).view(b, s, self.num_heads, hd), *rope)
        v = v.view(b, s, self.num_heads, hd)
        return self.o(self.attn_fn(q, k, v).flatten(2))


class CrossAttention(nn.Module):
    """Attention to the text tokens; with `image_context`, a second key/value branch (`kv_img`,
    Wan2.1 I2V) attends to the embedded CLIP tokens with the same queries, and the two results add."""

    def __init__(self, dim: int, num_heads: int, eps: float, qk_norm: bool, image_branch: bool = False):
        super().__init__()
        self.dim, self.num_heads = dim, num_heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.o = nn.Linear(dim, dim)
        self.norm_q = nn.RMSNorm(dim, eps=eps) if qk_norm else nn.Identity()
        self.norm_k = nn.RMSNorm(dim, eps=eps) if qk_norm else nn.Identity()
        if image_branch:
            self.kv_img = nn.Linear(dim, 2 * dim)
            self.norm_k_img = nn.RMSNorm(dim, eps=eps) if qk_norm else nn.Identity()
        self.attn_fn = default_attn_fn()

    def _heads(self, kv: torch.Tensor, norm_k: nn.Module):
        b, n, _ = kv.shape
        k, v = kv.split(self.dim, dim=-1)
        hd = self.dim // self.num_heads
        return norm_k(k).view(b, n, self.num_heads, hd), v.view(b, n, self.num_heads, hd)

    def forward(self, x: torch.Tensor, context: torch.Tensor,
                image_context: torch.Tensor | None = None) -> torch.Tensor:
        b, s, _ = x.shape
        q = self.norm_q(self.q(x)).view(b, s, self.num_heads, self.dim // self.num_heads)
        out = self.attn_fn(q, *self._heads(self.kv(context), self.norm_k))
        if image_context is not None:
            out = out + self.attn_fn(q, *self._heads(self.kv_img(image_context), self.norm_k_img))
        return self.o(out.flatten(2))


class FeedForward(nn.Sequential):
    """Linear -> GELU (tanh) -> Linear, with Wan's parameter names (ffn.0, ffn.2).

    On CUDA in half precision the GELU runs in the first GEMM's epilogue (cuBLASLt, on the fp32
    accumulator, before the one rounding to the compute dtype), which saves a read and a write of
    the [S, ffn_dim] activation: the largest tensor of a block.
    """

    def __init__(self, dim: int, ffn_dim: int):
        super().__init__(nn.Linear(dim, ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(ffn_dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fc1, act, fc2 = self
        if x.is_cuda and x.dtype in (torch.bfloat16, torch.float16) and fc1.bias is not None \
                and fc1.weight.dtype == x.dtype:  # a weight in the compute dtype (not an installed fp8 layer)
            h = torch._addmm_activation(fc1.bias, x.reshape(-1, x.shape[-1]), fc1.weight.t(), use_gelu=True)
            return fc2(h.view(*x.shape[:-1], h.shape[-1]))
        return fc2(act(fc1(x)))


class WanBlock(nn.Module):
    def __init__(self, config: WanConfig):
        super().__init__()
        dim, eps = config.dim, config.eps
        self.eps = eps
        self.self_attn = SelfAttention(dim, config.num_heads, eps, config.qk_norm)
        self.norm3 = nn.LayerNorm(dim, eps=eps) if config.cross_attn_norm else nn.Identity()
        self.cross_attn = CrossAttention(dim, config.num_heads, eps, config.qk_norm, config.image_dim is not None)
        self.ffn = FeedForward(dim, config.ffn_dim)
        self.modulation = nn.Parameter(torch.randn(1, 6, dim) / dim**0.5)

    def forward(self, x, e0, context, rope, image_context=None):
        """x [B, S, dim]; e0 fp32 [B, 6, dim] (time projection); context [B, L, dim]; rope for S tokens;
        image_context [B, L_img, dim] (embedded CLIP tokens) for Wan2.1 I2V, else None."""
        shift, scale, gate, c_shift, c_scale, c_gate = modulation(self.modulation, e0, (1, 4), x.dtype)
        shape = x.shape[-1:]
        y = self.self_attn(torch.addcmul(shift, F.layer_norm(x, shape, eps=self.eps), scale), rope)
        x = torch.addcmul(x, y, gate)
        x = x + self.cross_attn(self.norm3(x), context, image_context)
        y = self.ffn(torch.addcmul(c_shift, F.layer_norm(x, shape, eps=self.eps), c_scale))
        return torch.addcmul(x, y, c_gate)


class Head(nn.Module):
    def __init__(self, config: WanConfig):
        super().__init__()
        self.eps = config.eps
        self.head = nn.Linear(config.dim, config.out_dim * math.prod(config.patch_size))
        self.modulation = nn.Parameter(torch.randn(1, 2, config.dim) / config.dim**0.5)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:  # [B, S, dim] -> [B, S, C*pt*ph*pw]
        shift, scale = modulation(self.modulation, temb.unsqueeze(-2), (1,), x.dtype)  # temb [B, dim] or [B, S, dim]
        return self.head(torch.addcmul(shift, F.layer_norm(x, x.shape[-1:], eps=self.eps), scale))


class BlockInputs(NamedTuple):
    """What `WanModel.embed` hands the blocks and the head (one forward's worth)."""
    tokens: torch.Tensor                        # [B, S, dim] patch tokens
    temb: torch.Tensor                          # fp32 [B, dim] or [B, S, dim] time embedding (the head's)
    e0: torch.Tensor                            # fp32 [B, (S,) 6, dim] time projection (the blocks' modulation)
    context: torch.Tensor                       # [B, L, dim] embedded text
    rope: tuple[torch.Tensor, torch.Tensor]     # [S, 1, D] cos / sin tables
    image_context: Optional[torch.Tensor]       # [B, L_img, dim] embedded CLIP tokens (Wan2.1 I2V) or None
    grid: tuple[int, int, int]                  # token frames, rows, columns


class WanModel(nn.Module):
    """latents [B, C, F, H, W], timestep [B], context [B, L, text_dim] -> [B, C, F, H, W]."""

    def __init__(self, config: WanConfig):
        super().__init__()
        self.config = config
        dim = config.dim
        self.patch_embedding = PatchEmbed(config.in_dim, dim, config.patch_size)
        self.rope = RotaryEmbedding(config)
        self.text_embedding = nn.Sequential(nn.Linear(config.text_dim, dim), nn.GELU(approximate="tanh"),
                                            nn.Linear(dim, dim))
        self.time_embedding = nn.Sequential(nn.Linear(config.freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        if config.image_dim is not None:  # Wan2.1 I2V: CLIP tokens -> LayerNorm, MLP (exact GELU), LayerNorm
            self.img_emb = ImageEmbedding(config.image_dim, dim)
        self.blocks = nn.ModuleList(WanBlock(config) for _ in range(config.num_layers))
        self.head = Head(config)

    @property
    def dtype(self) -> torch.dtype:
        return self.patch_embedding.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.patch_embedding.weight.device

    def set_dtype(self, dtype: torch.dtype) -> "WanModel":
        """Cast to the compute dtype, keeping the time embedding and modulation tables in fp32."""
        for name, p in self.named_parameters():
            p.data = p.data.to(torch.float32 if keeps_fp32(name) else dtype)
        return self

    def set_attention_backend(self, backend: str) -> None:
        """Local attention kernel for every attention module, before or after parallelize_wan (an
        installed sequence-parallel attention keeps its exchange and takes the new kernel)."""
        for block in self.blocks:
            fn = block.self_attn.attn_fn
            block.self_attn.attn_fn = fn.with_backend(backend) if hasattr(fn, "with_backend") else \
                default_attn_fn(backend)
            block.cross_attn.attn_fn = default_attn_fn(backend)

    def forward(self, x: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor,
                image_context: torch.Tensor | None = None) -> torch.Tensor:
        """`timestep` [B], or [B, S] with one timestep per token (Wan2.2 TI2V: 0 on the given first frame);
        `image_context` [B, L_img, image_dim]: the CLIP image tokens, for (and only for) Wan2.1 I2V.

        The three stages below are the whole forward; a step cache (pipeline/cache/) calls them one by one
        to run part of it."""
        inputs = self.embed(x, timestep, context, image_context)
        return self.finish(self.run_blocks(inputs, inputs.tokens), inputs)

    def embed(self, x: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor,
              image_context: torch.Tensor | None = None) -> "BlockInputs":
        """Stage 1: tokens, time embedding and modulation, text (and image) context, RoPE tables."""
        cfg = self.config
        if (image_context is None) != (cfg.image_dim is None):
            raise ValueError(f"image_context is {'missing' if image_context is None else 'given'}, but this DiT "
                             f"{'has' if cfg.image_dim else 'has no'} a CLIP image branch (image_dim={cfg.image_dim})")
        if x.ndim != 5 or x.shape[1] != cfg.in_dim:
            raise ValueError(f"latents must be [B, {cfg.in_dim}, F, H, W], got {tuple(x.shape)}")
        if any(n % p for n, p in zip(x.shape[2:], cfg.patch_size)):
            raise ValueError(f"latent frames/height/width {tuple(x.shape[2:])} must be multiples of the patch "
                             f"size {cfg.patch_size}; the last partial patch would be dropped")
        grid = tuple(n // p for n, p in zip(x.shape[2:], cfg.patch_size))
        if timestep.ndim == 2 and tuple(timestep.shape) != (x.shape[0], math.prod(grid)):
            raise ValueError(f"per-token timesteps must be [B, tokens] = [{x.shape[0]}, {math.prod(grid)}], got "
                             f"{tuple(timestep.shape)}")
        dtype = self.dtype
        tokens = self.patch_embedding(x.to(dtype))  # [B, S, dim]
        rope = self.rope(grid, x.device)            # ([S, 1, D], [S, 1, D]) fp32
        time_dtype = self.time_embedding[0].weight.dtype
        freqs = sinusoidal_embedding(timestep.reshape(-1), cfg.freq_dim).to(time_dtype)
        if timestep.ndim == 2:  # [B, S, freq]: parallelize_wan cuts it to this rank's tokens here
            freqs = freqs.view(*timestep.shape, cfg.freq_dim)
        temb = self.time_embedding(freqs).float()  # [B, dim] or [B, S, dim]
        e0 = self.time_projection(temb.to(dtype)).float().unflatten(-1, (6, cfg.dim))  # [B, (S,) 6, dim]
        context = self.text_embedding(context.to(dtype))
        if image_context is not None:
            image_context = self.img_emb(image_context.to(dtype))
        return BlockInputs(tokens, temb, e0, context, rope, image_context, grid)

    def run_blocks(self, inputs: "BlockInputs", tokens: torch.Tensor, start: int = 0,
                   stop: int | None = None) -> torch.Tensor:
        """Stage 2: blocks[start:stop] on `tokens` [B, S, dim]."""
        for i in range(start, len(self.blocks) if stop is None else stop):
            tokens = self.blocks[i](tokens, inputs.e0, inputs.context, inputs.rope, inputs.image_context)
        return tokens

    def finish(self, tokens: torch.Tensor, inputs: "BlockInputs") -> torch.Tensor:
        """Stage 3: the head on the blocks' output tokens, unpatchified to [B, C, F, H, W]."""
        return self.unpatchify(self.head(tokens, inputs.temb), inputs.grid)

    def unpatchify(self, x: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        """[B, S, pt*ph*pw*C] -> [B, C, F, H, W]; channel order within a token is (pt, ph, pw, C)."""
        (f, h, w), (pt, ph, pw) = grid, self.config.patch_size
        x = x.view(x.shape[0], f, h, w, pt, ph, pw, -1).permute(0, 7, 1, 4, 2, 5, 3, 6)
        return x.reshape(x.shape[0], -1, f * pt, h * ph, w * pw)

    # from_pretrained / save_pretrained are the loader's (loader.py attaches them): the model file
    # knows nothing of checkpoints, and the loader imports the model, not the other way round.
