"""UlyssesOptions: the Ulysses variant as one value, from the config down to the exchange."""
from __future__ import annotations

from dataclasses import dataclass

from ..distributed.collectives import A2A_METHODS
from ..distributed.wire import COMM_DTYPES, NativeCodec, codec_for


@dataclass(frozen=True)
class UlyssesOptions:
    a2a: str = "all_to_all"          # one all_to_all_single, or round_robin pairwise rounds (PCIe)
    fuse_qkv: bool = True            # q, k and v in one collective per direction
    comm_dtype: str | None = None    # wire codec: None (compute dtype) or "fp8"
    backend: str = "auto"            # local attention kernel (backends.py)

    def __post_init__(self):
        if self.a2a not in A2A_METHODS:
            raise ValueError(f"a2a={self.a2a!r} is not one of {list(A2A_METHODS)}")
        codec_for(self.comm_dtype)

    @property
    def codec(self) -> NativeCodec:
        return codec_for(self.comm_dtype)

    def wire_code(self) -> tuple[int, int, int]:
        """The exchange variant as small integers, for ranks to compare (the kernel is local)."""
        return A2A_METHODS.index(self.a2a), int(self.fuse_qkv), COMM_DTYPES.index(self.comm_dtype)

    @classmethod
    def from_config(cls, cfg) -> "UlyssesOptions":
        p = cfg.parallel
        return cls(a2a=p.a2a, fuse_qkv=p.fuse_qkv, comm_dtype=p.comm_dtype, backend=cfg.attention.backend)
