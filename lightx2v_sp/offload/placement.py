"""Where a whole component (text encoder, VAE, DiT) lives: `gpu`, `cpu` or `swap`.

- gpu:  moved to the device once and kept there.
- cpu:  kept on the CPU and run there (inputs go to `execution_device`).
- swap: kept in pinned host memory; `with placement.on_device():` copies it to the device in
        one transfer for the stage, and afterwards rebinds it to the host copy, which still
        holds the same values (inference never writes weights), so nothing is copied back.

    te = ComponentPlacement(text_encoder, cfg.text_encoder.device, device, name="text_encoder")
    with te.on_device():
        context = text_encoder(ids.to(te.execution_device), mask.to(te.execution_device))
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch
from torch import nn

from .layout import TensorLayout
from .transport import CudaTransport, Transport, warn_no_effect

MODES = ("gpu", "cpu", "swap")


class ComponentPlacement:
    """A module placed per `mode`; use `on_device()` around every stage that runs it."""

    def __init__(self, module: nn.Module, mode: str, device: torch.device | str, *,
                 name: str = "component", transport: Optional[Transport] = None) -> None:
        if mode not in MODES:
            raise ValueError(f"{name} placement {mode!r} is not one of {list(MODES)}; "
                             "the component would have nowhere to run")
        self.module = module
        self.name = name
        self.device = torch.device(device)
        self.mode = mode
        self._swapping = False
        self._depth = 0
        if mode == "swap" and transport is None:
            if self.device.type == "cuda" and torch.cuda.is_available():
                transport = CudaTransport(self.device)
            else:
                warn_no_effect(f"{name} placement 'swap'", self.device)
        if mode == "cpu":
            module.to("cpu")
            self.execution_device = torch.device("cpu")
        elif mode == "swap" and transport is not None:
            self._init_swap(transport)
            self.execution_device = transport.device
        else:  # gpu, or swap that cannot swap here: live on the compute device
            module.to(self.device)
            self.execution_device = self.device

    def _init_swap(self, transport: Transport) -> None:
        self.transport = transport
        self._layout = TensorLayout(self.module)
        self._host_flat = transport.host_empty(self._layout.nbytes)
        self._host_views = self._layout.views(self._host_flat)
        self._layout.pack(self._host_views)
        self._layout.bind(self._host_views)
        self._swapping = True

    @property
    def swaps(self) -> bool:
        """True when `on_device()` really moves the weights."""
        return self._swapping

    @contextlib.contextmanager
    def on_device(self) -> Iterator[nn.Module]:
        """The module, resident on `execution_device` for the duration of the block."""
        if not self._swapping or self._depth > 0:
            self._depth += 1
            try:
                yield self.module
            finally:
                self._depth -= 1
            return
        with torch.inference_mode(False):
            flat = self.transport.device_empty(self._layout.nbytes)
            views = self._layout.views(flat)
        self.transport.wait(self.transport.copy_async(flat, self._host_flat))
        self._layout.bind(views)
        self._depth += 1
        try:
            yield self.module
        finally:
            self._depth -= 1
            # Kernels already queued keep their pointers; the stream-ordered allocator reuses
            # `flat` only for work queued after them, so no synchronisation is needed here.
            self._layout.bind(self._host_views)
            del flat, views

    def summary(self) -> dict:
        return {"mode": self.mode, "swaps": self._swapping, "execution_device": str(self.execution_device)}


def place_component(module: nn.Module, mode: str, device: torch.device | str, *,
                    name: str = "component", transport: Optional[Transport] = None) -> ComponentPlacement:
    """Shorthand for `ComponentPlacement(module, mode, device, name=name)`."""
    return ComponentPlacement(module, mode, device, name=name, transport=transport)
