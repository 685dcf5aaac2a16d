"""Opt-in NCCL symmetric memory for the variable-length collectives (comm.symmetric_memory).

When on, `all_gather_v` / `reduce_scatter_v` take their buffers from
`torch.distributed._symmetric_memory` (allocated with the NCCL backend and registered with the
group by `rendezvous`), so NCCL can run its symmetric-memory kernels on them (seed 002).

The switch is a process-wide boolean because it describes the build and the job, not a process
group. Off (the default), the hot path reads that boolean and nothing else: this module does
not import torch's symmetric-memory package, creates no context object and looks up no group.
On a build, device or backend without support, `configure(True, ...)` warns once, says why,
and leaves the switch off; the collectives then use ordinary buffers.
"""
from __future__ import annotations

import warnings

import torch
import torch.distributed as dist

_enabled: bool = False  # read by the collectives on every call; written only by configure()
_warned: bool = False
_symm = None  # torch.distributed._symmetric_memory, imported on first use when enabled


def is_enabled() -> bool:
    return _enabled


def unavailable_reason(group=None) -> str | None:
    """Why symmetric memory cannot be used for `group` here, or None when it can."""
    if not torch.cuda.is_available():
        return "no CUDA device is visible"
    if not (dist.is_available() and dist.is_initialized()):
        return "torch.distributed is not initialised"
    backend = str(dist.get_backend(group))
    if backend != "nccl":
        return f"the process group's backend is {backend!r}, symmetric memory needs 'nccl'"
    try:
        import torch.distributed._symmetric_memory as symm
    except ImportError as e:
        return f"this PyTorch build has no torch.distributed._symmetric_memory ({e})"
    for name in ("empty", "rendezvous", "set_backend"):
        if not hasattr(symm, name):
            return f"torch.distributed._symmetric_memory lacks {name}() in torch {torch.__version__}"
    return None


def configure(enabled: bool, group=None) -> bool:
    """Set the switch from `comm.symmetric_memory`; returns whether symmetric memory is in use."""
    global _enabled, _warned, _symm
    if not enabled:
        _enabled = False
        return False
    reason = unavailable_reason(group)
    if reason is None:
        import torch.distributed._symmetric_memory as symm

        try:
            if symm.get_backend(torch.device("cuda", torch.cuda.current_device())) != "NCCL":
                symm.set_backend("NCCL")
        except (RuntimeError, AttributeError) as e:
            reason = f"the NCCL symmetric-memory backend could not be selected ({e})"
        else:
            _symm = symm
    if reason is not None:
        if not _warned:
            warnings.warn(f"comm.symmetric_memory=true is ignored: {reason}. The text-encoder collectives "
                          "use ordinary buffers (same results, no NCCL symmetric kernels).",
                          RuntimeWarning, stacklevel=2)
            _warned = True
        _enabled = False
        return False
    _enabled = True
    return True


def empty(shape, dtype: torch.dtype, device, group=None) -> torch.Tensor:
    """A buffer in symmetric memory, registered with `group` (collective: every rank of the group
    must call it with the same shape). Only called while the switch is on."""
    assert _enabled and _symm is not None, "symmetric_memory.empty called while the switch is off"
    buf = _symm.empty(tuple(shape), dtype=dtype, device=device)
    _symm.rendezvous(buf, group if group is not None else dist.group.WORLD)
    return buf
