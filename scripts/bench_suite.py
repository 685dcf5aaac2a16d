"""The GPU benchmark suite in one call: runs every bench script, writes JSON, markdown and PNG plots.

python scripts/bench_suite.py --out assets/benchmarks            (on a CUDA machine)
python scripts/bench_suite.py --out /tmp/b --only comm_quant     (one part)

Each part is a bench_*.py script run as its own process (so one part's memory does not skew the
next); its printed markdown table is parsed into the JSON. Plots need matplotlib.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))

PARTS = {
    "peak": ["bench_peak.py"],
    "attention_kernels": ["bench_attention_kernels.py"],
    "ulysses_variants_n1": ["bench_attention.py", "--world", "1", "--shape", "1", "32760", "12", "128"],
    "dit_1.3b_480p": ["bench_dit.py", "--config", "1.3b", "--latent", "21", "60", "104", "--iters", "5",
                      "--compile"],
    "comm_quant": ["bench_comm_quant.py", "--rows", "4194304", "--dim", "128"],
    "offload_1.3b_480p": ["bench_offload.py", "--config", "1.3b", "--latent", "21", "60", "104", "--ablation"],
    "offload_14b_480p": ["bench_offload.py", "--config", "14b", "--latent", "21", "60", "104", "--ablation"],
    "e2e_1.3b_480p": ["bench_e2e.py", "--config", "1.3b", "--steps", "10"],
}


def parse_tables(text: str) -> list[list[dict]]:
    """Every markdown table in `text` as a list of {header: cell} rows."""
    tables, lines = [], text.splitlines()
    i = 0
    while i < len(lines):
        if lines[i].startswith("|") and i + 1 < len(lines) and set(lines[i + 1].replace("|", "").strip()) <= set("-: "):
            header = [c.strip() for c in lines[i].strip("|").split("|")]
            rows, i = [], i + 2
            while i < len(lines) and lines[i].startswith("|"):
                cells = [c.strip() for c in lines[i].strip("|").split("|")]
                rows.append(dict(zip(header, cells)))
                i += 1
            tables.append(rows)
        else:
            i += 1
    return tables


def number(cell: str) -> float:
    return float(cell.rstrip("x%").split()[0])


def plot(results: dict, out: str) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []

    def save(fig, name):
        path = os.path.join(out, name)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        made.append(path)

    part = results.get("attention_kernels", {}).get("tables")
    if part:
        rows = [r for r in part[0] if "ulysses" not in r["backend"] and "directly" not in r["backend"]]
        shapes = list(dict.fromkeys(r["shape"] for r in rows))
        backends = list(dict.fromkeys(r["backend"] for r in rows))
        fig, ax = plt.subplots(figsize=(8, 4))
        width = 0.8 / max(1, len(backends))
        for j, b in enumerate(backends):
            vals = [next((number(r["TFLOP/s"]) for r in rows if r["shape"] == s and r["backend"] == b), 0) for s in shapes]
            ax.bar([i + j * width for i in range(len(shapes))], vals, width, label=b)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(shapes))], shapes)
        ax.set_ylabel("TFLOP/s (bf16)")
        ax.set_title("Local attention kernels at Wan2.1 shapes")
        ax.legend(fontsize=8)
        save(fig, "attention_kernels.png")
    part = results.get("dit_1.3b_480p", {}).get("tables")
    if part:
        rows = part[0]
        fig, ax = plt.subplots(figsize=(8, 3.5))
        ax.barh([r["model"] for r in rows], [number(r["forward ms (median)"]) for r in rows], color="tab:blue")
        ax.set_xlabel("forward ms (median), lower is better")
        ax.set_title("Wan2.1-1.3B DiT forward at 480p (32760 tokens), bf16")
        save(fig, "dit_forward.png")
    part = results.get("comm_quant", {}).get("tables")
    if part:
        rows = part[0]
        fig, ax = plt.subplots(figsize=(7, 3.5))
        ax.barh([f"{r['op']} ({r['impl']})" for r in rows], [number(r["GB/s (read+write)"]) for r in rows],
                color="tab:green")
        ax.set_xlabel("GB/s, bytes read + written")
        ax.set_title("FP8 wire codec vs device copy")
        save(fig, "fp8_codec.png")
    part = results.get("offload_1.3b_480p", {}).get("tables")
    if part:
        rows = part[0]
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.5))
        names = [r["mode"] for r in rows]
        a1.bar(names, [number(r["step time median (ms)"]) for r in rows])
        a1.set_ylabel("step ms")
        a2.bar(names, [number(r["peak GPU memory (GiB)"]) for r in rows], color="tab:orange")
        a2.set_ylabel("peak GiB")
        fig.suptitle("DiT block offload vs resident (Wan2.1-1.3B, 480p)")
        save(fig, "offload.png")
    return made


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="assets/benchmarks")
    p.add_argument("--only", nargs="*", choices=list(PARTS), default=list(PARTS))
    p.add_argument("--timeout", type=int, default=900, help="seconds per part")
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    env = {"date": datetime.date.today().isoformat(), "python": platform.python_version(),
           "torch": torch.__version__, "cuda": torch.version.cuda,
           "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
           "gpu_count": torch.cuda.device_count()}
    results = {"env": env}
    md = [f"# Benchmark results\n\n{env['gpu']} x{env['gpu_count']}, torch {env['torch']}, CUDA {env['cuda']}, "
          f"{env['date']}\n"]
    for name in args.only:
        cmd = [sys.executable, os.path.join(HERE, PARTS[name][0]), *PARTS[name][1:]]
        shown = "python scripts/" + " ".join(PARTS[name])
        print(f"== {name}: {shown}", flush=True)
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
            text, rc = proc.stdout, proc.returncode
            err = proc.stderr[-3000:] if rc else ""
        except subprocess.TimeoutExpired as e:
            text, rc, err = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or ""), -1, "timeout"
        print(text[-4000:], err, flush=True)
        results[name] = {"command": shown, "returncode": rc, "seconds": round(time.perf_counter() - t0, 1),
                         "stdout": text, "stderr_tail": err, "tables": parse_tables(text)}
        md.append(f"## {name}\n\n`{shown}` (exit {rc})\n\n{text.strip()}\n")
        with open(os.path.join(args.out, "results.json"), "w") as f:
            json.dump(results, f, indent=1)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write("\n".join(md))
    try:
        for path in plot(results, args.out):
            print("plot:", path)
    except ImportError:
        print("matplotlib missing: no plots")


if __name__ == "__main__":
    main()
