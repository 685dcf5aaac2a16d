from .backends import attention, available_backends, get_backend, register_backend, resolve_backend
from .ulysses import ulysses_attention

__all__ = ["attention", "available_backends", "get_backend", "register_backend", "resolve_backend",
           "ulysses_attention"]
