"""Timeouts: every process group honours comm.timeout_s, and a rank-0-only stage is waited for
with a heartbeat (a slow but alive rank 0 is fine, a silent one fails the others in time).

2 gloo ranks on CPU; the world group's timeout is 30 s (run_on_ranks), so a failure after ~2 s
can only come from the timeout under test (before the fix the groups kept torch's 30 minutes).
"""
import time

import torch
import torch.distributed as dist

from lightx2v_sp.distributed import ParallelDims
from lightx2v_sp.testing import run_on_ranks


def _groups_time_out(rank, world):
    uly = ParallelDims(2, 1, timeout_s=2)   # the Ulysses group is both ranks
    cfg = ParallelDims(1, 2, timeout_s=2)   # the CFG group is both ranks
    if rank == 1:  # a peer that does not show up for longer than the groups' timeout
        time.sleep(6)
        return None
    results = []
    for group in (uly.sp_group, cfg.cfg_group):
        start = time.monotonic()
        try:
            out = torch.empty(4)
            # [4] on each rank -> all_to_all_single -> [4] (2 elements from each rank)
            dist.all_to_all_single(out, torch.ones(4), group=group)
            results.append((time.monotonic() - start, "no error"))
        except RuntimeError as e:
            results.append((time.monotonic() - start, str(e)))
    return results


def test_ulysses_and_cfg_groups_get_the_timeout():
    results, _ = run_on_ranks(_groups_time_out, 2, timeout=30)
    for elapsed, message in results:
        assert "Timed out" in message and 1.5 < elapsed < 3.5, (elapsed, message)


def _rank0_stages(rank, world):
    from lightx2v_sp.pipeline import AgreedError
    from lightx2v_sp.pipeline import rank0_stage as mod

    def work(error=False):
        time.sleep(3)  # longer than the 1 s timeout
        if error:
            raise ValueError("the decoded video has NaN values")
        return 7

    def attempt(*args):
        start = time.monotonic()
        try:
            value = mod.rank0_stage("decoding", lambda: work(*args), timeout_s=1)
        except (AgreedError, RuntimeError) as e:
            return type(e).__name__, str(e), time.monotonic() - start
        return value, None, time.monotonic() - start

    out = {"slow": attempt()}
    total = torch.ones(1)
    dist.all_reduce(total)  # [1] per rank -> all_reduce -> [1]: still in step after the stage
    out["in_step"] = int(total.item())
    out["error"] = attempt(True)
    if rank == 0:
        mod.heartbeat_interval = lambda timeout_s: 3600.0  # alive, heartbeat frozen as under SIGSTOP
    out["silent"] = attempt()
    return out


def test_rank0_stage_waits_for_rank0_as_long_as_it_is_alive():
    r0, r1 = run_on_ranks(_rank0_stages, 2, timeout=30)
    # a slow rank 0 (3 s) outlives the 1 s timeout: both ranks succeed and stay in step
    assert r0["slow"][:2] == (7, None) and r1["slow"][:2] == (None, None) and r1["slow"][2] >= 3
    assert r0["in_step"] == r1["in_step"] == 2
    # rank 0's error reaches every rank as the same AgreedError
    assert r0["error"][:2] == r1["error"][:2] == ("AgreedError", "the decoded video has NaN values")
    # no heartbeat for the timeout: the waiting rank gives up in time; rank 0 itself finished
    kind, message, elapsed = r1["silent"]
    assert kind == "PeerLostError" and "no heartbeat" in message and "comm.timeout_s=1" in message
    assert 1 <= elapsed < 2.5 and r0["silent"][0] == 7, (elapsed, r0["silent"])
