"""FFI wrapper of the decode kernel (CPU twin and CUDA share one target and one layout).

The custom call returns the split-KV accumulators as extra results (``out_accum`` float32
``[b + num_sm_parts, h_kv, s_q * g, 512]``, ``lse_accum`` float32 ``[b + num_sm_parts, h_kv,
s_q * g]``), so that XLA owns all memory; they are dropped here.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from dsjax._src import ffi

TARGET = "dsjax_flash_mla_decode"
D_V = 512


def decode(q: jax.Array, k_cache: jax.Array, block_table: jax.Array, cache_seqlens: jax.Array,
           tile_scheduler_metadata: jax.Array, num_splits: jax.Array, *, softmax_scale: float,
           causal: bool, is_fp8: bool) -> tuple[jax.Array, jax.Array]:
    b, s_q, h_q, _ = q.shape
    h_kv = k_cache.shape[2]
    m = s_q * (h_q // h_kv)
    rows = b + tile_scheduler_metadata.shape[0]
    out_types = (
        jax.ShapeDtypeStruct((b, s_q, h_q, D_V), q.dtype),
        jax.ShapeDtypeStruct((b, h_q, s_q), jnp.float32),
        jax.ShapeDtypeStruct((rows, h_kv, m, D_V), jnp.float32),
        jax.ShapeDtypeStruct((rows, h_kv, m), jnp.float32),
    )
    out, lse, _, _ = ffi.call(TARGET, out_types, q, k_cache, block_table.astype(jnp.int32),
                              cache_seqlens.astype(jnp.int32), tile_scheduler_metadata,
                              num_splits, vmap_method="sequential",
                              softmax_scale=np.float32(softmax_scale), causal=bool(causal),
                              is_fp8=bool(is_fp8))
    return out, lse
