"""Pure-JAX specification of DeepGEMM's FP8 quantizers (the reference implementation).

Semantics follow DeepGEMM's ``per_token_cast_to_fp8`` / ``per_block_cast_to_fp8``
(deepseek-ai/DeepGEMM, ``deep_gemm/utils``) and the DeepSeek-V3 report (§3.3.2, fine-grained
quantization: 1x128 tiles for activations, 128x128 blocks for weights):

* each group's amax is taken in float32 and clamped below at 1e-4;
* ``scale = amax / 448`` (448 = largest finite float8_e4m3fn); with ``use_ue8m0`` the scale is
  rounded *up* to a power of two, exactly (bit manipulation, not ``2**ceil(log2(s))`` in floating
  point, which can round down just above a power of two);
* ``q = float8_e4m3fn(clip(x * (1 / scale), -448, 448))`` in float32, round-to-nearest-even:
  multiplication by the float32 reciprocal of the scale, exactly as DeepGEMM does (it can differ
  from ``x / scale`` by one float32 ulp before the FP8 rounding), so our bytes match DeepGEMM's.
  The CPU and CUDA twins compute the same operations and give the same bytes.

NaN in a group makes its amax, scale and every value of that group NaN. +-inf makes the scale inf:
finite values of that group become 0 and the inf itself NaN. A partial last group (k, m or n not
a multiple of 128) is quantized on its own elements only.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

FP8_MAX = 448.0
AMAX_CLAMP = 1e-4
GROUP = 128


def ceil_to_ue8m0(s: jax.Array) -> jax.Array:
    """Rounds positive float32 scales up to a power of two (exactly; NaN/inf pass through)."""
    bits = jax.lax.bitcast_convert_type(s.astype(jnp.float32), jnp.uint32)
    exp = (bits >> 23) & 0xFF
    up = ((bits & 0x7FFFFF) != 0).astype(jnp.uint32)
    rounded = jax.lax.bitcast_convert_type((exp + up) << 23, jnp.float32)
    return jnp.where(exp == 0xFF, s, rounded)


def _reciprocal(s: jax.Array) -> jax.Array:
    # Without the barrier XLA rewrites 1 / (amax / 448) into 448 / amax, up to 1 ulp away.
    return 1.0 / jax.lax.optimization_barrier(s)


def _scale(amax: jax.Array, use_ue8m0: bool) -> jax.Array:
    # XLA rewrites `a / broadcast(c)` into `a * broadcast(1 / c)`, up to 1 ulp off; a divisor that
    # is a materialized array (behind a barrier) keeps the true division DeepGEMM computes.
    fp8_max = jax.lax.optimization_barrier(jnp.full(amax.shape, FP8_MAX, jnp.float32))
    s = jnp.maximum(amax, jnp.float32(AMAX_CLAMP)) / fp8_max
    return ceil_to_ue8m0(s) if use_ue8m0 else s


def _to_fp8(y: jax.Array) -> jax.Array:
    # XLA's convert rounds to nearest even; NaN stays NaN through the clip.
    return jnp.clip(y, -FP8_MAX, FP8_MAX).astype(jnp.float8_e4m3fn)


def _pad_last(x: jax.Array, axis: int, size: int) -> jax.Array:
    pad = size - x.shape[axis]
    if pad == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, pad)
    return jnp.pad(x, widths)


def per_token_cast_to_fp8(x: jax.Array, *, use_ue8m0: bool = False) -> tuple[jax.Array, jax.Array]:
    """1x128 quantization along the last axis: x [..., k] -> (q [..., k] e4m3fn, s [..., ceil(k/128)] f32)."""
    k = x.shape[-1]
    g = -(-k // GROUP)
    xf = _pad_last(x.astype(jnp.float32), x.ndim - 1, g * GROUP)  # zero padding never raises amax
    xv = xf.reshape(*x.shape[:-1], g, GROUP)
    s = _scale(jnp.max(jnp.abs(xv), axis=-1), use_ue8m0)
    q = _to_fp8(xv * _reciprocal(s)[..., None]).reshape(*x.shape[:-1], g * GROUP)[..., :k]
    return q, s


def per_block_cast_to_fp8(x: jax.Array, *, use_ue8m0: bool = False) -> tuple[jax.Array, jax.Array]:
    """128x128 quantization of the last two axes: x [..., m, n] -> (q, s [..., ceil(m/128), ceil(n/128)])."""
    m, n = x.shape[-2:]
    mb, nb = -(-m // GROUP), -(-n // GROUP)
    xf = _pad_last(_pad_last(x.astype(jnp.float32), x.ndim - 2, mb * GROUP), x.ndim - 1, nb * GROUP)
    lead = x.shape[:-2]
    xv = xf.reshape(*lead, mb, GROUP, nb, GROUP)
    s = _scale(jnp.max(jnp.abs(xv), axis=(-3, -1)), use_ue8m0)
    q = _to_fp8(xv * _reciprocal(s)[..., :, None, :, None]).reshape(*lead, mb * GROUP, nb * GROUP)[..., :m, :n]
    return q, s


def dequantize_per_token(q: jax.Array, s: jax.Array) -> jax.Array:
    """Inverse of per_token_cast_to_fp8 up to rounding: float32 [..., k]."""
    k = q.shape[-1]
    scale = jnp.repeat(s, GROUP, axis=-1)[..., :k]
    return q.astype(jnp.float32) * scale


def dequantize_per_block(q: jax.Array, s: jax.Array) -> jax.Array:
    """Inverse of per_block_cast_to_fp8 up to rounding: float32 [..., m, n]."""
    m, n = q.shape[-2:]
    scale = jnp.repeat(jnp.repeat(s, GROUP, axis=-2), GROUP, axis=-1)[..., :m, :n]
    return q.astype(jnp.float32) * scale
