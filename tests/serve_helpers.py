"""The server tests' harness: a server process (one process or torchrun) and a small HTTP client.

A server is started as a process with serve.port=0 (the system picks a free port; the server prints
its URL) and is always stopped by its pid: SIGTERM, then a check that it exited (SIGKILL by pid,
its own and its ranks', only if it did not). The client is urllib: no extra test dependency.
"""
from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "wan_t2v_tiny.yaml")
KEY = "test-key-0123456789"


def env_for(cache: str, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "LIGHTX2V_SP_API_KEY"}
    env.update(LIGHTX2V_SP_CACHE=cache, OMP_NUM_THREADS="1",
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), **extra)
    return env


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        return []


class Server:
    def __init__(self, log_path: str, overrides: list[str], env: dict, nproc: int = 1, config: str = CONFIG):
        from lightx2v_sp.testing import free_port

        launcher = [sys.executable, "-m", "lightx2v_sp.serve"] if nproc == 1 else [
            sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
            str(free_port()), "-m", "lightx2v_sp.serve"]
        self.log_path = log_path
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen([*launcher, "--config", config, "serve.port=0", *overrides], cwd=ROOT, env=env,
                                     stdout=self.log, stderr=subprocess.STDOUT)
        self.ranks: list[int] = []
        self.url = None

    def text(self) -> str:
        with open(self.log_path) as f:
            return f.read()

    def wait_ready(self, timeout: float = 240) -> "Server":
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.text()
            m = re.search(r"serving (http://127\.0\.0\.1:\d+)/", text)
            if m and "ready:" in text:
                self.url = m.group(1)
                self.ranks = _children(self.proc.pid)
                return self
            if self.proc.poll() is not None:
                raise AssertionError(f"the server exited with {self.proc.returncode}:\n{text[-3000:]}")
            time.sleep(0.2)
        raise AssertionError(f"the server was not ready in {timeout:.0f}s:\n{self.text()[-3000:]}")

    def stop(self, timeout: float = 60) -> int:
        """SIGTERM by pid, then wait; SIGKILL (by pid: it and its ranks) only if it did not exit."""
        ranks = self.ranks or _children(self.proc.pid)
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            code = None
        for pid in ([self.proc.pid] if code is None else []) + ranks:
            try:
                os.kill(pid, 0)
            except OSError:
                continue
            os.kill(pid, signal.SIGKILL)
        if code is None:
            self.proc.wait(timeout=10)
        self.log.close()
        return code


def request(url: str, method: str = "GET", body=None, key: str | None = KEY, content_type: str | None = None,
            timeout: float = 30):
    """(status, parsed JSON or raw bytes, headers)."""
    headers = {}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    data = body
    if isinstance(body, dict):
        data, content_type = json.dumps(body).encode(), content_type or "application/json"
    if content_type:
        headers["Content-Type"] = content_type
    req = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            status, raw, hdrs = r.status, r.read(), dict(r.headers)
    except urllib.error.HTTPError as e:
        status, raw, hdrs = e.code, e.read(), dict(e.headers)
    if hdrs.get("content-type", hdrs.get("Content-Type", "")).startswith("application/json"):
        return status, json.loads(raw), hdrs
    return status, raw, hdrs


def multipart(fields: dict[str, str], files: dict[str, tuple[str, bytes]]) -> tuple[bytes, str]:
    """(body, content type) of a multipart/form-data request."""
    boundary = uuid.uuid4().hex
    out = io.BytesIO()
    for name, value in fields.items():
        out.write(f"--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n".encode())
        out.write(value.encode() + b"\r\n")
    for name, (filename, content) in files.items():
        out.write(f"--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"; filename=\"{filename}\"\r\n"
                  "Content-Type: application/octet-stream\r\n\r\n".encode())
        out.write(content + b"\r\n")
    out.write(f"--{boundary}--\r\n".encode())
    return out.getvalue(), f"multipart/form-data; boundary={boundary}"


def wait_for(url: str, job_id: str, statuses=("completed", "failed"), timeout: float = 120, step: int = 0,
             key: str | None = KEY) -> dict:
    """Poll the job until its status is one of `statuses` (and, for in_progress, it reached `step`)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status, job, _ = request(f"{url}/v1/videos/{job_id}", key=key)
        assert status == 200, job
        if job["status"] in statuses and job["step"] >= step:
            return job
        if job["status"] in ("completed", "failed") and job["status"] not in statuses:
            raise AssertionError(f"{job_id} ended {job['status']}: {job['error']}")
        time.sleep(0.05)
    raise AssertionError(f"{job_id} did not reach {statuses} in {timeout:.0f}s: {job}")


def png_bytes(width: int = 40, height: int = 24) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (width, height), (200, 40, 90)).save(buf, format="PNG")
    return buf.getvalue()
