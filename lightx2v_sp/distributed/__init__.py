from .comm_stats import CommStats, record_comm
from .init import init_distributed, is_rank0, resolve_device, shutdown_distributed
from .mesh import ParallelDims, valid_layouts
from .sequence import gather_sequence, shard_sequence, split_sizes

__all__ = ["CommStats", "ParallelDims", "gather_sequence", "init_distributed", "is_rank0", "record_comm",
           "resolve_device", "shard_sequence", "shutdown_distributed", "split_sizes", "valid_layouts"]
