"""Load once vs load per video: a served job against a fresh `generate` of the same job.

    python scripts/bench_vs_diffusers.py build /tmp/wan13 --size 1.3b          # random weights, real shapes
    python scripts/bench_serve.py --config configs/wan_t2v_1.3b_480p.yaml model.path=/tmp/wan13 sample.steps=10
    python scripts/bench_serve.py --device cpu                                   # smoke test: the tiny model

Side by side in one run, on one device:
- `generate`: `python -m lightx2v_sp.generate --config C [key=value ...]` in a fresh process, `--reps`
  times. Its time to the first denoising step is read live from its progress bar (process launch to
  the bar's `1/N`); its stages from its JSON summary; its wall is launch to exit.
- the server: `python -m lightx2v_sp.serve` with the same config, started once; the same job is
  submitted `--reps + 1` times, one after another. The first pays what a first call pays (kernel
  autotuning, `model.compile`'s compilation); the later ones are the load-once case. Time to the
  first step is submission to step 1 (the job's `to_first_step_s`); the job's total is its `run_s`
  (taken off the queue to written); its stages come from its summary.
The target (issue 25): a served job's total within 2% of generate's once-loaded part (the stages
after loading: image, denoise, vae (the wait for a VAE loading during the denoise), decode, write;
the text stage of `generate` also loads the encoder,
so it is left out on both sides and shown on its own). Medians over the repetitions.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
JOB_STAGES = ("image", "denoise", "vae", "decode", "write")  # vae: what was left of its load after the denoise
PROMPT = "A cat walks on the grass, realistic style."


def _env() -> dict:
    return dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))


class _Watch(threading.Thread):
    """Reads a process's stderr; remembers when a pattern first appeared (and keeps the text)."""

    def __init__(self, stream, pattern: bytes):
        super().__init__(daemon=True)
        self.stream, self.pattern, self.seen_at, self.data = stream, re.compile(pattern), None, b""

    def run(self):
        while True:
            chunk = os.read(self.stream.fileno(), 65536)
            if not chunk:
                return
            self.data += chunk
            if self.seen_at is None and self.pattern.search(self.data[-4096 - len(chunk):]):
                self.seen_at = time.perf_counter()


def run_generate(args, out: str) -> dict:
    cmd = [sys.executable, "-m", "lightx2v_sp.generate", "--config", args.config, *args.overrides,
           f"output.path={out}", f"prompt={PROMPT}"]
    start = time.perf_counter()
    # every step redraws the bar (tqdm reads TQDM_* defaults): its `1/N` is the end of step 1
    env = dict(_env(), TQDM_MININTERVAL="0", TQDM_MINITERS="1")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    watch = _Watch(proc.stderr, rb"\|\s*1/\d+ \[")
    watch.start()
    code = proc.wait()
    wall = time.perf_counter() - start
    watch.join()
    if code != 0:
        sys.exit(f"generate failed ({code}):\n{watch.data.decode(errors='replace')[-3000:]}")
    with open(os.path.splitext(out)[0] + ".json") as f:
        summary = json.load(f)
    return {"first_step_s": None if watch.seen_at is None else watch.seen_at - start, "wall_s": wall,
            "stages": summary["stage_times_s"]}


def _http(url: str, body: dict | None = None) -> dict:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"} if data else {})
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read())


def run_server(args, out_dir: str) -> list[dict]:
    env = {k: v for k, v in _env().items() if k != "LIGHTX2V_SP_API_KEY"}
    cmd = [sys.executable, "-m", "lightx2v_sp.serve", "--config", args.config, *args.overrides, "serve.port=0",
           f"serve.output_dir={out_dir}"]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    watch = _Watch(proc.stderr, rb"ready: ")
    watch.start()
    jobs = []
    try:
        while watch.seen_at is None:
            if proc.poll() is not None:
                sys.exit(f"the server exited ({proc.returncode}):\n{watch.data.decode(errors='replace')[-3000:]}")
            time.sleep(0.1)
        url = re.search(rb"serving (http://\S+?)/ ", watch.data).group(1).decode()
        print(f"server ready after {watch.seen_at - start:.1f} s (launch to loaded)", flush=True)
        for _ in range(args.reps + 1):
            job = _http(f"{url}/v1/videos", {"prompt": PROMPT})
            while job["status"] not in ("completed", "failed"):
                time.sleep(0.05)
                job = _http(f"{url}/v1/videos/{job['id']}")
            if job["status"] != "completed":
                sys.exit(f"the served job failed: {job['error']}")
            summary = _http(f"{url}/v1/videos/{job['id']}/summary")
            jobs.append({"first_step_s": job["timings"]["to_first_step_s"], "run_s": job["timings"]["run_s"],
                         "stages": summary["stage_times_s"]})
            print(f"served job: {jobs[-1]}", flush=True)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
    return jobs


def _med(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=None, help="default: configs/wan_t2v_1.3b_480p.yaml (cpu: the tiny one)")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--reps", type=int, default=2, help="fresh generate runs, and served jobs after the first")
    ap.add_argument("--json", default=None, help="write the measurements here")
    args, args.overrides = ap.parse_known_args()
    if args.config is None:
        tiny = args.device == "cpu"
        args.config = os.path.join(ROOT, "configs", "wan_t2v_tiny.yaml" if tiny else "wan_t2v_1.3b_480p.yaml")
        if tiny:
            args.overrides = ["sample.steps=2", *args.overrides]
    args.overrides = [f"device={args.device}", *args.overrides]
    tmp = tempfile.mkdtemp(prefix="bench_serve_")
    fresh = []
    for i in range(args.reps):
        fresh.append(run_generate(args, os.path.join(tmp, f"generate_{i}.mp4")))
        print(f"generate: {fresh[-1]}", flush=True)
    served = run_server(args, os.path.join(tmp, "served"))
    later = served[1:]

    def stage(rows, name):
        return _med([r["stages"].get(name, 0.0) for r in rows])

    gen_job = _med([sum(r["stages"].get(s, 0.0) for s in JOB_STAGES) for r in fresh])
    srv_job = _med([r["run_s"] for r in later])
    rows = [("time to the first denoising step, s", _med([r["first_step_s"] for r in fresh]),
             served[0]["first_step_s"], _med([r["first_step_s"] for r in later]))]
    rows += [(f"{name} stage, s", stage(fresh, name), served[0]["stages"].get(name, 0.0), stage(later, name))
             for name in ("preflight", "text", "load", *JOB_STAGES)]
    rows += [("job: image + denoise + vae + decode + write (generate) / run_s (served), s", gen_job, served[0]["run_s"],
              srv_job),
             ("process wall, launch to exit, s", _med([r["wall_s"] for r in fresh]), float("nan"), float("nan"))]
    print(f"\n{args.config} {' '.join(args.overrides)}; {args.reps} fresh generate runs, {len(served)} served jobs")
    print("| | generate (fresh process, median) | served, first job | served, later jobs (median) |\n|---|---:|---:|---:|")
    for name, a, b, c in rows:
        print(f"| {name} | {a:.3f} | {b:.3f} | {c:.3f} |")
    ratio = srv_job / gen_job if gen_job else float("nan")
    print(f"\nserved job / generate's once-loaded part: {ratio:.4f} (target <= 1.02)")
    print(f"time to the first step, later served job vs fresh generate: {rows[0][3]:.2f} s vs {rows[0][1]:.2f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"generate": fresh, "served": served, "ratio": ratio, "config": args.config,
                       "overrides": args.overrides}, f, indent=1)


if __name__ == "__main__":
    main()
