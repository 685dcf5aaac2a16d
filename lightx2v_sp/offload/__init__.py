"""CPU offload: component placement (gpu / cpu / swap) and DiT block offload with prefetch."""
from .blocks import (BlockOffload, InactiveBlockOffload, enable_block_offload, move_except,
                     offload_dit_blocks)
from .memory import StageMemory, gib, peak_memory_bytes, peak_reserved_bytes, reset_peak_memory
from .placement import MODES, ComponentPlacement, place_component
from .transport import CudaTransport, HostTransport, PinnedHostBuffer, Transport, warn_no_effect

__all__ = [
    "BlockOffload", "InactiveBlockOffload", "enable_block_offload", "move_except", "offload_dit_blocks",
    "StageMemory", "gib", "peak_memory_bytes", "peak_reserved_bytes", "reset_peak_memory",
    "MODES", "ComponentPlacement", "place_component",
    "CudaTransport", "HostTransport", "PinnedHostBuffer", "Transport", "warn_no_effect",
]
