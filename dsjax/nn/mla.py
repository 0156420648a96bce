"""Multi-head latent attention (MLA) of DeepSeek-V2/V3, training path.

Follows ``MLA`` in DeepSeek-V3's inference/model.py: queries through a low-rank bottleneck
(``wq_a`` -> RMSNorm -> ``wq_b``), keys/values from one compressed latent ``c_kv`` (``wkv_a``,
RMSNorm, ``wkv_b``) plus a decoupled RoPE key ``k_pe`` shared by all heads. The attention here is
differentiable pure JAX with float32 softmax ("naive" mode: K/V expanded from the latent). The
decode path stores only the 576-wide latent row ``[kv_norm(c_kv), rope(k_pe)]`` per token and
attends in latent space with absorbed weights (see :meth:`MLA.latent` and :meth:`MLA.absorbed_query`, built on :mod:`dsjax.flash_mla.absorb`).

With ``cfg.use_fp8`` the five projections (wq_a, wq_b or wq, wkv_a, wkv_b, wo) are
:class:`~dsjax.nn.fp8.Fp8Linear` (same ``kernel`` parameters), while the norms, RoPE and the
attention core (scores, softmax, P·V) stay in float32, as in DeepSeek-V3 (arXiv:2412.19437 §3.3.1).
The absorbed decode path then computes exactly what the training path computes: keys and values
depend on the latent only through ``wkv_b``'s FP8 GEMM, whose input is the latent quantized per
1x128 tile and whose weight is quantized per 128x128 block; so decoding caches that quantized
latent (dequantized to the cache dtype) and absorbs the dequantized FP8 weight (as DeepSeek-V3's
inference dequantizes its FP8 checkpoint for absorption). In real arithmetic both paths are the
same function; they differ by float32 summation order only.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from dsjax.deep_gemm import (dequantize_per_block, dequantize_per_token, per_block_cast_to_fp8,
                             per_token_cast_to_fp8)
from dsjax.flash_mla import PagedMLACache, absorb_output, absorb_query, split_wkv_b
from dsjax.nn.config import DeepSeekV3Config
from dsjax.nn.layers import RMSNorm, apply_rope, linear_factory, rope_frequencies


class MLA(nnx.Module):
    """DeepSeek-V3 multi-head latent attention.

    Args:
        cfg: dims (dim, n_heads, q_lora_rank, kv_lora_rank, qk_nope/rope_head_dim, v_head_dim) and
            the softmax scale (``cfg.softmax_scale``, YaRN mscale included).
        rngs: parameter initialization.
    """

    def __init__(self, cfg: DeepSeekV3Config, *, rngs: nnx.Rngs):
        h, d = cfg.n_heads, cfg.dim
        lin = linear_factory(cfg, rngs)
        if cfg.q_lora_rank > 0:
            self.wq_a = lin(d, cfg.q_lora_rank)
            self.q_norm = RMSNorm(cfg.q_lora_rank, eps=cfg.norm_eps)
            self.wq_b = lin(cfg.q_lora_rank, h * cfg.qk_head_dim)
        else:
            self.wq = lin(d, h * cfg.qk_head_dim)
        self.wkv_a = lin(d, cfg.kv_lora_rank + cfg.qk_rope_head_dim)
        self.kv_norm = RMSNorm(cfg.kv_lora_rank, eps=cfg.norm_eps)
        self.wkv_b = lin(cfg.kv_lora_rank, h * (cfg.qk_nope_head_dim + cfg.v_head_dim))
        self.wo = lin(h * cfg.v_head_dim, d)
        self.cfg = cfg

    def queries(self, x: jax.Array, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(q_nope [B, S, H, nope], q_pe [B, S, H, rope]) with RoPE applied to q_pe."""
        cfg = self.cfg
        b, s, _ = x.shape
        q = self.wq_b(self.q_norm(self.wq_a(x))) if cfg.q_lora_rank > 0 else self.wq(x)
        q = q.reshape(b, s, cfg.n_heads, cfg.qk_head_dim)
        q_nope, q_pe = q[..., :cfg.qk_nope_head_dim], q[..., cfg.qk_nope_head_dim:]
        return q_nope, apply_rope(q_pe, positions, rope_frequencies(cfg))

    def latent(self, x: jax.Array, positions: jax.Array) -> jax.Array:
        """The cached row per token: ``[kv_norm(c_kv) (kv_lora_rank), rope(k_pe) (rope dim)]``,
        [B, S, kv_lora_rank + qk_rope_head_dim] (576 wide for DeepSeek-V3)."""
        cfg = self.cfg
        kv = self.wkv_a(x)
        c, k_pe = kv[..., :cfg.kv_lora_rank], kv[..., cfg.kv_lora_rank:]
        k_pe = apply_rope(k_pe, positions, rope_frequencies(cfg))
        return jnp.concatenate([self.kv_norm(c), k_pe], axis=-1)

    def __call__(self, x: jax.Array, positions: jax.Array) -> jax.Array:
        """Causal self-attention over the sequence. x [B, S, D], positions int32 [B, S]."""
        cfg = self.cfg
        b, s, _ = x.shape
        q_nope, q_pe = self.queries(x, positions)
        lat = self.latent(x, positions)
        c, k_pe = lat[..., :cfg.kv_lora_rank], lat[..., cfg.kv_lora_rank:]
        kv = self.wkv_b(c).reshape(b, s, cfg.n_heads, cfg.qk_nope_head_dim + cfg.v_head_dim)
        k_nope, v = kv[..., :cfg.qk_nope_head_dim], kv[..., cfg.qk_nope_head_dim:]
        f32 = jnp.float32
        scores = (jnp.einsum("bshd,bthd->bhst", q_nope.astype(f32), k_nope.astype(f32))
                  + jnp.einsum("bshd,btd->bhst", q_pe.astype(f32), k_pe.astype(f32))) * cfg.softmax_scale
        causal = positions[:, None, :, None] >= positions[:, None, None, :]
        scores = jnp.where(causal, scores, -jnp.inf)
        p = jax.nn.softmax(scores, axis=-1)
        o = jnp.einsum("bhst,bthd->bshd", p, v.astype(f32)).astype(x.dtype)
        return self.wo(o.reshape(b, s, cfg.n_heads * cfg.v_head_dim))

    def _wkv_b(self) -> jax.Array:
        """wkv_b's weight [C, H·(nope + v)] as the training path multiplies with it: the kernel,
        or with FP8 its 128x128-block FP8 round trip (not differentiable: decode only)."""
        w = self.wkv_b.kernel[...]
        if self.cfg.use_fp8:
            w = dequantize_per_block(*per_block_cast_to_fp8(w))
        return w

    def _w_uk_uv(self) -> tuple[jax.Array, jax.Array]:
        """W_UK [H, nope, C] and W_UV [H, v, C] from wkv_b (kernel layout [C, H·(nope + v)])."""
        cfg = self.cfg
        return split_wkv_b(self._wkv_b().T, cfg.n_heads, cfg.qk_nope_head_dim, cfg.v_head_dim)

    def absorbed_query(self, q_nope: jax.Array, q_pe: jax.Array) -> jax.Array:
        """q_nope [B, S, H, nope], q_pe [B, S, H, rope] -> float32 FlashMLA queries
        [B, S, H, kv_lora_rank + rope] (q_nope·W_UK next to q_pe; :func:`dsjax.flash_mla.absorb_query`)."""
        w_uk, _ = self._w_uk_uv()
        return absorb_query(q_nope.astype(jnp.float32), q_pe.astype(jnp.float32), w_uk.astype(jnp.float32))

    def output_from_latent(self, o_latent: jax.Array) -> jax.Array:
        """Attention output in latent space [B, S, H, C] -> [B, S, D] (·W_UV, then wo)."""
        _, w_uv = self._w_uk_uv()
        o = absorb_output(o_latent.astype(jnp.float32), w_uv.astype(jnp.float32))
        b, s = o.shape[:2]
        return self.wo(o.reshape(b, s, -1).astype(self.wo.kernel.dtype))

    def decode(self, x: jax.Array, positions: jax.Array, cache: PagedMLACache, *,
               implementation: str = "auto") -> tuple[jax.Array, PagedMLACache]:
        """Attention for new tokens over the paged latent cache, with weight absorption.

        Appends the new tokens' latent rows to ``cache`` and attends from their absorbed queries
        (``q_nope·W_UK`` next to ``q_pe``, 576 wide) with FlashMLA, causally (bottom-right aligned,
        so new token i sees the cached tokens and new tokens <= i).

        Args:
            x: [B, T, D] hidden states of T new tokens per sequence (T = 1 for plain decoding).
            positions: int32 [B, T] their absolute positions (= the cached length before them).
            cache: this layer's cache, rows of width kv_lora_rank + qk_rope_head_dim (576).

        Returns:
            ([B, T, D] attention output, the cache with the new rows).
        """
        cfg = self.cfg
        q_nope, q_pe = self.queries(x, positions)
        rows = self.latent(x, positions)
        if cfg.use_fp8:  # the latent as wkv_b's FP8 GEMM sees it (1x128 tiles, per token)
            c = dequantize_per_token(*per_token_cast_to_fp8(rows[..., :cfg.kv_lora_rank]))
            rows = jnp.concatenate([c.astype(rows.dtype), rows[..., cfg.kv_lora_rank:]], axis=-1)
        rows = rows[:, :, None, :]  # [B, T, 1, 576]: one latent "KV head"
        cache = cache.append(rows.astype(cache.pages.dtype) if not cache.fp8 else rows)
        dtype = jnp.bfloat16 if cache.fp8 else cache.pages.dtype
        q = self.absorbed_query(q_nope, q_pe).astype(dtype)
        o_latent, _ = cache.attend(q, head_dim_v=cfg.kv_lora_rank, softmax_scale=cfg.softmax_scale,
                                   causal=True, implementation=implementation)
        return self.output_from_latent(o_latent), cache
