"""DeepGEMM for JAX: FP8 quantizers with fine-grained (1x128 / 128x128) scaling.

The FP8 GEMMs themselves (dense, grouped, weight-gradient) and the training recipe build on these.
"""

from dsjax.deep_gemm.quant import (
    dequantize_per_block,
    dequantize_per_token,
    per_block_cast_to_fp8,
    per_token_cast_to_fp8,
)

__all__ = [
    "dequantize_per_block",
    "dequantize_per_token",
    "per_block_cast_to_fp8",
    "per_token_cast_to_fp8",
]
