"""The job loop: every rank runs the same jobs, one at a time, on models loaded once.

Rank 0 takes each job from its source (the server's queue, or a prompt file), posts it to the
other ranks (channel.py) and every rank runs the same `run_job` stages. A job that fails on every
rank together (an `AgreedError`: its checks, NaN latents, a bad image, a cancel) fails alone and
the loop goes on; so does any failure of a one-process job. A failure on some ranks only, or a
lost peer, leaves the ranks out of step: it ends the loop (the caller reports it and exits).

Cancelling is agreed too: after each denoising step every rank contributes its wish (0 go on,
1 cancel this job: rank 0, on a DELETE; 2 stop the server: any rank told to terminate) to one
all_reduce(max) of one integer, so all ranks stop at the same step. That is one tiny collective
per step, next to a DiT step's two all_to_alls per layer.
"""
from __future__ import annotations

import contextlib
import logging
import time
import traceback
from dataclasses import dataclass
from typing import Callable, Optional, Protocol

import torch
import torch.distributed as dist

from lightx2v_sp.distributed.comm_stats import record_comm
from lightx2v_sp.distributed.groups import job_size_rank
from lightx2v_sp.distributed.peer_lost import is_peer_lost
from lightx2v_sp.pipeline.checks import AgreedError, agreed
from lightx2v_sp.pipeline.job import JobCancelled, check_job
from lightx2v_sp.pipeline.runner import Loaded, RunResult, Stages, run_job

from .channel import STOP, Channel

log = logging.getLogger("lightx2v_sp")

GO_ON, CANCEL, STOP_SERVER = 0, 1, 2
WHY = {CANCEL: "cancelled on request", STOP_SERVER: "cancelled: the server is stopping"}


@dataclass
class Job:
    id: str
    cfg: object                 # the job's checked RunConfig (pipeline/job.py)
    label: str                  # how messages name it: a job id, or "prompts.txt line 3"


class Reporter(Protocol):
    """Rank 0's view of its jobs (the server's board, the prompt file's report)."""

    def started(self, job: Job) -> None: ...
    def step(self, job: Job, step: int, num_steps: int) -> None: ...
    def wants_cancel(self, job: Job) -> bool: ...
    def finished(self, job: Job, result: Optional[RunResult], error: Optional[AgreedError]) -> None: ...


class JobLoop:
    def __init__(self, loaded: Loaded, progress: bool = False):
        self.loaded = loaded
        self.world, self.rank = job_size_rank()
        self.channel = Channel(self.world, self.rank, loaded.cfg.comm.timeout_s)
        self.progress = progress
        self.terminating: Optional[str] = None   # set (by a signal handler) when this rank must go
        self.stopping: Optional[str] = None      # the loop ends after this job: why

    def _wish(self, job: Job, reporter: Optional[Reporter]) -> int:
        if self.terminating:
            return STOP_SERVER
        return CANCEL if reporter is not None and reporter.wants_cancel(job) else GO_ON

    def _agree(self, wish: int) -> int:
        if self.world == 1:
            return wish
        flag = torch.tensor([wish], dtype=torch.int32, device=self.loaded.device)
        # [1] int32 per rank -> all_reduce(max) -> [1]: the strongest wish of any rank
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        record_comm("all_reduce", 4)
        return int(flag.item())

    def run_one(self, job: Job, reporter: Optional[Reporter] = None) -> tuple[Optional[RunResult], Optional[AgreedError]]:
        """Run `job` on this rank; (result, None) or (None, the error every rank shares)."""
        stages, started = Stages(self.loaded.device), time.perf_counter()

        def on_step(step: int, num_steps: int) -> None:
            if reporter is not None:
                reporter.step(job, step, num_steps)
            wish = self._agree(self._wish(job, reporter))
            if wish == STOP_SERVER:
                self.stopping = WHY[wish]
            if wish != GO_ON:
                raise JobCancelled(f"{job.label}: {WHY[wish]} after denoising step {step} of {num_steps}; "
                                   "no video was written")

        try:
            out = agreed(f"checking {job.label}", lambda: check_job(self.loaded.cfg, self.loaded.kind, job.cfg))
            result = run_job(self.loaded, job.cfg, stages, started, out, progress=self.progress and self.rank == 0,
                             on_step=on_step)
            return result, None
        except AgreedError as e:  # every rank has it: this job failed, the next one can run
            return None, e
        except Exception as e:
            if self.world > 1 or is_peer_lost(e):  # ranks may be out of step: nothing more can run
                raise
            traceback.print_exc()
            return None, AgreedError(f"{job.label} failed: {type(e).__name__}: {e}", internal=True)

    def _check_peers(self) -> None:
        leaving = self.channel.check_peers()
        if leaving:
            self.stopping = leaving

    def lead(self, next_job: Callable[[Callable[[], None]], Optional[Job]], reporter: Reporter) -> None:
        """Rank 0: run jobs from `next_job(check)` until it returns None. `check` is to be called while it
        waits: it raises PeerLostError when another rank is lost, and sets `stopping` when one must go."""
        try:
            while self.stopping is None:
                job = next_job(self._check_peers)
                if job is None:
                    break
                self.channel.post(job)
                reporter.started(job)
                result, error = self.run_one(job, reporter)
                reporter.finished(job, result, error)
        finally:
            with contextlib.suppress(Exception):  # the store is gone with a lost rank: nobody to tell
                self.channel.post(STOP)
            self.channel.close()

    def follow(self) -> None:
        """Ranks > 0: run what rank 0 posts until it says stop."""
        try:
            while True:
                message = self.channel.receive(leaving=lambda: self.terminating)
                if message == STOP:
                    return
                self.run_one(message)
        finally:
            self.channel.close()
