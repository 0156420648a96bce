"""FlashMLA for JAX: MLA decoding over a paged latent KV cache (deepseek-ai/FlashMLA).

``get_mla_metadata`` + ``flash_mla_with_kvcache`` (BF16 or FP8 cache, variable lengths, s_q >= 1,
causal, split-KV with LSE combine), the FP8 cache helpers, ``PagedMLACache`` for Flax decode loops,
and DeepSeek-V3's weight-absorption helpers and softmax scale. Implementations: pure-JAX reference
(``dsjax.flash_mla.reference``, the specification), a multi-threaded CPU FFI kernel (AVX512-BF16
where available, float32 elsewhere), and an sm_90a CUDA kernel (tensor cores, split-KV + combine)
that is opt-in (``implementation="cuda"``) until it has been validated on a Hopper GPU.
"""

from dsjax.flash_mla.absorb import (
    absorb_output,
    absorb_query,
    deepseek_softmax_scale,
    latent_rows,
    split_wkv_b,
)
from dsjax.flash_mla.api import (
    dequantize_kvcache,
    flash_mla_with_kvcache,
    get_mla_metadata,
    quantize_kvcache,
)
from dsjax.flash_mla.cache import PagedMLACache

__all__ = [
    "PagedMLACache",
    "absorb_output",
    "absorb_query",
    "deepseek_softmax_scale",
    "dequantize_kvcache",
    "flash_mla_with_kvcache",
    "get_mla_metadata",
    "latent_rows",
    "quantize_kvcache",
    "split_wkv_b",
]
