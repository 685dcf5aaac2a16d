"""Host memory of DiT block offload with N local ranks: one shared pinned copy vs one copy per rank.

    torchrun --nproc_per_node 2 scripts/bench_share_host.py --config 1.3b            # shared (offload.share_host)
    torchrun --nproc_per_node 2 scripts/bench_share_host.py --config 1.3b --private  # one copy per rank

The ranks may share one GPU: the process group is gloo (the sharing needs only barriers and small
objects), every rank uses cuda:LOCAL_RANK % device_count. Each rank builds the same random-weight DiT
on the GPU, runs one forward resident, installs block offload (packing into the host copy), runs
the same forward offloaded and checks it is bit-identical. Reported per rank: proportional set
size (Pss: shared pages divided among the processes that map them) before and after, the
page-locked status of the host copy, and the host->device bandwidth of one block copy from it.
The sum of the Pss increases is the node's host memory for the blocks (meaningful on CUDA, where
the weights start on the GPU; on CPU the packed copy replaces the model's own host tensors).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from lightx2v_sp.models.wan import WanConfig, WanModel  # noqa: E402
from lightx2v_sp.offload import CudaTransport, HostTransport, offload_dit_blocks  # noqa: E402

GIB = 1 << 30


def pss_bytes() -> int:
    with open("/proc/self/smaps_rollup") as f:
        for line in f:
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    return 0


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--config", default="1.3b", help="tiny, 1.3b or 14b (random weights)")
    p.add_argument("--private", action="store_true", help="offload.share_host=false: one copy per rank")
    p.add_argument("--tokens", type=int, default=1024)
    args = p.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count()) if cuda \
        else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    cfg = WanConfig.named(args.config)
    torch.manual_seed(0)
    with torch.device(device):
        model = WanModel(cfg).to(torch.bfloat16).eval()
    g = torch.Generator().manual_seed(1)
    side = max(2, int((args.tokens / 2) ** 0.5))
    x = torch.randn(1, cfg.in_dim, 2, 2 * side, 2 * side, generator=g).to(device)  # fp32, as the pipeline passes
    t = torch.tensor([500.0], device=device)
    ctx = torch.randn(1, 64, cfg.text_dim, generator=g).to(device, torch.bfloat16)
    with torch.no_grad():
        resident = model(x, t, ctx)
    dist.barrier()
    before = pss_bytes()
    transport = CudaTransport(device) if cuda else HostTransport()
    handle = offload_dit_blocks(model, device, transport=transport, share_host=not args.private)
    dist.barrier()
    after = pss_bytes()
    with torch.no_grad():
        same = torch.equal(model(x, t, ctx), resident)
    host = handle._host_flat[0]
    pinned = bool(host.is_pinned()) if cuda else None
    gbps = None
    if cuda:
        dev = torch.empty_like(host, device=device)
        transport.wait(transport.copy_async(dev, host))
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(5):
            transport.wait(transport.copy_async(dev, host))
        torch.cuda.synchronize()
        gbps = 5 * host.numel() / (time.perf_counter() - start) / 1e9
    rows = [None] * world
    dist.all_gather_object(rows, (rank, before, after, same, pinned, gbps, bool(handle._arena is not None and handle._arena.shared)))
    if rank == 0:
        blocks = handle.block_nbytes * len(model.blocks)
        mode = "private (one copy per rank)" if args.private else "shared (offload.share_host)"
        print(f"Block offload host copy, Wan {args.config} random weights, {world} local ranks, {mode}; "
              f"blocks = {blocks / GIB:.2f} GiB\n")
        print("| rank | Pss before GiB | Pss after GiB | increase GiB | bit-identical | pinned | H2D GB/s | shared |")
        print("|---:|---:|---:|---:|---|---|---:|---|")
        for r, b, a, s, pin, bw, shared in rows:
            print(f"| {r} | {b / GIB:.2f} | {a / GIB:.2f} | {(a - b) / GIB:.2f} | {s} | {pin} | "
                  f"{'' if bw is None else f'{bw:.1f}'} | {shared} |")
        total = sum(a - b for _, b, a, *_ in rows)
        print(f"\nnode total increase: {total / GIB:.2f} GiB = {total / blocks:.2f} x the blocks")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
