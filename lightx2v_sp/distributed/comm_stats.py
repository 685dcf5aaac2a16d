"""Wire accounting: calls and bytes per collective kind.

Collectives call `record_comm(kind, num_bytes)`. With no `CommStats` recording, that is one
check of a module attribute and a return, so the hot path pays nothing measurable.
"""
from __future__ import annotations

from collections import defaultdict
from contextlib import contextmanager

_active: "CommStats | None" = None


def record_comm(kind: str, num_bytes: int) -> None:
    if _active is None:
        return
    _active.calls[kind] += 1
    _active.bytes[kind] += int(num_bytes)


class CommStats:
    """Counts collective calls and bytes sent by this rank, per kind (`all_to_all`, `sendrecv`, ...)."""

    def __init__(self) -> None:
        self.calls: dict[str, int] = defaultdict(int)
        self.bytes: dict[str, int] = defaultdict(int)

    @contextmanager
    def record(self):
        global _active
        previous, _active = _active, self
        try:
            yield self
        finally:
            _active = previous

    def reset(self) -> None:
        self.calls.clear()
        self.bytes.clear()

    @property
    def total_calls(self) -> int:
        return sum(self.calls.values())

    @property
    def total_bytes(self) -> int:
        return sum(self.bytes.values())

    def as_dict(self) -> dict:
        return {"calls": dict(self.calls), "bytes": dict(self.bytes),
                "total_calls": self.total_calls, "total_bytes": self.total_bytes}
