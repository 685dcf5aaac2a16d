from .backends import attention, available_backends, get_backend, register_backend
from .ulysses import ulysses_attention

__all__ = ["attention", "available_backends", "get_backend", "register_backend", "ulysses_attention"]
