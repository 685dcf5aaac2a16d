"""A CPU transport that records the offload schedule, and a checker for its ordering rules.

`RecordingTransport` behaves like a copy stream that lags as far behind as CUDA allows: a
copy is only carried out when the compute waits for its event (or a later one). A schedule
that forgets a wait therefore computes on poisoned buffers and gives wrong numbers, instead
of passing by luck because CPU copies are instantaneous. Every operation is logged;
`check_schedule` verifies the ordering rules of block offload on that log.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
from torch import nn

from .transport import Transport

POISON = 0xFF  # all-ones bytes: NaN in every float dtype, so unwritten buffers are noticed


class RecordingTransport(Transport):
    def __init__(self, deferred: bool = True) -> None:
        self.device = torch.device("cpu")
        self.deferred = deferred
        self.log: list[tuple] = []
        self.device_buffers: list[torch.Tensor] = []
        self._pending: list[tuple[int, torch.Tensor, torch.Tensor]] = []
        self._events = 0

    def _event(self) -> int:
        self._events += 1
        return self._events

    def host_empty(self, nbytes: int) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8)

    def device_empty(self, nbytes: int) -> torch.Tensor:
        buf = torch.full((nbytes,), POISON, dtype=torch.uint8)
        self.device_buffers.append(buf)
        self.log.append(("alloc", len(self.device_buffers) - 1, nbytes))
        return buf

    def copy_async(self, dst: torch.Tensor, src: torch.Tensor, after: Optional[int] = None) -> int:
        event = self._event()
        self.log.append(("copy", event, dst.data_ptr(), src.data_ptr(), after))
        self._pending.append((event, dst, src))
        if not self.deferred:
            self._run_until(event)
        return event

    def _run_until(self, event: int) -> None:
        while self._pending and self._pending[0][0] <= event:  # the copy stream is in order
            _, dst, src = self._pending.pop(0)
            dst.copy_(src)

    def wait(self, event: int) -> None:
        self.log.append(("wait", event))
        self._run_until(event)

    def record(self) -> int:
        event = self._event()
        self.log.append(("record", event))
        return event

    def synchronize(self) -> None:
        self._run_until(self._events)

    def watch(self, blocks: nn.ModuleList) -> None:
        """Log ("compute", i, ptr) when block i starts, with the address its first tensor is bound to.

        Call after `enable_block_offload`: hooks run in registration order, so this one sees the
        binding done by the offload pre-hook.
        """
        def note(i, module, args):
            first = next(iter(list(module.parameters()) + list(module.buffers())))
            self.log.append(("compute", i, first.data_ptr()))
        for i, block in enumerate(blocks):
            block.register_forward_pre_hook(functools.partial(note, i))


def check_schedule(transport: RecordingTransport, host_ptrs: list[int]) -> list[int]:
    """Assert the block-offload ordering rules on `transport.log`; return the copied block order.

    host_ptrs[i] is the data_ptr of block i's host copy. Rules:
      1. at most two device buffers exist;
      2. block i computes from a buffer whose last copy was block i's, and the compute waited
         for that copy's event after it was issued;
      3. a copy into a buffer is ordered (`after`) behind an event recorded after the last
         compute that read that buffer;
      4. block i+1's copy is issued before block i computes (prefetch).
    """
    log = transport.log
    assert len(transport.device_buffers) <= 2, f"{len(transport.device_buffers)} device buffers"
    spans = [(b.data_ptr(), b.data_ptr() + b.numel()) for b in transport.device_buffers]
    block_of = {ptr: i for i, ptr in enumerate(host_ptrs)}

    def slot_of(ptr):
        found = [s for s, (lo, hi) in enumerate(spans) if lo <= ptr < hi]
        assert found, f"address {ptr:#x} is in no device buffer"
        return found[0]

    last_copy: dict[int, tuple[int, int, int]] = {}     # slot -> (position, event, block)
    last_compute: dict[int, int] = {}                   # slot -> position
    recorded_at: dict[int, int] = {}                    # event -> position
    waited: dict[int, int] = {}                         # event -> last position waited
    copied, computed = [], []
    for pos, entry in enumerate(log):
        kind = entry[0]
        if kind == "record":
            recorded_at[entry[1]] = pos
        elif kind == "wait":
            waited[entry[1]] = pos
        elif kind == "copy":
            _, event, dst, src, after = entry
            slot, block = slot_of(dst), block_of[src]
            if slot in last_compute:
                assert after is not None and recorded_at.get(after, -1) > last_compute[slot], (
                    f"copy of block {block} into buffer {slot} (log {pos}) is not ordered after the "
                    f"compute at log {last_compute[slot]} that read it")
            last_copy[slot] = (pos, event, block)
            copied.append(block)
        elif kind == "compute":
            _, block, ptr = entry
            slot = slot_of(ptr)
            assert slot in last_copy and last_copy[slot][2] == block, (
                f"block {block} computes from buffer {slot}, which last received "
                f"block {last_copy.get(slot, (0, 0, None))[2]}")
            copy_pos, event, _ = last_copy[slot]
            assert waited.get(event, -1) > copy_pos, f"block {block} computes without waiting for its copy"
            last_compute[slot] = pos
            computed.append((pos, block, copy_pos))
    for (pos_a, a, _), (_, b, copy_b) in zip(computed, computed[1:]):
        if b == a + 1:
            assert copy_b < pos_a, f"block {b}'s copy (log {copy_b}) was not issued before block {a} computed"
    return copied
