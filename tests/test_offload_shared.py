"""offload.share_host: the local ranks of a node map one host copy of the offloaded DiT blocks.

2 gloo ranks on one machine (LOCAL_WORLD_SIZE=2): outputs are bit-identical to the resident model,
both processes map the same /dev/shm file (same inode, one file of one copy's size, already
unlinked), a write by one rank is seen by the other, and ranks whose weights differ are refused.
"""
import os

import torch

from lightx2v_sp.models.wan import WanConfig, WanModel
from lightx2v_sp.offload import HostTransport, offload_dit_blocks
from lightx2v_sp.testing import run_on_ranks


def _model():
    torch.manual_seed(0)
    return WanModel(WanConfig.tiny(num_layers=3)).eval()


def _inputs():
    g = torch.Generator().manual_seed(1)
    return torch.randn(1, 16, 2, 4, 4, generator=g), torch.tensor([500.0]), torch.randn(1, 5, 64, generator=g)


def _shared_mappings():
    """(path, inode, size) of this process's mappings of lightx2v_sp shared-memory files."""
    out = set()
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 6 and "lightx2v_sp-" in parts[5]:
                lo, hi = (int(x, 16) for x in parts[0].split("-"))
                out.add((parts[5], int(parts[4]), hi - lo))
    return sorted(out)


def _rank_fn(rank, world):
    import torch.distributed as dist

    os.environ["LOCAL_WORLD_SIZE"] = str(world)
    model = _model()
    x, t, ctx = _inputs()
    with torch.no_grad():
        resident = model(x, t, ctx)
        handle = offload_dit_blocks(model, "cpu", transport=HostTransport(), share_host=True)
        offloaded = model(x, t, ctx)
    flat = handle._arena.tensor
    maps = _shared_mappings()
    before = int(flat[0])
    dist.barrier()
    if rank == 1:
        flat[0] += 1  # a write through rank 1's mapping...
    dist.barrier()
    seen = int(flat[0])  # ...is what rank 0 reads through its own
    dist.barrier()
    if rank == 1:
        flat[0] -= 1
    result = {"equal": torch.equal(resident, offloaded), "writer": handle._arena.writer, "maps": maps,
              "nbytes": flat.numel(), "expected_nbytes": handle.block_nbytes * len(model.blocks),
              "before": before, "seen": seen, "exists": [os.path.exists(p.replace(" (deleted)", "")) for p, _, _ in maps]}

    other = _model()
    if rank == 1:
        with torch.no_grad():
            other.blocks[0].ffn[0].weight[0, 0] += 1.0
    try:
        offload_dit_blocks(other, "cpu", transport=HostTransport(), share_host=True)
        result["mismatch"] = None
    except ValueError as e:
        result["mismatch"] = str(e)
    return result


def test_local_ranks_share_one_host_copy():
    r0, r1 = run_on_ranks(_rank_fn, 2, timeout=120)
    assert r0["equal"] and r1["equal"]  # the same bits as the resident blocks on both ranks
    assert r0["writer"] and not r1["writer"]
    assert len(r0["maps"]) == 1 and r0["maps"] == r1["maps"]  # one file, the same inode in both processes
    path, inode, size = r0["maps"][0]
    assert inode != 0 and size >= r0["expected_nbytes"] == r0["nbytes"]  # one copy of all blocks
    assert "(deleted)" in path or not any(r0["exists"])  # unlinked once mapped: nothing left in /dev/shm
    assert r0["seen"] == (r0["before"] + 1) % 256  # rank 1's write is visible to rank 0: one copy
    for r in (r0, r1):  # rank 1's weights differ: both ranks refuse, neither hangs
        assert r["mismatch"] is not None and "rank(s) [1] differ" in r["mismatch"]


def test_single_process_keeps_a_private_buffer():
    model = _model()
    x, t, ctx = _inputs()
    with torch.no_grad():
        resident = model(x, t, ctx)
        handle = offload_dit_blocks(model, "cpu", transport=HostTransport(), share_host=True)
        assert not handle._arena.shared and handle._arena.writer
        assert torch.equal(model(x, t, ctx), resident)
