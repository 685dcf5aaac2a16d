"""Loading a component: a broken file is a user error that names the component and the file.

A truncated .safetensors (SafetensorError), a cut-off .pth (RuntimeError from the zip reader,
EOFError, UnpicklingError) or an unreadable file (OSError) are faults of the file, not of the
program: one `error:` line, not a traceback, and never reported as another component's failure.
Loaded weights are then checked for NaN / inf (finite.py).
"""
from __future__ import annotations

import pickle
from typing import Callable, TypeVar

import torch

from .finite import check_weights

T = TypeVar("T")


def _file_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [OSError, RuntimeError, EOFError, pickle.UnpicklingError]
    try:
        from safetensors import SafetensorError

        errors.append(SafetensorError)
    except ImportError:  # older safetensors: its error is a plain Exception subclass we cannot name
        pass
    return tuple(errors)


def load_component(component: str, path: str, load: Callable[[], T]) -> T:
    """`load()`; file faults become a ValueError naming `component` and `path`."""
    try:
        return load()
    except ValueError as e:  # the loader's own message; say which file when it does not
        if path in str(e):
            raise
        raise ValueError(f"the {component} at {path}: {e}") from None
    except torch.OutOfMemoryError:
        raise
    except _file_errors() as e:
        if "CUDA" in str(e) or "NCCL" in str(e):  # the device failed, not the file
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ValueError(f"could not load the {component} from {path} ({type(e).__name__}: {first}); the file "
                         "is truncated, corrupt or not this component's checkpoint") from None


def load_checked(component: str, path: str, load: Callable[[], T],
                 weights: Callable[[T], torch.nn.Module] = lambda m: m) -> T:
    """`load_component`, then the finiteness check of the loaded module's weights."""
    loaded = load_component(component, path, load)
    check_weights(weights(loaded), component, path)
    return loaded
