"""MLA weight absorption for DeepSeek-V3 decoding, and its softmax scale.

DeepSeek-V3 (arXiv:2412.19437, §2.1.1; inference/model.py ``MLA`` with ``attn_impl="absorb"``)
caches per token the normalized latent ``c_kv`` (kv_lora_rank = 512) and the RoPE'd key part
``k_pe`` (64). Keys and values of head h are ``k_nope = W_UK[h] · c_kv``, ``v = W_UV[h] · c_kv``.
Because ``q_nope · k_nope = (W_UK[h]ᵀ · q_nope) · c_kv``, the query can be moved into latent space
once per step ("absorbed"), and attention runs directly over the 576-wide cache rows
``[c_kv, k_pe]`` (FlashMLA's layout); the 512-wide attention output is mapped back with W_UV.
No per-token K/V is ever rebuilt.

Weight layout follows the reference model: ``wkv_b`` is ``[n_heads * (qk_nope + v_head), 512]``.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from dsjax._src import checks


def deepseek_softmax_scale(qk_head_dim: int = 192, *, rope_factor: float = 40.0,
                           mscale: float = 1.0, max_seq_len: int = 163840,
                           original_seq_len: int = 4096) -> float:
    """DeepSeek-V3's attention scale: ``qk_head_dim ** -0.5``, times ``mscale²`` under YaRN.

    With YaRN context extension (``max_seq_len > original_seq_len``) the reference model uses
    ``m = 0.1 * mscale * ln(rope_factor) + 1`` and scales by ``m²``. Note that the scale is based
    on the model's per-head qk dim (128 nope + 64 rope = 192), not on FlashMLA's 576-wide latent
    row: pass this as ``softmax_scale`` to ``flash_mla_with_kvcache`` with absorbed queries.

    Defaults are DeepSeek-V3's config (rope_factor 40, mscale_all_dim 1, 4096 -> 163840).
    """
    if qk_head_dim < 1:
        raise ValueError(f"deepseek_softmax_scale: qk_head_dim must be positive, got {qk_head_dim}")
    scale = qk_head_dim ** -0.5
    if max_seq_len > original_seq_len:
        if rope_factor <= 0:
            raise ValueError(f"deepseek_softmax_scale: rope_factor must be > 0, got {rope_factor}")
        m = 0.1 * mscale * math.log(rope_factor) + 1.0
        scale *= m * m
    return float(scale)


def split_wkv_b(wkv_b: jax.Array, n_heads: int, qk_nope_head_dim: int = 128,
                v_head_dim: int = 128) -> tuple[jax.Array, jax.Array]:
    """Splits ``wkv_b [n_heads * (qk_nope + v), kv_lora_rank]`` into W_UK and W_UV.

    Returns:
        ``(w_uk [n_heads, qk_nope_head_dim, kv_lora_rank], w_uv [n_heads, v_head_dim, kv_lora_rank])``.
    """
    op = "split_wkv_b"
    checks.check_rank("wkv_b", wkv_b, op=op, exact=2, layout="[n_heads * (qk_nope + v), rank]")
    rows = n_heads * (qk_nope_head_dim + v_head_dim)
    if wkv_b.shape[0] != rows:
        raise ValueError(f"{op}: wkv_b must have {rows} rows (n_heads * (qk_nope + v)), got "
                         f"shape {tuple(wkv_b.shape)}")
    w = wkv_b.reshape(n_heads, qk_nope_head_dim + v_head_dim, wkv_b.shape[1])
    return w[:, :qk_nope_head_dim], w[:, qk_nope_head_dim:]


def absorb_query(q_nope: jax.Array, q_pe: jax.Array, w_uk: jax.Array) -> jax.Array:
    """Moves the no-RoPE query into latent space and appends the RoPE part.

    Args:
        q_nope: ``[b, s_q, h, qk_nope]``.
        q_pe: ``[b, s_q, h, rope]`` (RoPE already applied).
        w_uk: ``[h, qk_nope, rank]``.

    Returns:
        ``[b, s_q, h, rank + rope]`` in q_nope's dtype (float32 accumulation): the FlashMLA query.
    """
    op = "absorb_query"
    checks.check_rank("q_nope", q_nope, op=op, exact=4, layout="[b, s_q, h, qk_nope]")
    checks.check_rank("q_pe", q_pe, op=op, exact=4, layout="[b, s_q, h, rope]")
    checks.check_rank("w_uk", w_uk, op=op, exact=3, layout="[h, qk_nope, rank]")
    if q_pe.shape[:3] != q_nope.shape[:3]:
        raise ValueError(f"{op}: q_pe must share q_nope's [b, s_q, h] {tuple(q_nope.shape[:3])}, "
                         f"got {tuple(q_pe.shape)}")
    if w_uk.shape[:2] != (q_nope.shape[2], q_nope.shape[3]):
        raise ValueError(f"{op}: w_uk must have shape ({q_nope.shape[2]}, {q_nope.shape[3]}, rank), "
                         f"got {tuple(w_uk.shape)}")
    q_lat = jnp.einsum("bshd,hdc->bshc", q_nope, w_uk, preferred_element_type=jnp.float32,
                       precision=jax.lax.Precision.HIGHEST)
    return jnp.concatenate([q_lat.astype(q_nope.dtype), q_pe.astype(q_nope.dtype)], axis=-1)


def absorb_output(o_latent: jax.Array, w_uv: jax.Array) -> jax.Array:
    """Maps the latent attention output back to per-head values: ``o · W_UV[h]ᵀ``.

    Args:
        o_latent: ``[b, s_q, h, rank]`` (FlashMLA's ``out``).
        w_uv: ``[h, v_head_dim, rank]``.

    Returns:
        ``[b, s_q, h, v_head_dim]`` in o_latent's dtype (float32 accumulation); flatten the last two
        axes and apply ``wo`` as usual.
    """
    op = "absorb_output"
    checks.check_rank("o_latent", o_latent, op=op, exact=4, layout="[b, s_q, h, rank]")
    checks.check_rank("w_uv", w_uv, op=op, exact=3, layout="[h, v_head_dim, rank]")
    if w_uv.shape[0] != o_latent.shape[2] or w_uv.shape[2] != o_latent.shape[3]:
        raise ValueError(f"{op}: w_uv must have shape ({o_latent.shape[2]}, v_head_dim, "
                         f"{o_latent.shape[3]}), got {tuple(w_uv.shape)}")
    o = jnp.einsum("bshc,hdc->bshd", o_latent, w_uv, preferred_element_type=jnp.float32,
                   precision=jax.lax.Precision.HIGHEST)
    return o.astype(o_latent.dtype)


def latent_rows(c_kv: jax.Array, k_pe: jax.Array) -> jax.Array:
    """Cache rows ``[..., rank + rope]`` from the normalized latent and the RoPE'd key part."""
    if c_kv.shape[:-1] != k_pe.shape[:-1]:
        raise ValueError(f"latent_rows: c_kv {tuple(c_kv.shape)} and k_pe {tuple(k_pe.shape)} "
                         "must agree on all but the last axis")
    return jnp.concatenate([c_kv, k_pe.astype(c_kv.dtype)], axis=-1)
