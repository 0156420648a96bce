"""DeepGEMM for JAX: FP8 quantizers with fine-grained (1x128 / 128x128) scaling, the FP8 GEMMs
(dense, MoE grouped contiguous and masked, k-grouped weight gradient) and the DeepSeek-V3 FP8
training recipe (``fp8_linear``, ``fp8_grouped_linear``).
"""

from dsjax.deep_gemm.gemm import (
    fp8_gemm_nt,
    fp8_gemm_nt_1d1d,
    get_m_alignment_for_contiguous_layout,
    k_grouped_fp8_gemm_nt_contiguous,
    m_grouped_fp8_gemm_nt_contiguous,
    m_grouped_fp8_gemm_nt_masked,
)
from dsjax.deep_gemm.quant import (
    dequantize_per_block,
    dequantize_per_token,
    per_block_cast_to_fp8,
    per_token_cast_to_fp8,
)
from dsjax.deep_gemm.recipe import fp8_grouped_linear, fp8_linear

__all__ = [
    "dequantize_per_block",
    "dequantize_per_token",
    "fp8_gemm_nt",
    "fp8_gemm_nt_1d1d",
    "fp8_grouped_linear",
    "fp8_linear",
    "get_m_alignment_for_contiguous_layout",
    "k_grouped_fp8_gemm_nt_contiguous",
    "m_grouped_fp8_gemm_nt_contiguous",
    "m_grouped_fp8_gemm_nt_masked",
    "per_block_cast_to_fp8",
    "per_token_cast_to_fp8",
]
