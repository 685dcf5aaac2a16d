"""Wire codecs: how one row of D values of an exchange travels (the `comm_dtype` choice).

A codec says what a row costs on the wire and turns rows into wire rows and back, so the
exchange code has no per-format branches and a third format is one more class here.
"""
from __future__ import annotations

import torch

from .comm_quant import dequantize_into, packed_row_bytes, quantize_into


class NativeCodec:
    """Rows travel in the compute dtype, untouched: the received buffer is the result."""

    name = None
    lossless = True

    def row_size(self, dim: int) -> int:
        """Elements of `wire_dtype` per row of `dim` values."""
        return dim

    def wire_dtype(self, dtype: torch.dtype) -> torch.dtype:
        return dtype

    def encode_into(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        dst.copy_(src)

    def decode_into(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        dst.copy_(src)


class Fp8Codec(NativeCodec):
    """e4m3 payload + one fp32 scale per row in one uint8 row (comm_quant.py): D + 4 bytes a row."""

    name = "fp8"
    lossless = False

    def row_size(self, dim: int) -> int:
        return packed_row_bytes(dim)

    def wire_dtype(self, dtype: torch.dtype) -> torch.dtype:
        return torch.uint8

    def encode_into(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        quantize_into(src, dst)

    def decode_into(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        dequantize_into(src, dst)


CODECS = {codec.name: codec for codec in (NativeCodec(), Fp8Codec())}
COMM_DTYPES = tuple(CODECS)


def codec_for(comm_dtype: str | None) -> NativeCodec:
    if comm_dtype not in CODECS:
        raise ValueError(f"comm_dtype={comm_dtype!r} is not one of {list(COMM_DTYPES)}")
    return CODECS[comm_dtype]
