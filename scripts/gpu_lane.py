"""The GPU lane: every shipped layout on real GPUs over NCCL, against one GPU. CI has no GPU; run
this on a lent GPU machine before calling a change to distributed code, kernels, offload or the
runner done.

    python scripts/gpu_lane.py                 # every part, on all visible GPUs (and on one)
    python scripts/gpu_lane.py --parts configs backends --out /tmp/lane
    python scripts/gpu_lane.py --device cpu --gpus 2     # the same lane on gloo (to test the lane)
    python scripts/gpu_lane.py --parts configs --configs '*fp8*' '*4090x8' --set model.quant=null --out /tmp/ctl

Parts (each prints rows: name, layout, max |difference| against one GPU, seconds, pass):
- configs:  every configs/*.yaml with its parallel, text-encoder, offload, attention and comm
            settings unchanged and the tiny model (of the same kind) swapped in at 128x128, 17
            frames, 3 steps: on 1 GPU and on N GPUs (cfg_degree kept; a config's ring_degree kept where
            it divides N / cfg; Ulysses takes the largest part of the rest that splits the tiny model's
            12 heads, a ring the remainder: on 8 GPUs a cfg-1 config runs ulysses 4 x ring 2).
            Reference: the same config on one GPU with the plain layout (no parallelism, offload,
            compile or fp8). Difference: max |frame difference| in 8-bit levels.
- t5:       the UMT5 encoder tp and dp against replicate over NCCL, symmetric memory off and on.
- ulysses:  every Ulysses variant at Wan shapes (1.3B: 12 heads, 14B: 40 heads, an uneven token
            count) against the local kernel on the whole sequence; seconds per call.
- ring:     ring attention over all N GPUs and every ulysses x ring split of N (USP), native and fp8
            K/V blocks, at Wan shapes (14B 720p; 1.3B 480p with an uneven token count) against the
            local kernel on the whole sequence; seconds per call and the speed-up over one rank.
- backends: every installed attention kernel against SDPA math (fp32) on a small shape.
Parts that need two GPUs say so on a machine with one. Results also go to <out>/lane.json.
Exit status 1 if any row fails.
"""
from __future__ import annotations

import argparse
import fnmatch
import glob
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# Pass bounds on (max, mean) |frame difference| in 8-bit levels. "exact": layouts that only move
# data (Ulysses, CFG-parallel, offload, swap) change nothing beyond the final rounding (one level
# was measured on 2 H200). "rounding": layouts that change floating-point rounding on purpose: fp8
# on the wire (up to row max / 16 per value), compiled blocks in bf16, the UMT5 tp/dp encoder in bf16
# (partial sums rounded to bf16 before the reduce-scatter; other GEMM shapes), or ring attention in bf16
# (block outputs rounded to bf16 before the fp32 merge). The tiny model's random weights
# and guidance 5 amplify a bf16-level change of the context to ~9 levels (seen on CPU), while a
# wrong slice or exchange moves the whole video: mean differences of tens of levels.
# "fp8_rounding": fp8 weights with compiled blocks against the eager fp8 reference. Compilation changes
# bf16-level roundings before each activation quantization (a compiled LayerNorm + modulation differed
# from eager in 43% of its bf16 outputs on an H100), and e4m3 turns those into e4m3-level steps, 16x
# larger (5.2% of the quantized bytes differed). So the two runs are two draws of e4m3 rounding, each as
# far from bf16 as fp8 is: on one H100 the tiny I2V config's fp8 eager and fp8 compiled videos were 35
# levels (mean 2.57 and 2.47) from its bf16 eager video, and 34 (mean 2.28) from each other (T2V: 14 /
# 0.98, 12 / 0.97, 10 / 0.95). The bound allows two such draws (mean 2 x 2.57) and stays far below
# what a wrong slice does (tens of levels on average).
FRAME_LEVELS = {"exact": (2, 0.05), "rounding": (32, 2.0), "fp8_rounding": (70, 5.0)}
T5_ATOL = {"fp32": 1e-4}  # tp sums partial products in another order: rounding only (CPU: 2e-6)
T5_REL = {"bf16": 3e-2}   # bf16: partial sums rounded to bf16 per layer; a wrong shard is O(1)
ULYSSES_EXACT_REL = 1e-2  # bf16 kernels; an exchange bug moves outputs by O(1)
# the real checkpoint a config names -> the tiny model of the same kind (first match)
TINY_OF = (("Wan2.2-T2V-A14B", "wan2.2-t2v-a14b"), ("Wan2.2-I2V-A14B", "wan2.2-i2v-a14b"),
           ("Wan2.2-TI2V-5B", "wan2.2-ti2v-5b"), ("Wan2.1-I2V", "wan2.1-i2v"))
SMALL = ["sample.height=128", "sample.width=128", "sample.num_frames=17", "sample.steps=3"]
PLAIN = ["parallel.ulysses_degree=1", "parallel.cfg_degree=1", "parallel.ring_degree=1", "parallel.comm_dtype=null",
         "parallel.a2a=all_to_all", "text_encoder.parallel=replicate", "text_encoder.device=gpu",
         "offload.dit=none", "offload.vae=gpu", "model.compile=false", "comm.symmetric_memory=false"]


# ----------------------------------------------------------------------------------------------
# orchestrator


def _torchrun(nproc: int, part: str, args, extra: list[str]) -> tuple[int, float, str]:
    # --standalone: torchrun takes a free port itself, so lanes can run side by side (control runs)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           os.path.abspath(__file__), "--worker", part,
           "--device", args.device, "--out", args.out, *extra]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
           "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    tail = (proc.stdout + proc.stderr)[-3000:]
    return proc.returncode, time.perf_counter() - start, tail


def _config_jobs(world: int, patterns: list[str] | None = None, extra: list[str] | None = None
                 ) -> tuple[list[dict], list[dict]]:
    """(jobs on one rank, jobs on `world` ranks) for every shipped config whose name matches one of
    `patterns` (all when None); `extra` overrides go to every job, the references included."""
    one, many = [], []
    for path in sorted(glob.glob(os.path.join(ROOT, "configs", "*.yaml"))):
        name = os.path.splitext(os.path.basename(path))[0]
        if patterns and not any(fnmatch.fnmatchcase(name, p) for p in patterns):
            continue
        from omegaconf import OmegaConf

        raw = OmegaConf.load(path)
        if extra:  # the bound follows what the jobs run: a control's overrides decide the kind too
            raw = OmegaConf.merge(raw, OmegaConf.from_dotlist(list(extra)))
        cfg_degree = int(OmegaConf.select(raw, "parallel.cfg_degree", default=1) or 1)
        small = [o for o in SMALL if not (o.startswith("sample.steps=")
                                          and OmegaConf.select(raw, "sample.timesteps", default=None))]
        base = [*_tiny_for(raw), *small]  # a config with a step list keeps its step count
        tail = list(extra or [])  # no key the layouts set (refused in main)
        one.append({"name": f"{name}.ref", "config": path, "overrides": base + PLAIN + tail})
        one.append({"name": f"{name}.1", "config": path, "ref": f"{name}.ref", "kind": _one_gpu_kind(raw),
                    "overrides": base + ["parallel.ulysses_degree=1", "parallel.cfg_degree=1",
                                         "parallel.ring_degree=1"] + tail, "layout": "1 x 1"})
        if world > 1:
            cfg = cfg_degree if world % cfg_degree == 0 else 1
            uly, ring = _split(world // cfg, int(OmegaConf.select(raw, "parallel.ring_degree", default=1) or 1))
            # a ring merges bf16 partial outputs (rounded once more than one kernel's output): rounding, not exact
            low_precision = OmegaConf.select(raw, "model.dtype", default="bf16") != "fp32"
            kind = _kind(raw)
            kind = "rounding" if kind == "exact" and ring > 1 and low_precision else kind
            many.append({"name": f"{name}.{world}", "config": path, "ref": f"{name}.ref", "kind": kind,
                         "overrides": base + [f"parallel.cfg_degree={cfg}", f"parallel.ulysses_degree={uly}",
                                              f"parallel.ring_degree={ring}"] + tail,
                         "layout": f"cfg {cfg} x ulysses {uly}" + (f" x ring {ring}" if ring > 1 else "")})
    return one, many


def _fp8_compiled(raw) -> bool:
    from omegaconf import OmegaConf

    return (OmegaConf.select(raw, "model.quant", default=None) == "fp8"
            and bool(OmegaConf.select(raw, "model.compile", default=False))
            and OmegaConf.select(raw, "model.dtype", default="bf16") == "bf16")  # the FP8 GEMM's dtype


def _one_gpu_kind(raw) -> str:
    """One GPU differs from the plain reference only by compiled blocks (model.compile), if at all."""
    from omegaconf import OmegaConf

    if _fp8_compiled(raw):
        return "fp8_rounding"
    return "rounding" if OmegaConf.select(raw, "model.compile", default=False) else "exact"


def _split(ranks: int, ring: int, heads: int = 12) -> tuple[int, int]:
    """(ulysses, ring) over `ranks`: the config's ring where it divides them and leaves a Ulysses degree that
    splits the tiny model's heads, else the largest Ulysses degree that does, the ring taking the rest."""
    if ranks % ring == 0 and heads % (ranks // ring) == 0:
        return ranks // ring, ring
    uly = max(u for u in range(1, ranks + 1) if ranks % u == 0 and heads % u == 0)
    return uly, ranks // uly


def _kind(raw) -> str:
    from omegaconf import OmegaConf

    fp8 = OmegaConf.select(raw, "parallel.comm_dtype") == "fp8"
    split_text = OmegaConf.select(raw, "text_encoder.parallel", default="replicate") != "replicate"
    low_precision = OmegaConf.select(raw, "model.dtype", default="bf16") != "fp32"
    # compiled blocks (the fp8 configs) fuse ops the eager reference rounds one by one
    compiled = bool(OmegaConf.select(raw, "model.compile", default=False)) and low_precision
    if _fp8_compiled(raw):
        return "fp8_rounding"
    return "rounding" if fp8 or (split_text and low_precision) or compiled else "exact"


def _tiny_for(raw) -> list[str]:
    """The tiny model of the config's kind: model.path=null, plus the kind key where there is one."""
    from omegaconf import OmegaConf

    out = ["model.path=null"]
    kind = OmegaConf.select(raw, "model.tiny", default=None)
    path = str(OmegaConf.select(raw, "model.path", default=None) or "")
    kind = kind or next((tiny for name, tiny in TINY_OF if name in path), None)
    if kind is not None:
        out.append(f"model.tiny={kind}")
    loras = OmegaConf.select(raw, "lora", default=None) or []
    if loras:  # the tiny family's own LoRA in place of each file the config names
        out.append("lora=[" + ", ".join(f"{{path: tiny, scale: {entry.get('scale', 1.0)}}}" for entry in loras) + "]")
    return out


def _run_configs(args, world: int) -> list[dict]:
    one, many = _config_jobs(world, args.configs, args.set)
    if not one:
        return [{"part": "configs", "name": " ".join(args.configs or []), "layout": "-", "diff": None,
                 "seconds": None, "ok": False, "detail": "no config matches --configs"}]
    rows = []
    for jobs, nproc in ((one, 1), (many, world)):
        if not jobs:
            continue
        for job in jobs:  # a result left by an earlier run must not be read as this one's
            stale = os.path.join(args.out, f"{job['name']}.pt")
            if os.path.exists(stale):
                os.remove(stale)
        spec = os.path.join(args.out, f"jobs_{nproc}.json")
        with open(spec, "w") as f:
            json.dump(jobs, f)
        rc, seconds, tail = _torchrun(nproc, "configs", args, ["--jobs", spec])
        if rc != 0:
            rows.append({"part": "configs", "name": f"{nproc} rank(s)", "layout": "-", "diff": None,
                         "seconds": round(seconds, 1), "ok": False, "detail": tail})
    import torch

    for job in one + many:
        if "ref" not in job:
            continue
        got, ref = (os.path.join(args.out, f"{n}.pt") for n in (job["name"], job["ref"]))
        if not (os.path.exists(got) and os.path.exists(ref)):
            continue
        a, b = torch.load(got), torch.load(ref)
        if "error" in a or "error" in b:
            rows.append({"part": "configs", "name": job["name"].rsplit(".", 1)[0], "layout": job["layout"],
                         "diff": None, "seconds": None, "ok": False, "detail": (a.get("error") or b.get("error"))})
            continue
        delta = (a["frames"].int() - b["frames"].int()).abs()
        diff, mean = int(delta.max()), float(delta.float().mean())
        bound = FRAME_LEVELS[job["kind"]]
        rows.append({"part": "configs", "name": f"{job['name'].rsplit('.', 1)[0]} ({job['kind']})",
                     "layout": job["layout"], "diff": diff, "unit": f"levels (mean {mean:.3f})",
                     "bound": f"{bound[0]} (mean {bound[1]})", "seconds": a["seconds"],
                     "ok": diff <= bound[0] and mean <= bound[1], "kernel": a.get("kernel")})
    return rows


def _run_worker_part(args, part: str, world: int) -> list[dict]:
    if world < 2 and part in ("t5", "ulysses", "ring"):
        return [{"part": part, "name": "-", "layout": "-", "diff": None, "seconds": None, "ok": None,
                 "detail": "needs 2 GPUs: not run on this machine"}]
    rc, seconds, tail = _torchrun(1 if part == "backends" else world, part, args, [])
    path = os.path.join(args.out, f"{part}.json")
    if rc != 0 or not os.path.exists(path):
        return [{"part": part, "name": "-", "layout": f"{world} ranks", "diff": None, "seconds": round(seconds, 1),
                 "ok": False, "detail": tail}]
    with open(path) as f:
        return json.load(f)


def _table(rows: list[dict]) -> str:
    lines = ["| part | name | layout | max abs diff | bound | seconds | result |", "|---|---|---|---:|---:|---:|---|"]
    for r in rows:
        diff = "-" if r.get("diff") is None else (f"{r['diff']:.3g}" if isinstance(r["diff"], float)
                                                  else str(r["diff"]))
        unit = f" {r['unit']}" if r.get("unit") and r.get("diff") is not None else ""
        result = {True: "pass", False: "FAIL", None: "not run"}[r.get("ok")]
        if r.get("detail") and r.get("ok") is None:
            result += f" ({r['detail']})"
        secs = "-" if r.get("seconds") is None else f"{r['seconds']:.2f}"
        lines.append(f"| {r['part']} | {r['name']} | {r['layout']} | {diff}{unit} | {r.get('bound', '-')} | {secs} "
                     f"| {result} |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", nargs="*", default=["configs", "t5", "ulysses", "ring", "backends"],
                    choices=["configs", "t5", "ulysses", "ring", "backends"])
    ap.add_argument("--gpus", type=int, default=None, help="ranks for the multi-GPU half (default: all GPUs)")
    ap.add_argument("--configs", nargs="+", default=None, metavar="GLOB",
                    help="configs part: only configs whose name (no .yaml) matches one of these patterns")
    ap.add_argument("--set", nargs="+", default=None, metavar="KEY=VALUE",
                    help="configs part: overrides added to every job, references included (control runs; "
                         "not the keys the lane's layouts set; give such a run its own --out)")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--out", default=os.path.join(ROOT, "outputs", "gpu_lane"))
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--jobs", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    owned = {o.split("=", 1)[0] for o in PLAIN + SMALL} | {"model.path", "model.tiny", "output.path", "device"}
    for item in args.set or []:
        key = item.split("=", 1)[0]
        if "=" not in item or key.startswith("parallel.") or key in owned:
            ap.error(f"--set {item}: give key=value for a key the lane does not set itself (not parallel.*, "
                     f"{', '.join(sorted(owned - {'device'}))}); the lane's layouts and references own those")
    os.makedirs(args.out, exist_ok=True)
    if args.worker:
        return worker_main(args)
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_lane: no CUDA device visible (use --device cpu to run the lane on gloo)")
        return 2
    world = args.gpus or (torch.cuda.device_count() if args.device == "cuda" else 2)
    header = (f"GPU lane: {world} x {torch.cuda.get_device_name() if args.device == 'cuda' else 'CPU (gloo)'}, "
              f"torch {torch.__version__}, {time.strftime('%Y-%m-%d %H:%M')}")
    print(header, flush=True)
    rows: list[dict] = []
    for part in args.parts:
        start = time.perf_counter()
        new = _run_configs(args, world) if part == "configs" else _run_worker_part(args, part, world)
        rows.extend(new)
        print(f"  {part}: {len(new)} rows in {time.perf_counter() - start:.0f} s", flush=True)
    print("\n" + _table(rows))
    for r in rows:
        if r.get("ok") is False and r.get("detail"):
            print(f"\n--- {r['part']} {r['name']} failed:\n{r['detail']}")
    with open(os.path.join(args.out, "lane.json"), "w") as f:
        json.dump({"header": header, "rows": rows}, f, indent=1)
    return 1 if any(r.get("ok") is False for r in rows) else 0


# ----------------------------------------------------------------------------------------------
# workers (under torchrun)


def _device(args):
    from lightx2v_sp.distributed import resolve_device

    return resolve_device(args.device)


def worker_main(args) -> int:
    import datetime

    import torch
    import torch.distributed as dist

    device = _device(args)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 or args.worker != "configs":
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(seconds=300),
                                **({"device_id": device} if device.type == "cuda" else {}))
    try:
        return {"configs": _worker_configs, "t5": _worker_t5, "ulysses": _worker_ulysses, "ring": _worker_ring,
                "backends": _worker_backends}[args.worker](args, device)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


class _NoMp4:
    """A video writer that writes nothing (both mp4 paths, streamed and whole, open their writer through
    video_stream.open_writer)."""

    def append_data(self, frame) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self) -> "_NoMp4":
        return self

    def __exit__(self, *exc) -> None:
        pass


def _worker_configs(args, device) -> int:
    import torch
    import torch.distributed as dist

    from lightx2v_sp.config import load_config
    from lightx2v_sp.models.vae import to_uint8_frames
    from lightx2v_sp.pipeline import runner, video_stream

    try:
        import imageio_ffmpeg  # noqa: F401
    except ImportError:  # GPU machines may lack ffmpeg: the lane compares frames, not mp4 files
        runner.check_video_writer = lambda: None
        video_stream.open_writer = lambda path, fps, quality: _NoMp4()  # the mp4 stays an empty file
    rank = dist.get_rank() if dist.is_initialized() else 0
    with open(args.jobs) as f:
        jobs = json.load(f)
    for job in jobs:
        start = time.perf_counter()
        try:  # one failing config is a failed row, not the end of the lane
            cfg = load_config(job["config"], job["overrides"] + [
                f"output.path={os.path.join(args.out, job['name'])}.mp4", f"device={device.type}"])
            result = runner.run(cfg, device, progress=False, keep_video=True)
        except Exception as e:  # noqa: BLE001
            if rank == 0:
                torch.save({"error": f"{type(e).__name__}: {e}"[:2000]}, os.path.join(args.out, f"{job['name']}.pt"))
            print(f"[lane] {job['name']}: FAILED {type(e).__name__}: {e}", flush=True)
            continue
        seconds = time.perf_counter() - start
        if rank == 0:
            frames = to_uint8_frames(result.video)
            kernel = result.summary.get("layout", {}).get("attention_backend")
            torch.save({"frames": frames, "seconds": round(seconds, 2), "kernel": kernel},
                       os.path.join(args.out, f"{job['name']}.pt"))
            print(f"[lane] {job['name']}: {seconds:.1f} s, kernel {kernel}", flush=True)
    return 0


def _worker_t5(args, device) -> int:
    import torch
    import torch.distributed as dist

    from lightx2v_sp.distributed import ParallelDims, symmetric_memory
    from lightx2v_sp.models.t5 import load_parallel_t5
    from lightx2v_sp.models.tiny import ensure_tiny_model

    root = ensure_tiny_model() if dist.get_rank() == 0 else None
    holder = [root]
    dist.broadcast_object_list(holder, src=0)
    path = os.path.join(holder[0], "text_encoder")
    dims = ParallelDims(ulysses_degree=dist.get_world_size())
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(2, 200, (2, 32), generator=g)
    mask = (torch.arange(32)[None] < torch.tensor([[27], [11]])).long()
    rows = []
    dtypes = [torch.float32] + ([torch.bfloat16] if device.type == "cuda" else [])
    for dtype in dtypes:
        ref = load_parallel_t5(path, dims, "replicate", dtype=dtype).to(device)
        with torch.no_grad():
            want = ref(ids.to(device), mask.to(device)).float()
        for mode in ("tp", "dp"):
            for symm in (False, True):
                enc = load_parallel_t5(path, dims, mode, dtype=dtype, symmetric_memory=symm).to(device)
                active = enc.parallel_forward.symmetric
                start = time.perf_counter()
                with torch.no_grad():
                    got = enc(ids.to(device), mask.to(device)).float()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                seconds = time.perf_counter() - start
                note = "symmetric memory " + ("on" if symm else "off")
                if symm and not active:
                    note += f" (unavailable: {symmetric_memory.unavailable_reason(dims.world_group)})"
                if dtype == torch.float32:
                    diff, unit, bound = float((got - want).abs().max()), "abs", T5_ATOL["fp32"]
                else:
                    diff, unit, bound = float((got - want).norm() / want.norm()), "rel", T5_REL["bf16"]
                rows.append({"part": "t5", "name": f"umt5 {mode} {str(dtype)[6:]}, {note}",
                             "layout": f"{dims.world_size} ranks", "diff": diff, "unit": unit, "bound": bound,
                             "seconds": round(seconds, 4), "ok": diff <= bound})
    if dist.get_rank() == 0:
        with open(os.path.join(args.out, "t5.json"), "w") as f:
            json.dump(rows, f)
    return 0


def _worker_ulysses(args, device) -> int:
    import torch
    import torch.distributed as dist

    from lightx2v_sp.attention import attention, ulysses_attention
    from lightx2v_sp.distributed import ParallelDims, split_sizes

    world = dist.get_world_size()
    dims = ParallelDims(ulysses_degree=world)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    shapes = [("1.3B 480p", 32760, 12), ("14B 480p", 32760, 40), ("1.3B uneven", 32760 + world - 1, 12)]
    if device.type != "cuda":
        shapes = [("1.3B heads", 1021, 12), ("14B heads", 1021, 40)]
    rows = []
    for label, s, h in shapes:
        if h % world:
            continue
        g = torch.Generator().manual_seed(s + h)
        q, k, v = (torch.randn(1, s, h, 128, generator=g).to(device, dtype) for _ in range(3))
        want = attention(q, k, v)
        sizes = split_sizes(s, world)
        lo = sum(sizes[:dims.rank])
        local = [t[:, lo:lo + sizes[dims.rank]].contiguous() for t in (q, k, v)]
        mine = want[:, lo:lo + sizes[dims.rank]]
        for a2a in ("all_to_all", "round_robin"):
            for fuse in (True, False):
                for comm in (None, "fp8"):
                    def call():
                        return ulysses_attention(*local, group=dims.sp_group, seq_sizes=sizes, a2a=a2a,
                                                 fuse_qkv=fuse, comm_dtype=comm)
                    out = call()
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    start = time.perf_counter()
                    for _ in range(3):
                        out = call()
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    seconds = (time.perf_counter() - start) / 3
                    rel = float((out.float() - mine.float()).norm() / mine.float().norm())
                    errs = [torch.zeros(2, device=device) for _ in range(world)]
                    dist.all_gather(errs, torch.tensor([rel, float(torch.equal(out, mine))], device=device))
                    worst = max(float(e[0]) for e in errs)
                    identical = all(float(e[1]) == 1.0 for e in errs)
                    bound = 0.1 if comm == "fp8" else ULYSSES_EXACT_REL  # fp8: |err| <= amax / 16 per value
                    name = f"{label} S={s} H={h}: {a2a}{' fused' if fuse else ''}{' fp8' if comm else ''}"
                    rows.append({"part": "ulysses", "name": name + (" (bit-identical)" if identical else ""),
                                 "layout": f"ulysses {world}", "diff": worst, "unit": "rel", "bound": bound,
                                 "seconds": round(seconds, 5), "ok": worst <= bound})
        del q, k, v, want
    if dims.rank == 0:
        with open(os.path.join(args.out, "ulysses.json"), "w") as f:
            json.dump(rows, f)
    return 0


def _worker_ring(args, device) -> int:
    import functools

    import torch
    import torch.distributed as dist

    from lightx2v_sp.attention import attention
    from lightx2v_sp.attention.options import UlyssesOptions
    from lightx2v_sp.attention.ring import usp_attention
    from lightx2v_sp.distributed import ParallelDims, split_sizes

    world = dist.get_world_size()
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    shapes = [("14B 720p", 75600, 40), ("1.3B 480p uneven", 32760 + world - 1, 12)]
    if device.type != "cuda":
        shapes = [("14B heads", 1021, 40), ("1.3B heads uneven", 1021 + world - 1, 12)]
    layouts = [(u, world // u) for u in range(1, world) if world % u == 0]  # ring N, then ulysses u x ring N/u
    every_dims = {(u, r): ParallelDims(ulysses_degree=u, ring_degree=r) for u, r in layouts}  # groups: once
    rows = []
    for label, s, h in shapes:
        g = torch.Generator().manual_seed(s + h)
        q, k, v = (torch.randn(1, s, h, 128, generator=g).to(device, dtype) for _ in range(3))
        want = attention(q, k, v)
        t_one = _seconds(functools.partial(attention, q, k, v), device)
        for uly, ring in layouts:
            if h % uly:
                continue
            dims = every_dims[(uly, ring)]
            sizes = split_sizes(s, world)
            lo = sum(sizes[:dims.sp_rank])
            local = [t[:, lo:lo + sizes[dims.sp_rank]].contiguous() for t in (q, k, v)]
            mine = want[:, lo:lo + sizes[dims.sp_rank]]
            for comm in (None, "fp8"):
                options = UlyssesOptions(comm_dtype=comm)
                call = functools.partial(usp_attention, *local, dims.ulysses_group, dims.ring_group, sizes, options)
                out = call()
                seconds = _seconds(call, device)
                rel = float((out.float() - mine.float()).norm() / mine.float().norm())
                errs = [torch.zeros(2, device=device) for _ in range(world)]
                dist.all_gather(errs, torch.tensor([rel, seconds], device=device))
                worst, slowest = max(float(e[0]) for e in errs), max(float(e[1]) for e in errs)
                bound = 0.1 if comm == "fp8" else ULYSSES_EXACT_REL  # fp8: |err| <= amax / 16 per value
                speed = f"one rank {t_one * 1e3:.1f} ms, x{t_one / slowest:.2f}"
                name = f"{label} S={s} H={h}{' fp8' if comm else ''} ({speed})"
                rows.append({"part": "ring", "name": name, "layout": f"ulysses {uly} x ring {ring}", "diff": worst,
                             "unit": "rel", "bound": bound, "seconds": round(slowest, 5), "ok": worst <= bound})
        del q, k, v, want
    if dist.get_rank() == 0:
        with open(os.path.join(args.out, "ring.json"), "w") as f:
            json.dump(rows, f)
    return 0


def _seconds(fn, device, iters: int = 3) -> float:
    import torch

    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / iters


def _worker_backends(args, device) -> int:
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F

    from lightx2v_sp.attention import attention, available_backends, resolve_backend
    from lightx2v_sp.attention.backends import kernel_info

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 300, 8, 128, generator=g).to(device, dtype) for _ in range(3))
    ref = F.scaled_dot_product_attention(*(t.float().transpose(1, 2) for t in (q, k, v))).transpose(1, 2)
    rows = []
    auto = resolve_backend("auto", device, dtype, 128)
    for name in ["auto"] + available_backends():
        info = kernel_info(auto if name == "auto" else name)
        if not info.supports(device, dtype, 128):
            continue
        start = time.perf_counter()
        out = attention(q, k, v, backend=name)
        seconds = time.perf_counter() - start
        rel = float((out.float() - ref).norm() / ref.norm())
        bound = 1e-2 if info.exact else 5e-2  # bf16 operands: 1e-3..1e-2; quantized kernels a few %
        label = f"{name} -> {auto}" if name == "auto" else f"{name} ({'exact' if info.exact else 'lossy'})"
        rows.append({"part": "backends", "name": label, "layout": f"{device.type} {dtype}".replace("torch.", ""),
                     "diff": rel, "unit": "rel", "bound": bound, "seconds": round(seconds, 4), "ok": rel <= bound})
    if not dist.is_initialized() or dist.get_rank() == 0:
        with open(os.path.join(args.out, "backends.json"), "w") as f:
            json.dump(rows, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
