"""Rank 0's jobs: their records, the bounded queue, and the state of the server (thread-safe).

The HTTP thread submits, lists, cancels and deletes; the main thread (the job loop) takes the next
job and reports its progress and outcome through the `Reporter` methods. One lock guards it all.
Statuses are OpenAI's: queued -> in_progress -> completed | failed; a cancelled job is failed with
error code "cancelled". Only `queue_size` jobs wait (the running one aside): `submit` refuses more
with `QueueFull`, and every job while the server is loading or stopping with `NotAccepting`.
"""
from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Callable, Optional

from lightx2v_sp.pipeline.checks import AgreedError
from lightx2v_sp.pipeline.job import JobCancelled
from lightx2v_sp.pipeline.output import summary_path
from lightx2v_sp.pipeline.runner import RunResult

from .loop import Job

log = logging.getLogger("lightx2v_sp")

WAIT_S = 0.2   # the loop looks at the stop flag and the other ranks this often while idle


class QueueFull(Exception):
    pass


class NotAccepting(Exception):
    pass


@dataclass
class Record:
    job: Job
    request: dict                         # what the client asked for, as the API shows it
    upload: Optional[str] = None          # the uploaded image (the server's own file), removed at the end
    status: str = "queued"
    created_at: float = field(default_factory=time.time)
    started_at: Optional[float] = None
    first_step_at: Optional[float] = None
    completed_at: Optional[float] = None
    step: int = 0
    steps: int = 0
    cancel: bool = False
    error: Optional[dict] = None
    summary: Optional[dict] = None

    def public(self, model: str) -> dict:
        s = self.job.cfg.sample
        progress = 100 if self.status == "completed" else (100 * self.step // self.steps if self.steps else 0)
        timings = {}  # seconds: queued (submitted -> taken), to the first step and total from submission
        if self.started_at is not None:
            timings["queued_s"] = round(self.started_at - self.created_at, 3)
            if self.first_step_at is not None:
                timings["to_first_step_s"] = round(self.first_step_at - self.created_at, 3)
            if self.completed_at is not None:
                timings["run_s"] = round(self.completed_at - self.started_at, 3)
                timings["total_s"] = round(self.completed_at - self.created_at, 3)
        if self.summary is not None:
            timings["stage_times_s"] = self.summary.get("stage_times_s")
        return {"id": self.job.id, "object": "video", "model": model, "status": self.status, "progress": progress,
                "step": self.step, "steps": self.steps or s.steps, "created_at": int(self.created_at),
                "started_at": None if self.started_at is None else int(self.started_at),
                "completed_at": None if self.completed_at is None else int(self.completed_at),
                "size": f"{s.width}x{s.height}", "num_frames": s.num_frames, "fps": s.fps,
                "seconds": f"{(s.num_frames - 1) / s.fps:g}", **self.request,
                "timings": timings, "error": self.error}


class JobBoard:
    def __init__(self, queue_size: int, keep_jobs: int, model: str = ""):
        self.queue_size, self.keep_jobs, self.model = queue_size, keep_jobs, model
        self._cond = threading.Condition()
        self._records: OrderedDict[str, Record] = OrderedDict()
        self._queue: deque[Record] = deque()
        self.running: Optional[Record] = None
        self.state, self.reason = "loading", "the models are loading"
        self.counts = {"completed": 0, "failed": 0, "cancelled": 0}

    # --- the HTTP side
    def submit(self, record: Record) -> dict:
        with self._cond:
            if self.state != "ready":
                raise NotAccepting(self.reason)
            if len(self._queue) >= self.queue_size:
                raise QueueFull(f"{len(self._queue)} jobs are waiting, serve.queue_size = {self.queue_size}; "
                                "try again when one has finished")
            self._records[record.job.id] = record
            self._queue.append(record)
            self._cond.notify_all()
            return record.public(self.model)

    def get(self, job_id: str) -> Optional[dict]:
        with self._cond:
            record = self._records.get(job_id)
            return None if record is None else record.public(self.model)

    def record(self, job_id: str) -> Optional[Record]:
        with self._cond:
            return self._records.get(job_id)

    def list(self) -> list[dict]:
        with self._cond:
            return [r.public(self.model) for r in reversed(self._records.values())]

    def health(self) -> dict:
        with self._cond:
            return {"status": self.state, "reason": self.reason if self.state != "ready" else None,
                    "model": self.model, "queued": len(self._queue), "queue_size": self.queue_size,
                    "running": None if self.running is None else self.running.job.id, "jobs": dict(self.counts)}

    def cancel(self, job_id: str) -> Optional[dict]:
        """Queued: failed at once. Running: asked to stop at its next step. Finished: forgotten and its
        files removed. None if there is no such job."""
        with self._cond:
            record = self._records.get(job_id)
            if record is None:
                return None
            if record.status == "queued":
                self._queue.remove(record)
                self._end(record, "failed", {"code": "cancelled", "message": f"{job_id} was cancelled before it "
                                                                             "started"})
            elif record.status == "in_progress":
                record.cancel = True
            else:
                del self._records[job_id]
                for path in (record.job.cfg.output.path, summary_path(record.job.cfg.output.path)):
                    with contextlib.suppress(FileNotFoundError):
                        os.remove(path)
                return {"id": job_id, "object": "video.deleted", "deleted": True}
            return record.public(self.model)

    # --- the job loop's side
    def ready(self, model: str) -> None:
        with self._cond:
            self.model, self.state, self.reason = model, "ready", ""

    def close(self, state: str, reason: str) -> None:
        """No new jobs; the queued ones fail with `reason`."""
        with self._cond:
            self.state, self.reason = state, reason
            while self._queue:
                self._end(self._queue.popleft(), "failed", {"code": "server_stopped", "message": reason})

    def next_job(self, check: Callable[[], None], stopping: Callable[[], Optional[str]]) -> Optional[Job]:
        """The next queued job (waits); None once `stopping()` gives a reason. `check()` runs meanwhile."""
        while True:
            with self._cond:
                reason = stopping()
                if reason:
                    return None
                if self._queue:
                    record = self._queue.popleft()
                    record.status, record.started_at = "in_progress", time.time()
                    self.running = record
                    return record.job
                self._cond.wait(WAIT_S)
            check()

    def started(self, job: Job) -> None:
        pass  # marked in next_job, under the lock that took it off the queue

    def step(self, job: Job, step: int, num_steps: int) -> None:
        with self._cond:
            record = self._records.get(job.id)
            if record is not None:
                record.step, record.steps = step, num_steps
                if step == 1:
                    record.first_step_at = time.time()

    def wants_cancel(self, job: Job) -> bool:
        with self._cond:
            record = self._records.get(job.id)
            return record is not None and record.cancel

    def finished(self, job: Job, result: Optional[RunResult], error: Optional[AgreedError]) -> None:
        with self._cond:
            record = self.running
            self.running = None
            if record is None or record.job.id != job.id:
                return
            if error is None:
                record.summary = result.summary
                self._end(record, "completed", None)
                log.info("%s completed in %.2fs", job.id, record.completed_at - record.started_at)
            else:
                code = "cancelled" if isinstance(error, JobCancelled) else "job_failed"
                self._end(record, "failed", {"code": code, "message": str(error)})
                log.info("%s failed: %s", job.id, error)

    def _end(self, record: Record, status: str, error: Optional[dict]) -> None:
        record.status, record.error, record.completed_at = status, error, time.time()
        self.counts["completed" if error is None else "cancelled" if error["code"] == "cancelled" else "failed"] += 1
        if record.upload is not None:
            with contextlib.suppress(FileNotFoundError):
                os.remove(record.upload)
        finished = sorted((r for r in self._records.values() if r.status in ("completed", "failed")),
                          key=lambda r: r.completed_at)
        for old in finished[:max(0, len(finished) - self.keep_jobs)]:
            del self._records[old.job.id]
