"""Lay every parameter and buffer of a module out in one flat byte buffer.

A whole block (or component) then moves host->device in one copy, and blocks of identical
structure share one layout, so a single pair of device buffers serves all of them. Switching
a module between copies is rebinding `tensor.data` to views of another flat buffer: no copy,
and the module's code never notices.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import torch
from torch import nn

# Views start on 512-byte boundaries, like the CUDA caching allocator's blocks, so kernels see
# the same pointer alignment as with resident weights (some cuBLAS/MKL paths depend on it).
ALIGN = 512


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def module_tensors(module: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """(name, tensor) for each distinct parameter and buffer, in a deterministic order."""
    seen: set[int] = set()
    out = []
    for name, t in list(module.named_parameters()) + list(module.named_buffers()):
        if id(t) in seen:
            continue
        seen.add(id(t))
        out.append((name, t))
    return out


class TensorLayout:
    """Offsets of a module's tensors inside one flat uint8 buffer, and the binding to views of it."""

    def __init__(self, module: nn.Module) -> None:
        entries = module_tensors(module)
        self.names = [name for name, _ in entries]
        self.tensors = [t for _, t in entries]
        self.devices = [t.device for t in self.tensors]
        self.specs: list[tuple[str, torch.Size, torch.dtype, int]] = []
        offset = 0
        for name, t in entries:
            self.specs.append((name, t.shape, t.dtype, offset))
            offset = _align(offset + t.numel() * t.element_size())
        self.nbytes = max(offset, ALIGN)

    def signature(self) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
        return [(name, tuple(shape), dtype) for name, shape, dtype, _ in self.specs]

    def views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """Tensors shaped like this module's, viewing `flat` (uint8, at least `nbytes`)."""
        assert flat.dtype == torch.uint8 and flat.dim() == 1 and flat.numel() >= self.nbytes
        out = []
        for _, shape, dtype, offset in self.specs:
            nbytes = shape.numel() * dtype.itemsize
            out.append(flat[offset:offset + nbytes].view(dtype).view(shape))
        return out

    def pack(self, views: Sequence[torch.Tensor]) -> None:
        """Copy the module's current values into `views`."""
        with torch.no_grad():
            for t, v in zip(self.tensors, views):
                v.copy_(t.data)

    def bind(self, views: Sequence[torch.Tensor]) -> None:
        """Point the module's tensors at `views` (no copy)."""
        for t, v in zip(self.tensors, views):
            t.data = v


def check_same_structure(layouts: Sequence[TensorLayout], what: str) -> None:
    """ValueError unless every layout equals the first (names, shapes, dtypes)."""
    ref = layouts[0].signature()
    for i, layout in enumerate(layouts[1:], start=1):
        sig = layout.signature()
        if sig != ref:
            diff = next((f"{a} vs {b}" for a, b in zip(ref, sig) if a != b),
                        f"{len(ref)} vs {len(sig)} tensors")
            raise ValueError(
                f"{what}: block {i} differs from block 0 ({diff}); block offload shares two device "
                "buffers between all blocks, so every block needs the same parameter names, shapes "
                "and dtypes")


def check_disjoint(layouts: Iterable[TensorLayout], what: str) -> None:
    """ValueError if one tensor object belongs to two blocks (tied weights)."""
    owner: dict[int, int] = {}
    for i, layout in enumerate(layouts):
        for name, t in zip(layout.names, layout.tensors):
            if id(t) in owner:
                raise ValueError(
                    f"{what}: tensor '{name}' is shared by blocks {owner[id(t)]} and {i}; block offload "
                    "rebinds each block's tensors separately and would corrupt a tied weight")
            owner[id(t)] = i
