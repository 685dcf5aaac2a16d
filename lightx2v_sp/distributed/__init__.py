from .comm_stats import CommStats, record_comm
from .init import init_distributed, is_rank0, resolve_device, shutdown_distributed
from .mesh import ParallelDims, check_layout, resolve_ulysses_degree, valid_layouts
from .sequence import gather_sequence, shard_sequence, split_sizes
from .varlen import all_gather_v, reduce_scatter_v

__all__ = ["CommStats", "all_gather_v", "reduce_scatter_v", "ParallelDims", "check_layout", "resolve_ulysses_degree", "gather_sequence", "init_distributed", "is_rank0", "record_comm",
           "resolve_device", "shard_sequence", "shutdown_distributed", "split_sizes", "valid_layouts"]
