from .backends import attention, available_backends, get_backend, register_backend, resolve_backend
from .ring import ring_attention, usp_attention
from .ulysses import ulysses_attention

__all__ = ["attention", "available_backends", "get_backend", "register_backend", "resolve_backend",
           "ring_attention", "ulysses_attention", "usp_attention"]
