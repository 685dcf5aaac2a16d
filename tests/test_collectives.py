"""Sequence sharding, uneven all-to-all (both methods), ParallelDims and the test harness."""

import pytest
import torch
import torch.distributed as dist

from lightx2v_sp.distributed import CommStats, ParallelDims, gather_sequence, shard_sequence, split_sizes
from lightx2v_sp.distributed import comm_stats
from lightx2v_sp.distributed.collectives import exchange
from lightx2v_sp.testing import run_on_ranks


def test_split_sizes():
    assert split_sizes(10, 3) == [4, 3, 3]
    assert split_sizes(2, 4) == [1, 1, 0, 0]
    assert split_sizes(8, 4) == [2, 2, 2, 2]


def test_single_process_layout():
    dims = ParallelDims()
    assert (dims.world_size, dims.sp_size, dims.cfg_size, dims.sp_group) == (1, 1, 1, None)
    x = torch.randn(2, 5, 3)
    local, sizes = shard_sequence(x, dim=1, group=None)
    assert local is x and sizes == [5]
    assert gather_sequence(x, 1, sizes, None) is x
    with pytest.raises(ValueError, match=r"ulysses_degree x cfg_degree = 2 x 1 = 2 but the world size is 1"):
        ParallelDims(ulysses_degree=2)


def test_comm_stats_off_is_a_single_check():
    assert comm_stats._active is None
    comm_stats.record_comm("all_to_all", 10)  # no recorder: nothing happens, nothing allocated
    stats = CommStats()
    with stats.record():
        comm_stats.record_comm("all_to_all", 10)
        comm_stats.record_comm("all_to_all", 5)
    comm_stats.record_comm("all_to_all", 100)
    assert stats.calls["all_to_all"] == 2 and stats.bytes["all_to_all"] == 15
    assert comm_stats._active is None


def _shard_gather(rank, world):
    out = []
    for total, dim in [(7, 1), (2, 0), (12, 2)]:
        shape = [3, 3, 3]
        shape[dim] = total
        x = torch.arange(27 * total // 3, dtype=torch.float32).view(shape)
        local, sizes = shard_sequence(x, dim=dim, group=dist.group.WORLD)
        full = gather_sequence(local, dim=dim, sizes=sizes, group=dist.group.WORLD)
        out.append((sizes, torch.equal(full, x), local.shape[dim]))
    return out


@pytest.mark.parametrize("world", [2, 3])
def test_shard_and_gather_roundtrip(world):
    for rank, results in enumerate(run_on_ranks(_shard_gather, world)):
        for sizes, equal, local in results:
            assert equal and local == sizes[rank] and sum(sizes) in (7, 2, 12)


def _exchange(rank, world):
    out = []
    for method in ("all_to_all", "round_robin"):
        # rank r sends (r + 1) * (j + 1) rows of value 100 r + j to rank j (a few are empty)
        send_splits = [((rank + 1) * (j + 1)) % 4 for j in range(world)]
        recv_splits = [((i + 1) * (rank + 1)) % 4 for i in range(world)]
        send = torch.cat([torch.full((n, 2), 100.0 * rank + j) for j, n in enumerate(send_splits)])
        recv = torch.empty(sum(recv_splits), 2)
        seen = []
        exchange(send, recv, send_splits, recv_splits, dist.group.WORLD, method, unpack=seen.append)
        expected = torch.cat([torch.full((n, 2), 100.0 * i + rank) for i, n in enumerate(recv_splits)])
        out.append((method, torch.equal(recv, expected), sorted(seen)))
    return out


@pytest.mark.parametrize("world", [2, 3, 4])
def test_uneven_exchange_both_methods(world):
    for results in run_on_ranks(_exchange, world):
        for method, equal, seen in results:
            assert equal, method
            assert seen == list(range(world)), "every source chunk is handed to unpack exactly once"


def _layout(rank, world, uly, cfg):
    dims = ParallelDims(ulysses_degree=uly, cfg_degree=cfg)
    sp = dist.get_process_group_ranks(dims.sp_group) if dims.sp_group else [rank]
    cf = dist.get_process_group_ranks(dims.cfg_group) if dims.cfg_group else [rank]
    return dims.sp_rank, dims.cfg_rank, sp, cf


@pytest.mark.parametrize("uly, cfg", [(2, 2), (4, 1), (1, 2)])
def test_ulysses_ranks_are_contiguous(uly, cfg):
    results = run_on_ranks(_layout, uly * cfg, uly, cfg)
    for rank, (sp_rank, cfg_rank, sp, cf) in enumerate(results):
        assert sp == list(range(cfg_rank * uly, (cfg_rank + 1) * uly)) if uly > 1 else sp == [rank]
        assert sp_rank == rank % uly and cfg_rank == rank // uly
        assert cf == [c * uly + sp_rank for c in range(cfg)] if cfg > 1 else cf == [rank]


def _bad_layout(rank, world):
    try:
        ParallelDims(ulysses_degree=2, cfg_degree=2)
    except ValueError as err:
        return str(err)


def test_bad_layout_message():
    for msg in run_on_ranks(_bad_layout, 3):
        assert "2 x 2 = 4 but the world size is 3" in msg and "cfg_degree=1 x ulysses_degree=3" in msg


def _fails_on_rank_one(rank, world):
    if rank == 1:
        raise RuntimeError("boom on purpose")
    dist.barrier()  # rank 0 would wait forever for rank 1: the harness must not
    return rank


def test_harness_reports_a_failing_rank_instead_of_hanging():
    with pytest.raises(RuntimeError, match="rank 1 of 2 failed"):
        run_on_ranks(_fails_on_rank_one, 2, timeout=20)
