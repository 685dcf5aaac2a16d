"""UMT5 encoder (the text encoder of Wan2.1): math only.

Pre-norm transformer blocks with T5's RMS norm, unscaled attention with a relative position
bias that every layer owns (UMT5, unlike T5, does not share it), and a gated-GELU(tanh) FFN.
Parallel layouts are installed afterwards by `parallelize_t5`; the modules here work unchanged
on a head/column shard of their weights, which is what tensor parallelism relies on.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class T5Config:
    vocab_size: int = 256384
    d_model: int = 4096
    d_kv: int = 64
    num_heads: int = 64
    d_ff: int = 10240
    num_layers: int = 24
    num_buckets: int = 32
    max_distance: int = 128
    eps: float = 1e-6

    @classmethod
    def umt5_xxl(cls) -> T5Config:
        """google/umt5-xxl, the encoder Wan2.1 ships as models_t5_umt5-xxl-enc-bf16.pth."""
        return cls()

    @property
    def inner_dim(self) -> int:
        return self.num_heads * self.d_kv

    def to_dict(self) -> dict:
        return asdict(self)


def relative_position_buckets(q_len: int, k_len: int, num_buckets: int, max_distance: int,
                              device=None) -> torch.Tensor:
    """[q_len, k_len] bucket ids of (key - query), bidirectional (encoder) T5 bucketing.

    Half of the buckets are for keys after the query. Within each half, distances below a
    quarter of the buckets get a bucket each; larger ones share log-spaced buckets up to
    `max_distance`, beyond which all fall into the last bucket.
    """
    rel = torch.arange(k_len, device=device)[None, :] - torch.arange(q_len, device=device)[:, None]
    half = num_buckets // 2
    exact = half // 2
    dist = rel.abs()
    # The float expression keeps the reference's operation order: the truncation to an integer
    # bucket must land on the same side at exact boundaries.
    log_part = torch.log(dist.clamp(min=1).float() / exact) / math.log(max_distance / exact) * (half - exact)
    far = (exact + log_part.to(torch.long)).clamp(max=half - 1)
    return (rel > 0).to(torch.long) * half + torch.where(dist < exact, dist, far)


def padding_bias(attention_mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """[B, L] mask (1 = token, 0 = padding) -> additive [B, 1, 1, L] bias (0 or the dtype's min)."""
    if attention_mask is None:
        return None
    keep = attention_mask.to(torch.bool)[:, None, None, :]
    return torch.zeros(keep.shape, dtype=dtype, device=keep.device).masked_fill(~keep, torch.finfo(dtype).min)


class T5RMSNorm(nn.Module):
    """T5LayerNorm: scale only, no mean subtraction; the variance is taken in fp32."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        variance = x.float().pow(2).mean(dim=-1, keepdim=True)
        x = x * torch.rsqrt(variance + self.eps)
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            x = x.to(self.weight.dtype)
        return self.weight * x


class T5Attention(nn.Module):
    """Self-attention over `num_heads` heads (all of them, or this rank's shard)."""

    def __init__(self, d_model: int, num_heads: int, d_kv: int, num_buckets: int):
        super().__init__()
        self.num_heads = num_heads
        self.d_kv = d_kv
        inner = num_heads * d_kv
        self.q = nn.Linear(d_model, inner, bias=False)
        self.k = nn.Linear(d_model, inner, bias=False)
        self.v = nn.Linear(d_model, inner, bias=False)
        self.o = nn.Linear(inner, d_model, bias=False)
        self.rel_bias = nn.Embedding(num_buckets, num_heads)

    def position_bias(self, buckets: torch.Tensor) -> torch.Tensor:
        # [L, L] bucket ids -> [L, L, H] -> [1, H, L, L]
        return self.rel_bias(buckets).permute(2, 0, 1).unsqueeze(0)

    def forward(self, x: torch.Tensor, buckets: torch.Tensor, mask_bias: torch.Tensor | None) -> torch.Tensor:
        """x [B, L, d_model] -> [B, L, d_model] (a partial sum when the heads are a shard)."""
        b, n = x.shape[0], x.shape[1]
        q = self.q(x).view(b, n, self.num_heads, self.d_kv).transpose(1, 2)
        k = self.k(x).view(b, n, self.num_heads, self.d_kv).transpose(1, 2)
        v = self.v(x).view(b, n, self.num_heads, self.d_kv).transpose(1, 2)
        bias = self.position_bias(buckets).to(q.dtype)
        if mask_bias is not None:
            bias = bias + mask_bias.to(q.dtype)
        # T5 folds the 1/sqrt(d) scale into its initialisation: scores are q.k plus the bias.
        scores = torch.matmul(q, k.transpose(-1, -2)) + bias
        probs = F.softmax(scores.float(), dim=-1).to(q.dtype)
        out = torch.matmul(probs, v)  # [B, H, L, d_kv]
        return self.o(out.transpose(1, 2).reshape(b, n, self.num_heads * self.d_kv))


class T5FeedForward(nn.Module):
    """fc2(gelu_tanh(gate(x)) * fc1(x)); `d_ff` is the full width or this rank's columns."""

    def __init__(self, d_model: int, d_ff: int):
        super().__init__()
        self.gate = nn.Linear(d_model, d_ff, bias=False)
        self.fc1 = nn.Linear(d_model, d_ff, bias=False)
        self.fc2 = nn.Linear(d_ff, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.gate(x), approximate="tanh") * self.fc1(x))


class T5Block(nn.Module):
    def __init__(self, cfg: T5Config, num_heads: int, d_ff: int):
        super().__init__()
        self.norm1 = T5RMSNorm(cfg.d_model, cfg.eps)
        self.attn = T5Attention(cfg.d_model, num_heads, cfg.d_kv, cfg.num_buckets)
        self.norm2 = T5RMSNorm(cfg.d_model, cfg.eps)
        self.ffn = T5FeedForward(cfg.d_model, d_ff)

    def forward(self, x: torch.Tensor, buckets: torch.Tensor, mask_bias: torch.Tensor | None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), buckets, mask_bias)
        return x + self.ffn(self.norm2(x))


class T5Encoder(nn.Module):
    """input_ids [B, L] (+ attention_mask [B, L], 1 = token) -> hidden states [B, L, d_model].

    `num_heads`, `d_ff` and `vocab_rows` default to the config's; a tensor-parallel rank builds
    the encoder with its shard's sizes (see `shard.T5Shard`).
    """

    def __init__(self, cfg: T5Config, num_heads: int | None = None, d_ff: int | None = None,
                 vocab_rows: int | None = None):
        super().__init__()
        self.config = cfg
        num_heads = cfg.num_heads if num_heads is None else num_heads
        d_ff = cfg.d_ff if d_ff is None else d_ff
        vocab_rows = cfg.vocab_size if vocab_rows is None else vocab_rows
        self.token_embedding = nn.Embedding(vocab_rows, cfg.d_model)
        self.blocks = nn.ModuleList(T5Block(cfg, num_heads, d_ff) for _ in range(cfg.num_layers))
        self.norm = T5RMSNorm(cfg.d_model, cfg.eps)
        # Installed by parallelize_t5: fn(encoder, input_ids, attention_mask) -> [B, L, d_model].
        self.parallel_forward: Callable | None = None
        # Set by the loader / parallelize_t5 when this instance holds a tensor-parallel shard.
        self.shard = None

    # from_pretrained is the loader's (loader.py attaches it): the loader imports the model, not back.

    def buckets(self, seq_len: int, device=None) -> torch.Tensor:
        cfg = self.config
        return relative_position_buckets(seq_len, seq_len, cfg.num_buckets, cfg.max_distance, device)

    def forward_local(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        if self.shard is not None and self.shard.world_size > 1:
            raise ValueError("this T5Encoder holds a tensor-parallel shard (1/N of the heads); alone it would "
                             "compute wrong results: run it through parallelize_t5(enc, dims, mode=\"tp\")")
        x = self.token_embedding(input_ids)
        buckets = self.buckets(input_ids.shape[1], input_ids.device)
        mask_bias = padding_bias(attention_mask, x.dtype)
        for block in self.blocks:
            x = block(x, buckets, mask_bias)
        return self.norm(x)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        if self.parallel_forward is not None:
            return self.parallel_forward(self, input_ids, attention_mask)
        return self.forward_local(input_ids, attention_mask)
