"""Fault injection: one rank of a 2-rank torchrun job is stopped (SIGSTOP) mid-denoise.

The other rank's next collective times out after comm.timeout_s (every process group carries it)
and reports one line; torchrun then ends the job: SIGTERM to the stopped rank, which cannot act on
it, and SIGKILL after torchrun's 30 s grace. So the job ends within timeout + 30 s + a margin,
non-zero, with no video and no temporary file.
"""
import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest

from lightx2v_sp.models import tiny
from lightx2v_sp.testing import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "wan_t2v_tiny.yaml")
TIMEOUT_S = 10
TORCHRUN_GRACE_S = 30  # torchrun waits this long after its SIGTERM before it SIGKILLs a worker


def _worker_pids(torchrun_pid: int) -> dict[int, int]:
    """{RANK: pid} of torchrun's worker processes."""
    out = {}
    for pid in open(f"/proc/{torchrun_pid}/task/{torchrun_pid}/children").read().split():
        with open(f"/proc/{pid}/environ", "rb") as f:
            for var in f.read().split(b"\0"):
                if var.startswith(b"RANK="):
                    out[int(var[5:])] = int(pid)
    return out


@pytest.mark.skipif(not os.path.exists("/proc/self/task"), reason="finds torchrun's workers through /proc")
def test_stopped_rank_ends_the_job(tmp_path):
    cache = str(tmp_path / "cache")
    tiny.ensure_tiny_model(cache)
    out = tmp_path / "out" / "v.mp4"
    env = dict(os.environ, LIGHTX2V_SP_CACHE=cache, OMP_NUM_THREADS="1",
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           "-m", "lightx2v_sp.generate", "--config", CONFIG, "sample.steps=1000", f"comm.timeout_s={TIMEOUT_S}",
           f"output.path={out}"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    chunks: list[str] = []
    reader = threading.Thread(target=lambda: [chunks.append(c.decode(errors="replace"))
                                              for c in iter(lambda: proc.stderr.read1(4096), b"")], daemon=True)
    reader.start()
    workers: dict[int, int] = {}
    try:
        deadline = time.monotonic() + 120
        # mid-denoise: rank 0's progress bar has counted at least 10 of the 1000 steps
        while not re.search(r"denoise:[^\r\n]*\| *[1-9]\d+/1000", "".join(chunks)):
            assert time.monotonic() < deadline and proc.poll() is None, "".join(chunks)[-3000:]
            time.sleep(0.2)
        workers = _worker_pids(proc.pid)
        assert sorted(workers) == [0, 1]
        os.kill(workers[1], signal.SIGSTOP)
        stopped = time.monotonic()
        while "error:" not in "".join(chunks) and time.monotonic() - stopped < TIMEOUT_S + 20:
            time.sleep(0.2)
        reported = time.monotonic() - stopped
        rc = proc.wait(timeout=TIMEOUT_S + TORCHRUN_GRACE_S + 30)
        ended = time.monotonic() - stopped
    finally:
        for pid in workers.values():  # a stopped process ignores everything but SIGKILL
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.kill()
        proc.wait()
        reader.join(timeout=5)
    stderr = "".join(chunks)
    assert rc != 0
    lines = [line for line in stderr.splitlines() if "error:" in line]
    assert lines and lines[0].startswith("[rank 0] error: lost a peer rank") and "comm.timeout_s=10" in lines[0], \
        stderr[-3000:]
    assert TIMEOUT_S - 1 <= reported <= TIMEOUT_S + 15, reported  # the group timeout, not 30 minutes
    assert ended <= TIMEOUT_S + TORCHRUN_GRACE_S + 20, ended
    assert not out.parent.exists() or os.listdir(out.parent) == [], os.listdir(out.parent)
