"""FlashMLA's FP8 latent-cache row: 656 bytes per token per KV head.

Layout (deepseek-ai/FlashMLA, "FP8 KV cache" in README and tests/quant.py):
  bytes   0..511  512 float8_e4m3fn latent values, 4 tiles of 128
  bytes 512..527  4 float32 dequantization scales, one per tile (value = fp8 * scale)
  bytes 528..655  64 bfloat16 RoPE values
Each tile's scale is ``amax / 448`` (1 when the tile is all zeros, so zeros stay zeros); values are
``x / scale`` rounded to nearest even and clipped to ±448. The RoPE part is kept in bf16 because its
dynamic range matters most for the position signal.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

D_NOPE = 512
D_ROPE = 64
D_QK = D_NOPE + D_ROPE
TILE = 128
NUM_TILES = D_NOPE // TILE
BYTES_PER_TOKEN = D_NOPE + 4 * NUM_TILES + 2 * D_ROPE  # 656
FP8_MAX = 448.0


def quantize_rows(x: jax.Array) -> jax.Array:
    """``[..., 576]`` float -> uint8 ``[..., 656]`` in the layout above."""
    xf = x.astype(jnp.float32)
    nope = xf[..., :D_NOPE].reshape(*x.shape[:-1], NUM_TILES, TILE)
    amax = jnp.max(jnp.abs(nope), axis=-1, keepdims=True)
    scale = jnp.where(amax == 0, jnp.float32(1.0), amax / jnp.float32(FP8_MAX))
    codes = jnp.clip(nope / scale, -FP8_MAX, FP8_MAX).astype(jnp.float8_e4m3fn)
    code_bytes = jax.lax.bitcast_convert_type(codes, jnp.uint8).reshape(*x.shape[:-1], D_NOPE)
    scale_bytes = jax.lax.bitcast_convert_type(scale[..., 0], jnp.uint8)  # [..., 4, 4]
    scale_bytes = scale_bytes.reshape(*x.shape[:-1], 4 * NUM_TILES)
    rope = xf[..., D_NOPE:D_QK].astype(jnp.bfloat16)
    rope_bytes = jax.lax.bitcast_convert_type(rope, jnp.uint8).reshape(*x.shape[:-1], 2 * D_ROPE)
    return jnp.concatenate([code_bytes, scale_bytes, rope_bytes], axis=-1)


def dequantize_rows(rows: jax.Array) -> jax.Array:
    """uint8 (or float8_e4m3fn viewed as bytes) ``[..., 656]`` -> float32 ``[..., 576]``."""
    if rows.dtype != jnp.uint8:
        rows = jax.lax.bitcast_convert_type(rows, jnp.uint8)
    lead = rows.shape[:-1]
    codes = jax.lax.bitcast_convert_type(rows[..., :D_NOPE], jnp.float8_e4m3fn)
    codes = codes.astype(jnp.float32).reshape(*lead, NUM_TILES, TILE)
    scale = jax.lax.bitcast_convert_type(
        rows[..., D_NOPE:D_NOPE + 4 * NUM_TILES].reshape(*lead, NUM_TILES, 4), jnp.float32)
    nope = (codes * scale[..., None]).reshape(*lead, D_NOPE)
    rope = jax.lax.bitcast_convert_type(
        rows[..., D_NOPE + 4 * NUM_TILES:].reshape(*lead, D_ROPE, 2), jnp.bfloat16)
    return jnp.concatenate([nope, rope.astype(jnp.float32)], axis=-1)
