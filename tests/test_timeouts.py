"""Timeouts: every process group honours comm.timeout_s, and a rank-0-only stage is waited for
with a heartbeat (a slow but alive rank 0 is fine, a silent one fails the others in time).

Each case runs 2 gloo ranks on CPU; the world group's timeout is 30 s (run_on_ranks), so a
failure after ~2 s can only come from the timeout under test.
"""
import time

import pytest
import torch
import torch.distributed as dist

from lightx2v_sp.distributed import ParallelDims
from lightx2v_sp.testing import run_on_ranks


def _group_times_out(rank, world, ulysses, cfg):
    dims = ParallelDims(ulysses, cfg, timeout_s=2)
    group = dims.sp_group if ulysses > 1 else dims.cfg_group
    if rank == 1:  # a peer that does not show up for longer than the group's timeout
        time.sleep(6)
        return None
    start = time.monotonic()
    try:
        out = torch.empty(4)
        # [4] on each rank -> all_to_all_single -> [4] (2 elements from each rank)
        dist.all_to_all_single(out, torch.ones(4), group=group)
    except RuntimeError as e:
        return time.monotonic() - start, str(e)
    return time.monotonic() - start, "no error"


@pytest.mark.parametrize("ulysses, cfg", [(2, 1), (1, 2)], ids=["ulysses_group", "cfg_group"])
def test_groups_get_the_timeout(ulysses, cfg):
    (elapsed, message), _ = run_on_ranks(_group_times_out, 2, ulysses, cfg, timeout=30)
    assert "Timed out" in message and 1.5 < elapsed < 5, (elapsed, message)


def _rank0_stage(rank, world, mode):
    from lightx2v_sp.pipeline import AgreedError
    from lightx2v_sp.pipeline import rank0_stage as mod

    if mode == "silent" and rank == 0:
        mod.HEARTBEAT_S = 3600.0  # rank 0 alive but its heartbeat frozen, as under SIGSTOP

    def work():
        time.sleep(4)  # longer than the 1.5 s timeout
        if mode == "error":
            raise ValueError("the decoded video has NaN values")
        return 7

    start = time.monotonic()
    try:
        value = mod.rank0_stage("decoding", work, timeout_s=1.5)
    except (AgreedError, RuntimeError) as e:
        return type(e).__name__, str(e), time.monotonic() - start
    if mode == "silent":  # rank 1 has given up on rank 0
        return value, None, time.monotonic() - start
    # [1] per rank -> all_reduce -> [1]: the ranks are still in step after the stage
    total = torch.ones(1)
    dist.all_reduce(total)
    return value, int(total.item()), time.monotonic() - start


def test_rank0_stage_outlives_the_timeout():
    (v0, n0, t0), (v1, n1, t1) = run_on_ranks(_rank0_stage, 2, "ok", timeout=30)
    assert (v0, v1, n0, n1) == (7, None, 2, 2)
    assert t0 >= 4 and t1 >= 4


def test_rank0_stage_error_reaches_every_rank():
    for kind, message, elapsed in run_on_ranks(_rank0_stage, 2, "error", timeout=30):
        assert kind == "AgreedError" and message == "the decoded video has NaN values"


def test_rank0_stage_silent_rank0_fails_the_others_in_time():
    r0, (kind, message, elapsed) = run_on_ranks(_rank0_stage, 2, "silent", timeout=30)
    assert r0[0] == 7  # rank 0 itself finished its work
    assert kind == "PeerLostError" and "no heartbeat" in message and "comm.timeout_s=1.5" in message
    assert 1.5 <= elapsed < 3.5, elapsed
