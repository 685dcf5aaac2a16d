"""`python -m lightx2v_sp.serve --config X.yaml [key=value ...]`: load once, make videos on request.

    python -m lightx2v_sp.serve --config configs/wan_t2v_tiny.yaml serve.port=8000
    torchrun --nproc_per_node 2 -m lightx2v_sp.serve --config configs/wan_t2v_tiny.yaml

Every rank loads the models (pipeline/runner.py `load_models`) and runs the job loop (loop.py);
rank 0 also binds the port (before loading, so a taken port fails in seconds) and serves HTTP
(app.py, uvicorn in a thread) while its main thread runs the jobs. Errors are reported as
`generate` reports them (one line, the exit status). SIGTERM or SIGINT on any rank stops the
server: no new jobs, queued ones fail, the running one stops at its next denoising step (a job
already decoding finishes its file; files are written whole or not at all), and it exits 0. A
second signal ends the process at once.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import signal
import socket
import sys
import tempfile
import threading

from lightx2v_sp.generate import EXIT_USER_ERROR, _default_config, _env_rank, _fail, _setup_logging, run_reporting

log = logging.getLogger("lightx2v_sp")


def _parser() -> argparse.ArgumentParser:
    from lightx2v_sp.generate import _Parser

    p = _Parser(prog="python -m lightx2v_sp.serve",
                description="Load a Wan model once and make videos over HTTP (OpenAI-style /v1/videos, a page at /).")
    p.add_argument("--config", default=None, help="YAML config (default: configs/wan_t2v_tiny.yaml)")
    p.add_argument("--help-config", action="store_true", help="list every config key (serve.* included) and exit")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. serve.port=8080")
    return p


def bind(serve_cfg) -> socket.socket:
    """The listening socket of serve.host:serve.port (ValueError if it cannot be had)."""
    try:
        infos = socket.getaddrinfo(serve_cfg.host, serve_cfg.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, _, _, _, address = infos[0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
    except OSError as e:
        raise ValueError(f"serve.host:serve.port = {serve_cfg.host}:{serve_cfg.port} cannot be bound "
                         f"({e.strerror or e}); choose another serve.port (0 = any free one)") from None
    return sock


def _check_output_dir(path: str) -> str:
    path = os.path.abspath(os.path.expanduser(path))
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
            pass
    except OSError as e:
        raise ValueError(f"serve.output_dir = {path} is not a writable directory ({e.strerror or e})") from None
    return path


class _Http:
    """uvicorn in a daemon thread (it leaves signals to the main thread when not in it)."""

    def __init__(self, app, sock: socket.socket):
        import uvicorn

        config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off",
                                timeout_graceful_shutdown=5, limit_concurrency=64)  # beyond: 503
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True,
                                       name="lightx2v_sp-http")
        self.thread.start()

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def _graceful(loop) -> dict:
    """SIGTERM / SIGINT set `loop.terminating` (the loop stops at a safe point); a second one acts at once."""
    defaults = {signal.SIGTERM: signal.SIG_DFL, signal.SIGINT: signal.default_int_handler}

    def handler(signum, frame):
        loop.terminating = signal.Signals(signum).name
        signal.signal(signum, defaults[signum])

    return {s: signal.signal(s, handler) for s in defaults}


def serve(cfg, device) -> int:
    """Every rank: bind (rank 0), load, then run jobs until stopped."""
    from lightx2v_sp.distributed.groups import job_size_rank
    from lightx2v_sp.pipeline.checks import agreed
    from lightx2v_sp.pipeline.runner import Stages, load_models

    from .app import ServeInfo, create_app
    from .board import JobBoard
    from .loop import JobLoop

    world, rank = job_size_rank()

    def prepare():
        if rank != 0:
            return None
        out_dir = _check_output_dir(cfg.serve.output_dir)
        return bind(cfg.serve), out_dir

    bound = agreed("binding the HTTP port", prepare)
    http = board = None
    if rank == 0:
        sock, out_dir = bound
        env = cfg.serve.api_key_env
        key = os.environ.get(env) if env else None
        base = dataclasses.replace(cfg, image=None)  # a job's image is its own upload or none
        info = ServeInfo(base=base, output_dir=out_dir, api_key=key or None)
        board = JobBoard(cfg.serve.queue_size, cfg.serve.keep_jobs)
        http = _Http(create_app(board, info), sock)
        host, port = sock.getsockname()[:2]
        url = f"http://{'[' + host + ']' if ':' in host else host}:{port}/"
        log.info("serving %s (loading the models; the page and /health answer meanwhile)", url)
        if not info.api_key:
            log.info("no API key: %s", f"${env} is not set" if env else "serve.api_key_env is null")
            if host not in ("127.0.0.1", "::1", "localhost"):
                log.warning("warning: %s is reachable from the network and takes requests without an API key", url)
    try:
        loaded = load_models(cfg, device, Stages(device), keep=True, prompt_cache=cfg.serve.prompt_cache)
        loop = JobLoop(loaded)
        previous = _graceful(loop)
        try:
            if rank != 0:
                loop.follow()
                return 0
            info.kind = loaded.kind
            board.ready(loaded.kind.name)
            log.info("ready: %s on %d rank(s), videos in %s, page at %s", loaded.kind.name, world, out_dir, url)
            loop.lead(lambda check: board.next_job(check, lambda: loop.terminating or loop.stopping), board)
        finally:
            for s, h in previous.items():
                signal.signal(s, h)
        counts = board.health()["jobs"]
        log.info("stopped (%s): %d completed, %d failed, %d cancelled", loop.terminating or loop.stopping,
                 counts["completed"], counts["failed"], counts["cancelled"])
        return 0
    finally:
        if board is not None:
            board.close("stopping", "the server is stopping")
        if http is not None:
            http.stop()


def main(argv=None) -> int:
    rank = _env_rank()
    _setup_logging(rank)
    args = _parser().parse_args(argv)
    from lightx2v_sp.config import describe, load_config
    from lightx2v_sp.distributed import resolve_device

    try:
        cfg = load_config(args.config or _default_config(), args.overrides)
        if args.help_config:
            if rank == 0:
                print(describe(cfg))
            return 0
        device = resolve_device(cfg.device)
    except ValueError as e:
        return _fail(f"error: {e}", EXIT_USER_ERROR, hard=False) if rank == 0 else EXIT_USER_ERROR
    return run_reporting(cfg, device, lambda: serve(cfg, device))


if __name__ == "__main__":
    sys.exit(main())
