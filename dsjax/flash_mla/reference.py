"""Pure-JAX reference of FlashMLA decoding over a paged latent KV cache (the specification).

Semantics follow deepseek-ai/FlashMLA (``flash_mla_with_kvcache``, csrc/flash_api.cpp and
tests/test_flash_mla.py): one 576-wide latent per cached token, shared by all query heads of a KV
head; V is its first ``head_dim_v`` channels; query head ``h`` reads KV head ``h // (h_q // h_kv)``;
``causal`` masks bottom-right aligned; the LSE is the natural-log log-sum-exp of the scaled scores.

Accumulation is float32 (scores, softmax and the P·V product) at HIGHEST matmul precision. No
speed tricks: the whole padded sequence is gathered from the pages, then masked.

Robustness rules that the kernels share:
  * block_table entries are clamped into ``[0, num_blocks)`` before the gather, so garbage in the
    unused tail of a row never reads out of bounds; keys at index >= cache_seqlens[b] are masked
    by index AND their gathered values are replaced by 0 with ``where`` (so NaN/Inf in unused
    cache slots cannot leak through 0 * NaN).
  * A query row that sees no key (cache_seqlens[b] == 0, or a causal row with no visible key)
    gives out = 0 and lse = +inf.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from dsjax.flash_mla import fp8_format


def gather_pages(k_cache: jax.Array, block_table: jax.Array) -> jax.Array:
    """Gathers each sequence's pages into one padded run.

    Args:
        k_cache: ``[num_blocks, page_block_size, h_kv, d]`` (any dtype).
        block_table: int32 ``[b, max_blocks_per_seq]``; out-of-range entries are clamped.

    Returns:
        ``[b, max_blocks_per_seq * page_block_size, h_kv, d]`` in k_cache's dtype.
    """
    num_blocks, page = k_cache.shape[:2]
    bt = jnp.clip(block_table, 0, num_blocks - 1)
    k = k_cache[bt]  # [b, max_blocks, page, h_kv, d]
    b, mb = block_table.shape
    return k.reshape(b, mb * page, *k_cache.shape[2:])


def visible_mask(cache_seqlens: jax.Array, s_q: int, s_k_max: int, causal: bool) -> jax.Array:
    """bool ``[b, s_q, s_k_max]``: query i of sequence b sees key j.

    Key j is visible when ``j < cache_seqlens[b]`` and, if causal, ``j < s_k - s_q + i + 1``
    (bottom-right aligned; s_k = cache_seqlens[b]).
    """
    j = jnp.arange(s_k_max, dtype=jnp.int32)[None, None, :]
    s_k = cache_seqlens.astype(jnp.int32)[:, None, None]
    mask = j < s_k
    if causal:
        i = jnp.arange(s_q, dtype=jnp.int32)[None, :, None]
        mask = mask & (j < s_k - s_q + i + 1)
    return jnp.broadcast_to(mask, (cache_seqlens.shape[0], s_q, s_k_max))


def attention_over_keys(q: jax.Array, k: jax.Array, visible: jax.Array, head_dim_v: int,
                        softmax_scale: float) -> tuple[jax.Array, jax.Array]:
    """Masked MLA attention over already-gathered keys, float32 throughout.

    Args:
        q: ``[b, s_q, h_q, d]`` (any float dtype).
        k: ``[b, s_k, h_kv, d]`` float32, already zeroed where not a valid key.
        visible: bool ``[b, s_q, s_k]``.
        head_dim_v: V is ``k[..., :head_dim_v]``.
        softmax_scale: multiplies the scores.

    Returns:
        ``(out float32 [b, s_q, h_q, head_dim_v], lse float32 [b, h_q, s_q])``.
    """
    b, s_q, h_q, d = q.shape
    h_kv = k.shape[2]
    g = h_q // h_kv
    qf = q.astype(jnp.float32).reshape(b, s_q, h_kv, g, d)
    hp = jax.lax.Precision.HIGHEST
    scores = jnp.einsum("bihgd,bjhd->bhgij", qf, k, precision=hp) * jnp.float32(softmax_scale)
    vis = visible[:, None, None, :, :]
    scores = jnp.where(vis, scores, -jnp.inf)
    m = jnp.max(scores, axis=-1, keepdims=True)
    m_safe = jnp.where(jnp.isfinite(m), m, 0.0)
    p = jnp.where(vis, jnp.exp(scores - m_safe), 0.0)
    l = jnp.sum(p, axis=-1, keepdims=True)
    v = k[..., :head_dim_v]
    o = jnp.einsum("bhgij,bjhc->bihgc", p, v, precision=hp)
    l_o = jnp.transpose(l[..., 0], (0, 3, 1, 2))[..., None]  # [b, s_q, h_kv, g, 1]
    out = jnp.where(l_o > 0, o / jnp.where(l_o > 0, l_o, 1.0), 0.0)
    lse = jnp.where(l > 0, m_safe + jnp.log(jnp.where(l > 0, l, 1.0)), jnp.inf)[..., 0]
    out = out.reshape(b, s_q, h_q, head_dim_v)
    lse = lse.reshape(b, h_q, s_q)
    return out, lse


def flash_mla_with_kvcache(q: jax.Array, k_cache: jax.Array, block_table: jax.Array,
                           cache_seqlens: jax.Array, head_dim_v: int, softmax_scale: float,
                           causal: bool = False,
                           is_fp8_kvcache: bool = False) -> tuple[jax.Array, jax.Array]:
    """Reference MLA decode (arguments already validated by :mod:`dsjax.flash_mla.api`).

    Args:
        q: ``[b, s_q, h_q, d]`` bfloat16/float16/float32.
        k_cache: ``[num_blocks, page, h_kv, d]`` in q's dtype, or (FP8) uint8/float8_e4m3fn
            ``[num_blocks, page, h_kv, 656]`` in the format of :mod:`dsjax.flash_mla.fp8_format`.
        block_table: int32 ``[b, max_blocks_per_seq]``.
        cache_seqlens: int32 ``[b]``.
        head_dim_v: width of V (the first channels of the cache row).
        softmax_scale: score scale.
        causal: bottom-right aligned causal mask over the s_q query tokens.
        is_fp8_kvcache: k_cache is in the 656-byte FP8 format (dequantized after the gather).

    Returns:
        ``(out [b, s_q, h_q, head_dim_v] in q.dtype, lse float32 [b, h_q, s_q])``.
    """
    b, s_q = q.shape[:2]
    k = gather_pages(k_cache, block_table)
    if is_fp8_kvcache:
        # Rounded to bf16 like the kernels do: FP8 decode == BF16 decode of dequantize_kvcache(cache).
        k = fp8_format.dequantize_rows(k).astype(jnp.bfloat16)
    s_max = k.shape[1]
    # Lengths past the block table's capacity are clamped (there are no more keys to gather);
    # the causal mask uses the clamped length too, like the kernels.
    seqlens = jnp.clip(cache_seqlens.astype(jnp.int32), 0, s_max)
    key_ok = jnp.arange(s_max, dtype=jnp.int32)[None, :] < seqlens[:, None]
    k = jnp.where(key_ok[:, :, None, None], k.astype(jnp.float32), 0.0)
    vis = visible_mask(seqlens, s_q, s_max, causal)
    out, lse = attention_over_keys(q, k, vis, head_dim_v, softmax_scale)
    return out.astype(q.dtype), lse


def default_softmax_scale(d: int) -> float:
    """FlashMLA's default: ``d ** -0.5`` with d the query/key width (576)."""
    return float(np.float32(d) ** np.float32(-0.5))
