"""FP8 weights: the format and matmul (fp8.py), community checkpoints (checkpoint.py), which layers
and what they cost (install.py). See DESIGN.md section 8d."""
from .checkpoint import Fp8Source, copy_piece, scan, strip_prefix
from .fp8 import (MATMUL_PATHS, Fp8Linear, dequantize, fp8_gemm_supported, fp8_is_finite, fp8_linear,
                  quantize_rows, quantize_tokens)
from .install import (DIT_LINEARS, QUANT_CHOICES, T5_LINEARS, fp8_layers,
                      owner_of, quantize_linears, set_matmul, summary, t5_bytes_per_param)

__all__ = ["DIT_LINEARS", "MATMUL_PATHS", "QUANT_CHOICES", "T5_LINEARS", "Fp8Linear", "Fp8Source", "copy_piece",
           "dequantize", "fp8_gemm_supported", "fp8_is_finite", "fp8_layers",
           "fp8_linear", "owner_of", "quantize_linears", "quantize_rows", "quantize_tokens", "scan",
           "set_matmul", "strip_prefix", "summary", "t5_bytes_per_param"]
