"""FFI wrappers of the FP8 GEMMs (CPU twin and CUDA share target names, attributes and layouts).

Optional operands (``c``) travel as a float32 ``[0]`` placeholder with ``has_c=False`` so that a
target has one fixed signature. Under ``jax.vmap`` the calls run once per batch element
(``sequential``): the grouped GEMMs are the batched forms.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dsjax._src import ffi

Pair = tuple[jax.Array, jax.Array]

_NO_C = np.zeros((0,), np.float32)


def _c_arg(c: jax.Array | None) -> tuple[jax.Array, bool]:
    return (jnp.asarray(_NO_C), False) if c is None else (c.astype(jnp.float32), True)


def fp8_gemm_nt(a: Pair, b: Pair, c: jax.Array | None, out_dtype: Any, b_per_row: bool) -> jax.Array:
    """[m, k] x [n, k] -> [m, n]; ``b_per_row`` selects 1x128 (1d1d) instead of 128x128 b scales."""
    (aq, sa), (bq, sb) = a, b
    cc, has_c = _c_arg(c)
    out = jax.ShapeDtypeStruct((aq.shape[0], bq.shape[0]), out_dtype)
    return ffi.call("dsjax_deep_gemm_fp8_gemm_nt", out, aq, sa, bq, sb, cc,
                    b_per_row=bool(b_per_row), has_c=has_c)


def m_grouped_contiguous(a: Pair, b: Pair, m_indices: jax.Array, out_dtype: Any) -> jax.Array:
    """[m_sum, k] x [G, n, k] by row group -> [m_sum, n]."""
    (aq, sa), (bq, sb) = a, b
    out = jax.ShapeDtypeStruct((aq.shape[0], bq.shape[1]), out_dtype)
    return ffi.call("dsjax_deep_gemm_m_grouped_fp8_gemm_nt_contiguous", out, aq, sa, bq, sb,
                    m_indices.astype(jnp.int32))


def m_grouped_masked(a: Pair, b: Pair, masked_m: jax.Array, out_dtype: Any) -> jax.Array:
    """[G, m_max, k] x [G, n, k] -> [G, m_max, n], rows past masked_m[g] zero."""
    (aq, sa), (bq, sb) = a, b
    out = jax.ShapeDtypeStruct((aq.shape[0], aq.shape[1], bq.shape[1]), out_dtype)
    return ffi.call("dsjax_deep_gemm_m_grouped_fp8_gemm_nt_masked", out, aq, sa, bq, sb,
                    masked_m.astype(jnp.int32))


def k_grouped_contiguous(a: Pair, b: Pair, group_ks: jax.Array, c: jax.Array | None) -> jax.Array:
    """[m, K] x [n, K] split along K by group_ks -> f32 [G, m, n]."""
    (aq, sa), (bq, sb) = a, b
    cc, has_c = _c_arg(c)
    out = jax.ShapeDtypeStruct((group_ks.shape[0], aq.shape[0], bq.shape[0]), jnp.float32)
    return ffi.call("dsjax_deep_gemm_k_grouped_fp8_gemm_nt_contiguous", out, aq, sa, bq, sb,
                    group_ks.astype(jnp.int32), cc, has_c=has_c)
