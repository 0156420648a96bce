"""Small building blocks of DeepSeek-V3: RMSNorm, YaRN rotary embeddings, the SwiGLU MLP.

RoPE follows DeepSeek-V3's ``precompute_freqs_cis`` / ``apply_rotary_emb`` (inference/model.py):
rotation of consecutive channel pairs (2i, 2i+1), YaRN frequency blending between ``beta_fast``
and ``beta_slow`` when ``max_seq_len > original_seq_len``.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from dsjax.nn.config import DeepSeekV3Config


class RMSNorm(nnx.Module):
    """RMSNorm with a learned scale, computed in float32: ``x / rms(x) * weight``."""

    def __init__(self, dim: int, *, eps: float = 1e-6):
        self.weight = nnx.Param(jnp.ones((dim,), jnp.float32))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return (y * self.weight[...]).astype(x.dtype)


def rope_frequencies(cfg: DeepSeekV3Config) -> jax.Array:
    """Per-pair rotation frequencies [qk_rope_head_dim // 2] (float32), YaRN-corrected."""
    dim, base = cfg.qk_rope_head_dim, cfg.rope_theta
    freqs = 1.0 / (base ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))
    if cfg.max_seq_len > cfg.original_seq_len:
        def correction_dim(rot: float) -> float:
            return dim * math.log(cfg.original_seq_len / (rot * 2 * math.pi)) / (2 * math.log(base))
        low = max(math.floor(correction_dim(cfg.beta_fast)), 0)
        high = min(math.ceil(correction_dim(cfg.beta_slow)), dim - 1)
        if low == high:
            high += 0.001
        ramp = jnp.clip((jnp.arange(dim // 2, dtype=jnp.float32) - low) / (high - low), 0, 1)
        smooth = 1 - ramp
        freqs = freqs / cfg.rope_factor * (1 - smooth) + freqs * smooth
    return freqs


def apply_rope(x: jax.Array, positions: jax.Array, freqs: jax.Array) -> jax.Array:
    """Rotates channel pairs of ``x`` [..., s, h, d] (or [..., s, d]) by position·freq.

    Args:
        x: the RoPE part of queries or keys; last axis d = 2·len(freqs).
        positions: int32 [..., s] absolute positions of the tokens.
        freqs: float32 [d // 2].
    """
    angles = positions.astype(jnp.float32)[..., None] * freqs  # [..., s, d/2]
    if x.ndim == positions.ndim + 2:  # a heads axis between s and d
        angles = angles[..., None, :]
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    xf = x.astype(jnp.float32).reshape(*x.shape[:-1], -1, 2)
    re, im = xf[..., 0], xf[..., 1]
    out = jnp.stack([re * cos - im * sin, re * sin + im * cos], axis=-1)
    return out.reshape(x.shape).astype(x.dtype)


class MLP(nnx.Module):
    """SwiGLU feed-forward: ``w2(silu(w1 x) * w3 x)`` (DeepSeek-V3's dense FFN and shared experts)."""

    def __init__(self, dim: int, inter_dim: int, *, rngs: nnx.Rngs, linear=None):
        make = linear or (lambda i, o: nnx.Linear(i, o, use_bias=False, rngs=rngs))
        self.w1 = make(dim, inter_dim)
        self.w2 = make(inter_dim, dim)
        self.w3 = make(dim, inter_dim)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.w2(jax.nn.silu(self.w1(x)) * self.w3(x))
