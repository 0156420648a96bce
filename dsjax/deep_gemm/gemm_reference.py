"""Pure-JAX specification of DeepGEMM's FP8 GEMMs with fine-grained scaling (the reference).

Semantics follow DeepGEMM (deepseek-ai/DeepGEMM: ``fp8_gemm_nt``, ``m_grouped_fp8_gemm_nt_contiguous``,
``m_grouped_fp8_gemm_nt_masked``, ``k_grouped_fp8_gemm_nt_contiguous``) and the DeepSeek-V3 report
(§3.3.2: 1x128 activation tiles, 128x128 weight blocks, FP32 promotion every 128 elements of K).

Every GEMM is "NT": ``D = A · Bᵀ`` with both operands K-major. Per 128-wide block ``kb`` of K the
spec is ``D = Σ_kb (A_kb · B_kbᵀ) · sa[:, kb] · sb[·, kb]``. The scales are constant inside a
block, so this equals the float32 product of the dequantized operands in exact arithmetic; the
reference computes exactly that (dequantize to float32, one XLA dot at HIGHEST precision, f32
accumulation) and differs from a per-block accumulation only in float32 rounding order. The
k-grouped GEMM needs the per-block form for its group assignment and uses it literally.

No speed tricks here: this is what the CPU and CUDA twins are tested against, and what runs on
backends without the native modules.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dsjax.deep_gemm import reference as qref

GROUP = qref.GROUP
_HI = jax.lax.Precision.HIGHEST


def dequant_lhs(a: jax.Array, sa: jax.Array) -> jax.Array:
    """[..., m, k] float8 with 1x128 scales [..., m, ceil(k/128)] -> float32 [..., m, k]."""
    return qref.dequantize_per_token(a, sa)


def dequant_rhs(b: jax.Array, sb: jax.Array, *, per_row: bool) -> jax.Array:
    """B [..., n, k] with 128x128 (``per_row=False``) or 1x128 (``per_row=True``) scales -> f32."""
    return qref.dequantize_per_token(b, sb) if per_row else qref.dequantize_per_block(b, sb)


def _nt(a32: jax.Array, b32: jax.Array) -> jax.Array:
    return jnp.einsum("...mk,...nk->...mn", a32, b32, precision=_HI,
                      preferred_element_type=jnp.float32)


def fp8_gemm_nt(a: tuple[jax.Array, jax.Array], b: tuple[jax.Array, jax.Array], *,
                c: jax.Array | None = None, out_dtype=jnp.bfloat16,
                b_per_row: bool = False) -> jax.Array:
    """D[m, n] = A · Bᵀ (+ c), f32 accumulation, cast to ``out_dtype``.

    ``a`` = (float8 [m, k], f32 [m, ceil(k/128)]); ``b`` = (float8 [n, k], f32
    [ceil(n/128), ceil(k/128)]) or, with ``b_per_row``, f32 [n, ceil(k/128)] (the 1d1d GEMM).
    ``c`` is float32 [m, n], added in float32 before the cast.
    """
    d = _nt(dequant_lhs(*a), dequant_rhs(*b, per_row=b_per_row))
    if c is not None:
        d = d + c.astype(jnp.float32)
    return d.astype(out_dtype)


def m_grouped_fp8_gemm_nt_contiguous(a: tuple[jax.Array, jax.Array], b: tuple[jax.Array, jax.Array],
                                     m_indices: jax.Array, *, out_dtype=jnp.bfloat16) -> jax.Array:
    """D[r] = A[r] · B[m_indices[r]]ᵀ; rows whose index is not in [0, G) (-1: padding) are zero.

    ``a`` = ([m_sum, k], [m_sum, ceil(k/128)]); ``b`` = ([G, n, k], [G, ceil(n/128), ceil(k/128)]).
    Computed as one dense product per group, selected per row (G times the work of the kernels;
    this is the specification, not a fast path).
    """
    a32 = dequant_lhs(*a)
    b32 = dequant_rhs(*b, per_row=False)
    g = b32.shape[0]
    per_group = jnp.einsum("mk,gnk->gmn", a32, b32, precision=_HI,
                           preferred_element_type=jnp.float32)  # [G, m_sum, n]
    idx = m_indices.astype(jnp.int32)
    valid = (idx >= 0) & (idx < g)
    rows = jnp.take_along_axis(per_group, jnp.clip(idx, 0, g - 1)[None, :, None], axis=0)[0]
    return jnp.where(valid[:, None], rows, 0.0).astype(out_dtype)


def m_grouped_fp8_gemm_nt_masked(a: tuple[jax.Array, jax.Array], b: tuple[jax.Array, jax.Array],
                                 masked_m: jax.Array, *, out_dtype=jnp.bfloat16) -> jax.Array:
    """D[g, r] = A[g, r] · B[g]ᵀ for r < masked_m[g], zero for r >= masked_m[g].

    ``a`` = ([G, m_max, k], [G, m_max, ceil(k/128)]); ``b`` = ([G, n, k], [G, ceil(n/128),
    ceil(k/128)]); ``masked_m`` int32 [G]. A negative count masks every row of its group.
    """
    d = _nt(dequant_lhs(*a), dequant_rhs(*b, per_row=False))  # [G, m_max, n]
    rows = jnp.arange(d.shape[1], dtype=jnp.int32)
    keep = rows[None, :] < masked_m.astype(jnp.int32)[:, None]
    return jnp.where(keep[..., None], d, 0.0).astype(out_dtype)


def k_group_of_blocks(group_ks: jax.Array, num_k_blocks: int) -> jax.Array:
    """int32 [num_k_blocks]: the group of each 128-wide K block, G for blocks past Σ group_ks.

    ``group_ks`` int32 [G], each a multiple of 128 (blocks never straddle two groups).
    """
    ends = jnp.cumsum(group_ks.astype(jnp.int32)) // GROUP  # block index where each group ends
    starts = jnp.arange(num_k_blocks, dtype=jnp.int32)
    return jnp.searchsorted(ends, starts, side="right").astype(jnp.int32)


def k_grouped_fp8_gemm_nt_contiguous(a: tuple[jax.Array, jax.Array], b: tuple[jax.Array, jax.Array],
                                     group_ks: jax.Array, *, c: jax.Array | None = None) -> jax.Array:
    """D[g] = A[:, K_g] · B[:, K_g]ᵀ (+ c[g]) in float32 [G, m, n]; the MoE weight gradient.

    ``a`` = ([m, K], [m, ceil(K/128)]) and ``b`` = ([n, K], [n, ceil(K/128)]), both 1x128 scaled;
    group g owns the K range ``[Σ_{j<g} group_ks[j], Σ_{j<=g} group_ks[j])``; columns beyond
    ``Σ group_ks`` (capacity padding) contribute to no group. Written literally as the per-block
    promotion: one f32 product per 128-wide K block, scaled, summed into its group.
    """
    (aq, sa), (bq, sb) = a, b
    m, k = aq.shape
    n = bq.shape[0]
    nkb = -(-k // GROUP)
    pad = nkb * GROUP - k
    a8 = jnp.pad(aq.astype(jnp.float32), ((0, 0), (0, pad))).reshape(m, nkb, GROUP)
    b8 = jnp.pad(bq.astype(jnp.float32), ((0, 0), (0, pad))).reshape(n, nkb, GROUP)
    blocks = jnp.einsum("mbk,nbk->bmn", a8, b8, precision=_HI,
                        preferred_element_type=jnp.float32)  # un-scaled per-block partial sums
    blocks = blocks * sa.T[:, :, None] * sb.T[:, None, :]
    g = group_ks.shape[0]
    gid = k_group_of_blocks(group_ks, nkb)
    d = jax.ops.segment_sum(blocks, gid, num_segments=g + 1)[:g]
    if c is not None:
        d = d + c.astype(jnp.float32)
    return d
