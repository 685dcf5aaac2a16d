"""The FP8 wire row format shared by the torch codec (comm_quant.py) and its Triton kernels.

A packed row is D e4m3 payload bytes followed by the 4 bytes of its fp32 scale (amax / 448).
"""
import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0
SCALE_BYTES = 4
MIN_SCALE = torch.finfo(torch.float32).tiny  # scale floor: keeps 1 / scale finite for tiny rows


def packed_row_bytes(dim: int) -> int:
    return dim + SCALE_BYTES
