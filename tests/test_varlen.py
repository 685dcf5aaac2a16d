"""all_gather_v / reduce_scatter_v on gloo ranks vs single-process references, and the
symmetric-memory switch.

Tolerance: gathers only move bytes, so they must be bit-exact. Reduce-scatter sums N partial
tensors in a different order than torch.stack(...).sum(0) may: fp32 sums of N <= 3 terms of
magnitude ~1 differ by at most a few ulps (~1e-6); bf16 inputs are summed in fp32 and rounded
once, so they match the fp32-accumulated reference rounded to bf16 exactly or within one bf16 ulp
(2^-7 relative at magnitude <= 4, i.e. < 0.04).
"""
from __future__ import annotations

import sys
import warnings

import pytest
import torch

from lightx2v_sp.testing import run_on_ranks

CASES = {  # name -> (per-rank sizes for 2 ranks, for 3 ranks)
    "equal": ([4, 4], [3, 3, 3]),
    "uneven": ([5, 2], [4, 1, 3]),
    "with_zero": ([0, 6], [2, 0, 5]),
}


def _rank_tensor(seed: int, rank: int, shape, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed * 100 + rank)
    return torch.randn(*shape, generator=g).to(dtype)


def _varlen_ranks(rank: int, world: int):
    import torch.distributed as dist

    from lightx2v_sp.distributed import symmetric_memory as symm
    from lightx2v_sp.distributed import varlen
    from lightx2v_sp.distributed.comm_stats import CommStats
    from lightx2v_sp.distributed.varlen import all_gather_v, reduce_scatter_v

    # symmetric=False: no call may reach the symmetric-memory allocator
    def forbidden(*args, **kwargs):
        raise AssertionError("symmetric memory touched while comm.symmetric_memory is off")

    world_group = dist.group.WORLD  # group=None would be this process alone (groups.py)

    symm.empty = forbidden
    out = {}
    stats = CommStats()
    native = None
    with stats.record():
        for fallback, (name, sizes_by_world) in [(f, c) for f in (False, True) for c in CASES.items()]:
            if fallback and native is None:  # a backend without the single-buffer collectives
                native = varlen._TENSOR_COLLECTIVES.get("gloo")
                varlen._TENSOR_COLLECTIVES["gloo"] = False
            sizes = sizes_by_world[0] if world == 2 else sizes_by_world[1]
            for dtype in (torch.float32, torch.bfloat16):
                key = (name, str(dtype), fallback)
                # gather along dim 1 of [2, S_r, 3]: the moved-dim path
                mine = _rank_tensor(1, rank, (2, sizes[rank], 3), dtype)
                gathered = all_gather_v(mine, 1, sizes, world_group)
                # reduce-scatter of full-length partial sums along dim 0 of [S, 5]
                partial = _rank_tensor(2, rank, (sum(sizes), 5), dtype)
                scattered = reduce_scatter_v(partial, 0, sizes, world_group)
                out[key] = (gathered, scattered)
    # asked for on gloo on CPU, it cannot be honoured: a warning, and the collectives stay ordinary
    symm.empty = forbidden
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        active = symm.activate(world_group)
        again = symm.activate(world_group)
    warned = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    sizes = [3, 1, 2][:world]
    after = all_gather_v(_rank_tensor(3, rank, (sizes[rank], 2)), 0, sizes, world_group, active)
    with pytest.raises(ValueError, match="sizes"):
        all_gather_v(torch.zeros(2, 2), 0, [2] * (world + 1), world_group)
    with pytest.raises(ValueError, match="holds 2 rows"):
        reduce_scatter_v(torch.zeros(2, 2), 0, [2] * world, world_group)
    dist.barrier()
    return {"out": out, "stats": stats.as_dict(), "native": native, "active": (active, again), "warned": warned, "after": after,
            "symm_imported": "torch.distributed._symmetric_memory" in sys.modules}


@pytest.mark.parametrize("world", [2, 3])
def test_all_gather_v_and_reduce_scatter_v(world):
    results = run_on_ranks(_varlen_ranks, world)
    for fallback, (name, sizes_by_world) in [(f, c) for f in (False, True) for c in CASES.items()]:
        sizes = sizes_by_world[0] if world == 2 else sizes_by_world[1]
        for dtype in (torch.float32, torch.bfloat16):
            key = (name, str(dtype), fallback)
            ref_gather = torch.cat([_rank_tensor(1, r, (2, sizes[r], 3), dtype) for r in range(world)], dim=1)
            partials = [_rank_tensor(2, r, (sum(sizes), 5), dtype) for r in range(world)]
            ref_sum = torch.stack([p.float() for p in partials]).sum(0)
            offsets = [sum(sizes[:r]) for r in range(world)]
            for r, res in enumerate(results):
                gathered, scattered = res["out"][key]
                # exactly sum(sizes) rows: no padding to the longest slice times N
                assert gathered.shape == (2, sum(sizes), 3) and gathered.dtype == dtype
                assert torch.equal(gathered, ref_gather), key
                want = ref_sum[offsets[r]:offsets[r] + sizes[r]]
                assert scattered.shape == (sizes[r], 5) and scattered.dtype == dtype
                tol = 1e-5 if dtype == torch.float32 else 0.04
                assert scattered.numel() == 0 or (scattered.float() - want).abs().max() <= tol, key
    for r, res in enumerate(results):
        # bytes this rank sent, per CommStats' convention, summed over the cases
        assert res["native"] is True  # this torch's gloo has them; the equal cases took that path
        ag = rs = 0
        for sizes_by_world in list(CASES.values()) * 2:
            sizes = sizes_by_world[0] if world == 2 else sizes_by_world[1]
            for elt in (4, 2):
                ag += sizes[r] * 2 * 3 * elt * (world - 1)
                rs += (sum(sizes) - sizes[r]) * 5 * elt
        assert res["stats"]["bytes"] == {"all_gather": ag, "reduce_scatter": rs}
        assert res["stats"]["calls"] == {"all_gather": 12, "reduce_scatter": 12}
        # switch asked on without CUDA/NCCL: stays off, says why exactly once, results unchanged
        assert res["active"] == (False, False)
        assert len(res["warned"]) == 1 and "comm.symmetric_memory=true is ignored" in res["warned"][0]
        sizes = [3, 1, 2][:world]
        assert torch.equal(res["after"], torch.cat([_rank_tensor(3, q, (sizes[q], 2)) for q in range(world)]))


def _off_is_free(rank: int, world: int):
    """Fresh process, never asked for: collectives must not import torch's symm-mem package."""
    import torch.distributed as dist

    from lightx2v_sp.distributed import symmetric_memory as symm
    from lightx2v_sp.distributed.varlen import all_gather_v, reduce_scatter_v

    before = "torch.distributed._symmetric_memory" in sys.modules
    calls = []
    symm.empty = lambda *a, **k: calls.append(a)
    g = dist.group.WORLD
    all_gather_v(torch.ones(rank + 1, 4), 0, [1, 2], g)
    all_gather_v(torch.ones(2, 4), 0, [2, 2], g)
    reduce_scatter_v(torch.ones(4, 4), 0, [2, 2], g)
    reduce_scatter_v(torch.ones(3, 4), 0, [1, 2], g)
    return before, "torch.distributed._symmetric_memory" in sys.modules, calls


def test_symmetric_memory_off_touches_nothing():
    for before, after, calls in run_on_ranks(_off_is_free, 2):
        assert not before and not after  # never imported
        assert calls == []


def _none_is_this_process(rank: int, world: int):
    """cfg 2 x ulysses 1: sp_group is None, and None must never mean every rank of the job."""
    from lightx2v_sp.distributed import ParallelDims
    from lightx2v_sp.distributed.varlen import all_gather_v, reduce_scatter_v

    dims = ParallelDims(ulysses_degree=1, cfg_degree=2)
    x = torch.full((rank + 1, 3), float(rank))
    return (dims.sp_group is None, all_gather_v(x, 0, [rank + 1], dims.sp_group) is x,
            reduce_scatter_v(x, 0, [rank + 1], dims.sp_group) is x,
            all_gather_v(x, 0, [1, 2], dims.world_group))


def test_group_none_is_this_process_alone():
    results = run_on_ranks(_none_is_this_process, 2)
    want = torch.cat([torch.full((1, 3), 0.0), torch.full((2, 3), 1.0)])
    for sp_none, gather_alone, scatter_alone, over_world in results:
        assert sp_none and gather_alone and scatter_alone
        assert torch.equal(over_world, want)


def test_single_process_is_identity():
    from lightx2v_sp.distributed.varlen import all_gather_v, reduce_scatter_v

    x = torch.randn(3, 4)
    assert all_gather_v(x, 0, [3], None) is x
    assert reduce_scatter_v(x, 0, [3], None) is x


@pytest.mark.parametrize("backend, device, want", [
    ("nccl", "cpu", "cuda:3"),         # offload.vae=cpu with vae.parallel=split on GPUs: staged through the GPU
    ("nccl", "cuda:3", "cuda:3"),
    ("gloo", "cpu", "cpu"),
    ("gloo", "cuda:3", "cpu"),         # gloo's send/recv carries host memory only
    ("cpu:gloo,cuda:nccl", "cpu", "cpu"),
    ("cpu:gloo,cuda:nccl", "cuda:3", "cuda:3"),
])
def test_wire_device_is_one_the_backend_carries(backend, device, want):
    """gather_v (the decode's gather) sends slices over the job's group; NCCL refuses CPU tensors ("No
    backend type associated with device type cpu"), so a CPU-decoded band goes through this rank's GPU."""
    from lightx2v_sp.distributed.groups import wire_device

    assert wire_device(backend, torch.device(device), cuda_index=3) == torch.device(want)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gather_v_hands_nccl_only_cuda_tensors(monkeypatch):
    """One GPU cannot host a 2-rank NCCL job, so the group is faked: gather_v of CPU slices (a VAE decoded on
    the host) with an "nccl" backend must send and receive CUDA tensors and still build the result on the CPU."""
    import torch.distributed as dist

    from lightx2v_sp.distributed import varlen

    wire: list = []
    sizes = [3, 2]
    slices = [torch.randn(2, s, 4) for s in sizes]
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "nccl")
    monkeypatch.setattr(dist, "get_global_rank", lambda group, r: r)
    monkeypatch.setattr(dist, "send", lambda t, dst, group=None: wire.append(t.clone()))

    def recv(buf, src, group=None):
        assert buf.is_cuda, buf.device
        buf.copy_(slices[src])

    monkeypatch.setattr(dist, "recv", recv)
    monkeypatch.setattr(varlen, "group_size_rank", lambda group: (2, 1))
    assert varlen.gather_v(slices[1], 1, sizes, dst=0, group=object(), out_device="cpu") is None
    assert len(wire) == 1 and wire[0].is_cuda and torch.equal(wire[0].cpu(), slices[1])
    monkeypatch.setattr(varlen, "group_size_rank", lambda group: (2, 0))
    out = varlen.gather_v(slices[0], 1, sizes, dst=0, group=object(), out_device="cpu")
    assert out.device.type == "cpu" and torch.equal(out, torch.cat(slices, dim=1))
