"""Per-rank weight memory and bytes on the wire of the UMT5 text-encoder layouts.

Computed from the config's real shapes (umt5-xxl by default; nothing is allocated):
    python scripts/t5_memory_table.py [--dtype bf16] [--lengths 512 512] [--config path/config.json]
Bytes are what one rank sends for one encoder call (CommStats' convention), for the prompts'
real token counts; Wan pads every prompt to 512, so 512 512 is the worst case of a prompt and a
negative prompt.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lightx2v_sp.models.t5.budget import comm_bytes, weight_numel
from lightx2v_sp.models.t5.loader import config_from_hf
from lightx2v_sp.models.t5.model import T5Config

DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
GiB = 1024 ** 3
MiB = 1024 ** 2


def rows(cfg: T5Config, lengths: list[int], dtype_bytes: int, tp_sizes=(2, 4, 8), dp_sizes=(2,)):
    layouts = [("replicate", 1)] + [("tp", n) for n in tp_sizes] + [("dp", n) for n in dp_sizes]
    out = []
    for mode, n in layouts:
        # rank 0 holds the largest shard (split_sizes gives it any remainder) and sends the most
        w = weight_numel(cfg, mode, n, 0)
        c = comm_bytes(cfg, mode, lengths, n, 0, dtype_bytes)
        out.append({
            "layout": mode if n == 1 else f"{mode} N={n}",
            "embedding_GiB": w["embedding"] * dtype_bytes / GiB,
            "blocks_GiB": w["blocks"] * dtype_bytes / GiB,
            "total_GiB": w["total"] * dtype_bytes / GiB,
            "params": w["total"],
            "calls": sum(c["calls"].values()),
            "sent_MiB": sum(c["bytes"].values()) / MiB,
        })
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", help="a UMT5 config.json (default: umt5-xxl)")
    ap.add_argument("--dtype", default="bf16", choices=sorted(DTYPE_BYTES))
    ap.add_argument("--lengths", type=int, nargs="+", default=[512, 512], help="real tokens per prompt")
    ap.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = ap.parse_args(argv)
    if args.config:
        with open(args.config) as f:
            cfg = config_from_hf(json.load(f), args.config)
    else:
        cfg = T5Config.umt5_xxl()
    table = rows(cfg, args.lengths, DTYPE_BYTES[args.dtype])
    if args.json:
        print(json.dumps(table, indent=2))
        return
    print(f"UMT5 d_model={cfg.d_model} heads={cfg.num_heads} d_ff={cfg.d_ff} layers={cfg.num_layers} "
          f"vocab={cfg.vocab_size}, {args.dtype}; prompts of {args.lengths} real tokens; per rank (rank 0)")
    head = f"{'layout':<14}{'params':>15}{'embed GiB':>11}{'blocks GiB':>12}{'total GiB':>11}{'calls':>7}{'sent MiB':>10}"
    print(head)
    print("-" * len(head))
    for r in table:
        print(f"{r['layout']:<14}{r['params']:>15,}{r['embedding_GiB']:>11.3f}{r['blocks_GiB']:>12.3f}"
              f"{r['total_GiB']:>11.3f}{r['calls']:>7}{r['sent_MiB']:>10.1f}")
    row = cfg.d_model * DTYPE_BYTES[args.dtype] / MiB
    n = len(args.lengths)
    print("\ntp: per layer 2 reduce-scatters + 2 all-gathers of [B*L, d_model] send the same bytes as the "
          "2 ring all-reduces they replace; residual add + RMSNorm run on 1/N of the tokens. "
          "+1 reduce-scatter (vocab-parallel embedding), +1 all-gather (output).")
    print(f"dp: gathered buffer {sum(args.lengths) * row:.2f} MiB (sum of real lengths) vs "
          f"{max(args.lengths) * n * row:.2f} MiB padded to the longest x {n} and "
          f"{512 * n * row:.2f} MiB padded to text_len 512")


if __name__ == "__main__":
    main()
