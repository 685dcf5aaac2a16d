"""Which slice of each UMT5 weight a tensor-parallel rank holds.

One description used three ways: the loader reads only these slices from disk, `parallelize_t5`
cuts an already loaded encoder down to them, and scripts/t5_memory_table.py counts them.

- attention: heads split evenly (rank r holds heads [r*H/N, (r+1)*H/N)): q, k, v rows, o columns
  and the columns of the layer's relative position bias table;
- FFN: gate and fc1 rows, fc2 columns, split with `split_sizes` (need not divide evenly);
- token embedding: vocabulary rows split with `split_sizes` (vocab-parallel lookup);
- RMS norm weights: replicated.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from lightx2v_sp.distributed.sequence import split_sizes

from .model import T5Config, T5Encoder

# parameter name (pattern) -> (what is split, dim of the weight that is split)
_RULES = [
    (re.compile(r"blocks\.\d+\.attn\.[qkv]\.weight"), "inner", 0),
    (re.compile(r"blocks\.\d+\.attn\.o\.weight"), "inner", 1),
    (re.compile(r"blocks\.\d+\.attn\.rel_bias\.weight"), "heads", 1),
    (re.compile(r"blocks\.\d+\.ffn\.(gate|fc1)\.weight"), "ff", 0),
    (re.compile(r"blocks\.\d+\.ffn\.fc2\.weight"), "ff", 1),
    (re.compile(r"token_embedding\.weight"), "vocab", 0),
    # fp8 layers (text_encoder.quant): one scale per output row goes with the rows; o and fc2 keep theirs
    (re.compile(r"blocks\.\d+\.attn\.[qkv]\.weight_scale"), "inner", 0),
    (re.compile(r"blocks\.\d+\.ffn\.(gate|fc1)\.weight_scale"), "ff", 0),
]


def _offset_range(sizes: list[int], rank: int) -> tuple[int, int]:
    start = sum(sizes[:rank])
    return start, start + sizes[rank]


@dataclass(frozen=True)
class T5Shard:
    """Rank `rank` of `world_size` tensor-parallel ranks."""

    rank: int
    world_size: int

    def check(self, cfg: T5Config) -> None:
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"T5Shard rank {self.rank} is outside world_size {self.world_size}")
        if cfg.num_heads % self.world_size:
            ok = [n for n in range(1, cfg.num_heads + 1) if cfg.num_heads % n == 0]
            raise ValueError(
                f"UMT5 tensor parallelism splits the {cfg.num_heads} attention heads evenly, which "
                f"{self.world_size} ranks cannot do; the encoder cannot be sharded this way. Use "
                f"text_encoder.parallel=dp or replicate, or a TP size in {ok}")
        if cfg.d_ff < self.world_size:
            raise ValueError(f"d_ff={cfg.d_ff} FFN columns cannot be split over {self.world_size} ranks")

    def heads(self, cfg: T5Config) -> tuple[int, int]:
        n = cfg.num_heads // self.world_size
        return self.rank * n, (self.rank + 1) * n

    def ranges(self, cfg: T5Config) -> dict[str, tuple[int, int]]:
        h0, h1 = self.heads(cfg)
        return {
            "heads": (h0, h1),
            "inner": (h0 * cfg.d_kv, h1 * cfg.d_kv),
            "ff": _offset_range(split_sizes(cfg.d_ff, self.world_size), self.rank),
            "vocab": _offset_range(split_sizes(cfg.vocab_size, self.world_size), self.rank),
        }

    def param_slice(self, name: str, cfg: T5Config) -> tuple[int, int, int] | None:
        """(dim, start, stop) of parameter `name` held by this rank, or None when replicated."""
        for pattern, what, dim in _RULES:
            if pattern.fullmatch(name):
                start, stop = self.ranges(cfg)[what]
                return dim, start, stop
        return None

    def build(self, cfg: T5Config, device="meta") -> T5Encoder:
        """An encoder module with this shard's shapes (on the meta device unless told)."""
        self.check(cfg)
        r = self.ranges(cfg)
        h0, h1 = r["heads"]
        f0, f1 = r["ff"]
        v0, v1 = r["vocab"]
        with torch.device(device):
            enc = T5Encoder(cfg, num_heads=h1 - h0, d_ff=f1 - f0, vocab_rows=v1 - v0)
        enc.shard = self
        return enc
