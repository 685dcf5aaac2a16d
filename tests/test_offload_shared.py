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

    # rank 1 never read its blocks (the loader skipped them): rank 0's shared copy supplies them
    unread = _model()
    if rank == 1:
        with torch.no_grad():
            for p in unread.blocks.parameters():
                p.fill_(float("nan"))
    with torch.no_grad():
        offload_dit_blocks(unread, "cpu", transport=HostTransport(), share_host=True, weights_loaded=rank == 0)
        result["unread_equal"] = torch.equal(unread(x, t, ctx), resident)
    try:  # local rank 0 cannot skip: nobody would fill the copy
        offload_dit_blocks(_model(), "cpu", transport=HostTransport(), share_host=True, weights_loaded=rank == 1)
        result["writer_unread"] = None
    except ValueError as e:
        result["writer_unread"] = str(e)

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
        assert r["unread_equal"]  # NaN blocks never read on rank 1: the shared copy is what runs
        assert r["writer_unread"] is not None and "rank(s) [0] skipped reading" in r["writer_unread"]


def test_single_process_keeps_a_private_buffer():
    model = _model()
    x, t, ctx = _inputs()
    with torch.no_grad():
        resident = model(x, t, ctx)
        handle = offload_dit_blocks(model, "cpu", transport=HostTransport(), share_host=True)
        assert not handle._arena.shared and handle._arena.writer
        assert torch.equal(model(x, t, ctx), resident)


def test_loader_can_skip_the_blocks():
    from lightx2v_sp.models.tiny import ensure_tiny_model

    path = ensure_tiny_model()
    full = WanModel.from_pretrained(path)
    skipped = WanModel.from_pretrained(path, skip=lambda name: name.startswith("blocks."))
    for (name, a), (_, b) in zip(full.named_parameters(), skipped.named_parameters()):
        if not name.startswith("blocks."):
            assert torch.equal(a, b), name
