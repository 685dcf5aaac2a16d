"""VAE decode: time and peak GPU memory, whole frame vs row bands (parallel split, tiling), against the plan.

The real Wan2.1 VAE config (diffusers AutoencoderKLWan defaults) with random weights, or the tiny one.

One process (`python scripts/bench_vae.py`): every case runs on this device, one after the other:
  - whole frame: what one GPU does today;
  - `--ranks N`: the band of the largest rank and of rank 0 of an N-way split (the work and memory
    of one rank of an N-GPU job, without the gather to rank 0, which one GPU cannot measure);
  - `--tiling K`: all K bands of one GPU, one after another (vae.tiling=K).
Each row prints the plan's prediction (lightx2v_sp/plan.py) and measured / plan. With `--check`,
each band is compared with the same rows of the whole-frame decode (max |difference|).

Under torchrun (`torchrun --nproc_per_node N scripts/bench_vae.py`): the real split, every rank
decodes its band and rank 0 gathers the video (pipeline/decode.py), timed end to end.

    python scripts/bench_vae.py --res 480p 720p --dtype fp32 bf16 --ranks 2 8 --tiling 4 --check
    python scripts/bench_vae.py --config tiny --res 64x96 --frames 9 --ranks 2 3 --tiling 2 --check   # CPU
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from types import SimpleNamespace

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from lightx2v_sp.benchmarking import time_once  # noqa: E402
from lightx2v_sp.models.vae import WanVAE  # noqa: E402
from lightx2v_sp.pipeline.decode import decode_rows, gather_video, row_bands  # noqa: E402
from lightx2v_sp.plan import GIB, vae_decode_bytes  # noqa: E402

RES = {"480p": (480, 832), "720p": (720, 1280)}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _res(text: str) -> tuple[int, int]:
    if text in RES:
        return RES[text]
    h, w = text.lower().split("x")
    return int(h), int(w)


def build_vae(config: str, dtype: torch.dtype, device: torch.device) -> WanVAE:
    from diffusers import AutoencoderKLWan

    from lightx2v_sp.models.tiny import TINY_VAE

    torch.manual_seed(0)
    vae = AutoencoderKLWan(**(TINY_VAE if config == "tiny" else {}))
    # on the host: the decode moves its decoder to `device` and leaves the encoder there, as the runner does
    return WanVAE(vae.eval().requires_grad_(False).to(dtype=dtype))


def _peak_reset(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak(device):
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def _decode(vae, latents, device, world, rank, tiling=1):
    cfg = SimpleNamespace(parallel="split", tiling=tiling)
    piece, _ = decode_rows(vae, latents, device, cfg, "gpu", world, rank)
    return piece


def _vae_kwargs(config):
    from lightx2v_sp.models.tiny import TINY_VAE

    return dict(TINY_VAE) if config == "tiny" else {}


def _row(label, seconds, peak, plan_bytes, err=None, base=None):
    peak_s = f"{peak / GIB:.2f}" if peak is not None else "n/a"
    ratio = f"{peak / plan_bytes:.3f}" if peak is not None else "n/a"
    speed = f"{seconds / base:.3f}" if base else "1.000"
    err_s = f"{err:.1e}" if err is not None else ""
    return f"| {label} | {seconds:.3f} | {speed} | {peak_s} | {plan_bytes / GIB:.2f} | {ratio} | {err_s} |"


def single_process(args, device):
    print(f"VAE decode, {args.config} config, random weights, {args.frames} frames, "
          f"{torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}, torch {torch.__version__}")
    print("Band rows are one rank's work of an N-way split, run alone on this device (gather not included).\n")
    print("| case | seconds | vs whole frame | peak GiB | plan GiB | measured / plan | max abs diff vs whole |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    frames_lat = (args.frames - 1) // 4 + 1
    for dname in args.dtype:
        dtype = DTYPES[dname]
        vae = build_vae(args.config, dtype, device)
        warm = torch.randn(1, 16, 2, 8, 8, device=device)
        _decode(vae, warm, device, 1, 0)  # kernels, allocator, cudnn handles
        for res in args.res:
            h, w = _res(res)
            lat_h, lat_w = h // 8, w // 8
            latents = torch.randn(1, 16, frames_lat, lat_h, lat_w, generator=torch.Generator().manual_seed(1)).to(device)
            kwargs, nbytes = _vae_kwargs(args.config), 2 if dname == "bf16" else 4

            def plan(bands):
                return sum(vae_decode_bytes(kwargs, (lat_h, lat_w), args.frames, nbytes, bands).values())

            _peak_reset(device)
            out = {}
            t = time_once(lambda: out.setdefault("v", _decode(vae, latents, device, 1, 0)), device)
            whole_peak = _peak(device)
            whole = out.pop("v").float().cpu() if args.check else None
            out.clear()
            print(_row(f"{res} {dname} whole frame", t, whole_peak, plan([(0, lat_h)])), flush=True)
            for n in args.ranks:
                layout = row_bands(lat_h, n)
                # the rank with the largest predicted peak (a middle band: halos on both sides), and rank 0
                worst = max(range(n), key=lambda r: (plan(layout[r]), -r))
                for r in sorted({0, worst}):
                    _peak_reset(device)
                    tr = time_once(lambda: out.setdefault("v", _decode(vae, latents, device, n, r)), device)
                    peak = _peak(device)
                    piece = out.pop("v").float().cpu()
                    err = None
                    if whole is not None:
                        a, b = layout[r][0][0] * 8, layout[r][-1][1] * 8
                        err = (piece - whole[..., a:b, :]).abs().max().item()
                    print(_row(f"{res} {dname} rank {r} of {n} (rows {layout[r][0][0]}-{layout[r][-1][1]})", tr,
                               peak, plan(layout[r]), err, t), flush=True)
            for k in args.tiling:
                _peak_reset(device)
                tk = time_once(lambda: out.setdefault("v", _decode(vae, latents, device, 1, 0, tiling=k)), device)
                peak = _peak(device)
                piece = out.pop("v").float().cpu()
                err = (piece - whole).abs().max().item() if whole is not None else None
                print(_row(f"{res} {dname} tiling {k}", tk, peak, plan(row_bands(lat_h, 1, k)[0]), err, t), flush=True)
            del whole
        del vae


def torchrun(args, device):
    world, rank = dist.get_world_size(), dist.get_rank()
    frames_lat = (args.frames - 1) // 4 + 1
    rows = []
    for dname in args.dtype:
        vae = build_vae(args.config, DTYPES[dname], device)
        _decode(vae, torch.randn(1, 16, 2, 8, 8, device=device), device, 1, 0)
        for res in args.res:
            h, w = _res(res)
            latents = torch.randn(1, 16, frames_lat, h // 8, w // 8,
                                  generator=torch.Generator().manual_seed(1)).to(device)
            cfg = SimpleNamespace(parallel="split", tiling=1)
            _peak_reset(device)
            dist.barrier()
            start = time.perf_counter()
            piece, sizes = decode_rows(vae, latents, device, cfg, "gpu", world, rank)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            decoded = time.perf_counter() - start
            video = gather_video(piece, sizes, world, rank)
            del piece
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            total = time.perf_counter() - start
            peaks = [None] * world
            dist.all_gather_object(peaks, (decoded, total, _peak(device)))
            err = None
            if args.check and rank == 0:
                ref = vae.decode(latents)[0].cpu()
                err = (video - ref).abs().max().item()
            rows.append((res, dname, peaks, err))
            del video
        del vae
    if rank == 0:
        print(f"VAE decode split over {world} ranks ({dist.get_backend()}), {args.config} config, {args.frames} frames\n")
        print("| case | decode s (slowest rank) | decode + gather s | peak GiB per rank | max abs diff vs 1 rank |")
        print("|---|---:|---:|---|---:|")
        for res, dname, peaks, err in rows:
            mem = ", ".join(f"{p / GIB:.2f}" if p is not None else "n/a" for _, _, p in peaks)
            print(f"| {res} {dname} | {max(d for d, _, _ in peaks):.3f} | {max(t for _, t, _ in peaks):.3f} | {mem} | "
                  f"{'' if err is None else f'{err:.1e}'} |")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", choices=["wan21", "tiny"], default="wan21")
    p.add_argument("--res", nargs="+", default=["480p", "720p"], help="480p, 720p or HxW (pixels)")
    p.add_argument("--frames", type=int, default=81)
    p.add_argument("--dtype", nargs="+", choices=list(DTYPES), default=["fp32", "bf16"])
    p.add_argument("--ranks", nargs="*", type=int, default=[2, 8], help="one process: N-way splits to simulate")
    p.add_argument("--tiling", nargs="*", type=int, default=[4], help="one process: vae.tiling values")
    p.add_argument("--check", action="store_true", help="compare bands / gathered video with the whole frame")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    if "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1:
        local = int(os.environ.get("LOCAL_RANK", 0))
        device = torch.device(f"cuda:{local}") if args.device == "cuda" else torch.device("cpu")
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        try:
            torchrun(args, device)
        finally:
            dist.destroy_process_group()
    else:
        single_process(args, torch.device(args.device))


if __name__ == "__main__":
    with torch.no_grad():
        main()
