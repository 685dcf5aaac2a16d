"""How bytes move between host and device, and how the compute waits for them.

The offload schedulers (`blocks.py`, `placement.py`) only decide *what* to copy *when*; every
allocation, copy and synchronisation goes through a `Transport`, so the same scheduling code
runs on CUDA (`CudaTransport`: side copy stream + events) and, in tests on machines without a
GPU, on plain CPU tensors (`HostTransport`: synchronous copies, events are counters).
"""
from __future__ import annotations

import warnings
from abc import ABC, abstractmethod
from typing import Any, Optional

import torch

Event = Any  # opaque to the schedulers: whatever the transport hands out

_warned_no_effect = False


def warn_no_effect(option: str, device: torch.device | str) -> None:
    """Warn once per process that an offload option is accepted but does nothing here."""
    global _warned_no_effect
    if _warned_no_effect:
        return
    _warned_no_effect = True
    warnings.warn(
        f"{option} has no effect on device {device!s} (CUDA is not available): the module stays "
        "where it is and runs there. Other offload options in this process are ignored silently.",
        RuntimeWarning,
        stacklevel=3,
    )


def _reset_no_effect_warning() -> None:
    """Tests only: forget that the warning was given."""
    global _warned_no_effect
    _warned_no_effect = False


class Transport(ABC):
    """Allocation, host->device copies and ordering between the copy stream and the compute."""

    device: torch.device

    @abstractmethod
    def host_empty(self, nbytes: int) -> torch.Tensor:
        """A flat uint8 host buffer the device can copy from asynchronously (pinned on CUDA)."""

    def host_free(self, tensor: torch.Tensor) -> None:
        """Give back what `host_empty` allocated for `tensor` (pinning, bookkeeping); the memory itself
        goes when the last tensor viewing it does."""

    @abstractmethod
    def device_empty(self, nbytes: int) -> torch.Tensor:
        """A flat uint8 buffer on the compute device."""

    @abstractmethod
    def copy_async(self, dst: torch.Tensor, src: torch.Tensor, after: Optional[Event] = None) -> Event:
        """Start `dst.copy_(src)` once `after` (an event from `record`) has completed, or, without
        one, once all compute issued so far has.

        Returns an event that completes when the copy has; `wait` on it before reading `dst`.
        """

    @abstractmethod
    def wait(self, event: Event) -> None:
        """Make compute issued from now on wait for `event`."""

    @abstractmethod
    def record(self) -> Event:
        """An event that completes when all compute issued so far has."""

    def synchronize(self) -> None:
        """Block the host until every copy and compute issued so far is done."""


class HostTransport(Transport):
    """Everything on the CPU, copies done at once: the offload machinery without CUDA.

    Used by the tests to run the real schedulers on CPU tensors; events are sequence numbers.
    """

    def __init__(self) -> None:
        self.device = torch.device("cpu")
        self._next_event = 0

    def _event(self) -> int:
        self._next_event += 1
        return self._next_event

    def host_empty(self, nbytes: int) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8)

    def device_empty(self, nbytes: int) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8)

    def copy_async(self, dst: torch.Tensor, src: torch.Tensor, after: Optional[Event] = None) -> Event:
        dst.copy_(src)
        return self._event()

    def wait(self, event: Event) -> None:
        pass

    def record(self) -> Event:
        return self._event()


class PinnedHostBuffer:
    """A page-locked host byte buffer of exactly `nbytes`.

    `tensor.pin_memory()` goes through PyTorch's caching host allocator, which rounds every
    allocation up to a power of two: a 0.7 GB Wan-14B block would pin 1 GB. Registering a plain
    allocation with cudaHostRegister pins exactly what is used. The registration is undone when
    this object dies; tensors that still view the memory keep it alive as ordinary pageable memory.
    """

    def __init__(self, nbytes: int) -> None:
        self.tensor = torch.empty(max(nbytes, 1), dtype=torch.uint8)
        self._registered_ptr = None
        cudart = torch.cuda.cudart()
        err = cudart.cudaHostRegister(self.tensor.data_ptr(), self.tensor.numel(), 0)
        if int(err) == 0:
            self._registered_ptr = self.tensor.data_ptr()
        else:  # e.g. a sandbox that refuses to lock pages: fall back to the caching allocator
            self.tensor = torch.empty(max(nbytes, 1), dtype=torch.uint8, pin_memory=True)
        self.tensor = self.tensor[:nbytes]

    def __del__(self) -> None:
        if self._registered_ptr is not None:
            unregister_host(self._registered_ptr)
            self._registered_ptr = None


class CudaTransport(Transport):
    """Copies on a side CUDA stream, ordered against the compute stream with events."""

    def __init__(self, device: torch.device | str) -> None:
        device = torch.device(device)
        if device.type != "cuda":
            raise ValueError(f"CudaTransport needs a CUDA device, got {device}; use HostTransport for CPU")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        self.device = device
        self.copy_stream = torch.cuda.Stream(device)
        self._keepalive: list[PinnedHostBuffer] = []

    def host_empty(self, nbytes: int) -> torch.Tensor:
        buf = PinnedHostBuffer(nbytes)
        self._keepalive.append(buf)  # registration lives as long as this transport
        return buf.tensor

    def host_free(self, tensor: torch.Tensor) -> None:
        self._keepalive = [b for b in self._keepalive if b.tensor.data_ptr() != tensor.data_ptr()]

    def device_empty(self, nbytes: int) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8, device=self.device)

    def copy_async(self, dst: torch.Tensor, src: torch.Tensor, after: Optional[Event] = None) -> Event:
        """Without `after`, the copy waits for all compute issued so far: `dst` may be memory the
        caching allocator has just handed out on the compute stream (a fresh block buffer, a swap
        placement), freed by tensors that kernels still queued there read or write; a copy stream
        that does not wait could overwrite them or be overwritten by them."""
        if after is not None:
            self.copy_stream.wait_event(after)
        else:
            self.copy_stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.copy_stream):
            dst.copy_(src, non_blocking=True)
            done = torch.cuda.Event()
            done.record(self.copy_stream)
        return done

    def wait(self, event: Event) -> None:
        torch.cuda.current_stream(self.device).wait_event(event)

    def record(self) -> Event:
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))
        return event

    def synchronize(self) -> None:
        self.copy_stream.synchronize()
        torch.cuda.current_stream(self.device).synchronize()


def unregister_host(ptr: int) -> None:
    """Undo cudaHostRegister of the pages at `ptr` (from a __del__: never raises)."""
    try:
        torch.cuda.synchronize()  # no copy may still read the pages being unlocked
        torch.cuda.cudart().cudaHostUnregister(ptr)
    except Exception:  # noqa: BLE001 - interpreter shutdown: CUDA may already be torn down
        pass
