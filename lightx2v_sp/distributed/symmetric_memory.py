"""Opt-in NCCL symmetric memory for the variable-length collectives (comm.symmetric_memory).

With `symmetric=True`, `all_gather_v` / `reduce_scatter_v` take their buffers from
`torch.distributed._symmetric_memory` (allocated with the NCCL backend and registered with the
group by `rendezvous`), so NCCL can run its symmetric-memory kernels on them (seed 002).

The choice travels as an argument: `parallelize_t5(..., symmetric_memory=True)` asks
`activate(group)` once and its plans pass the answer to every collective, so nothing else in the
job (the DiT's gathers included) can inherit it. Off (the default), the hot path checks one
boolean argument: this module does not import torch's symmetric-memory package, creates no
context object and looks up no group. On a build, device or backend without support,
`activate` warns once, says why, and returns False; the collectives then use ordinary buffers.
"""
from __future__ import annotations

import warnings

import torch
import torch.distributed as dist

_warned: bool = False
_symm = None  # torch.distributed._symmetric_memory, imported on first activation


def unavailable_reason(group) -> str | None:
    """Why symmetric memory cannot be used for `group` here, or None when it can."""
    if not torch.cuda.is_available():
        return "no CUDA device is visible"
    if group is None:
        return "the job has one process: there is no collective to accelerate"
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


def activate(group) -> bool:
    """Whether `group`'s collectives can use symmetric memory here (selects NCCL's backend once)."""
    global _warned, _symm
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
            return True
    if not _warned:
        warnings.warn(f"comm.symmetric_memory=true is ignored: {reason}. The text-encoder collectives "
                      "use ordinary buffers (same results, no NCCL symmetric kernels).",
                      RuntimeWarning, stacklevel=2)
        _warned = True
    return False


def empty(shape, dtype: torch.dtype, device, group) -> torch.Tensor:
    """A buffer in symmetric memory, registered with `group` (collective: every rank of the group
    must call it with the same shape). Only called after `activate(group)` returned True."""
    assert _symm is not None and group is not None, "symmetric_memory.empty called without activate()"
    buf = _symm.empty(tuple(shape), dtype=dtype, device=device)
    _symm.rendezvous(buf, group)
    return buf
