"""SIGTERM (and SIGINT) end a run like an error: temporary files removed, non-zero exit, one line.

Python turns SIGINT into KeyboardInterrupt but lets SIGTERM (what torchrun, schedulers and `kill`
send) end the process on the spot, skipping the `finally` blocks that remove the temporary mp4.
While a run is in progress SIGTERM raises `Terminated` in the main thread instead, at the next
bytecode; it is a BaseException so no `except Exception` in the pipeline swallows it.
"""
from __future__ import annotations

import contextlib
import signal


class Terminated(BaseException):
    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise(signum, frame):
    raise Terminated(signum)


@contextlib.contextmanager
def terminate_raises():
    """Inside: SIGTERM raises `Terminated`; outside: the previous handler (default: die at once)."""
    previous = signal.signal(signal.SIGTERM, _raise)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
