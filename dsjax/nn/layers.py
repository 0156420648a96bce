"""Small building blocks of DeepSeek-V3: RMSNorm, YaRN rotary embeddings, the SwiGLU MLP, and
the choice of linear layer (FP8 or not) shared by attention, MLPs and shared experts.

RoPE follows DeepSeek-V3's ``precompute_freqs_cis`` / ``apply_rotary_emb`` (inference/model.py):
rotation of consecutive channel pairs (2i, 2i+1), YaRN frequency blending between ``beta_fast``
and ``beta_slow`` when ``max_seq_len > original_seq_len``.
"""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from dsjax.deep_gemm import fp8_linear
from dsjax.nn.config import DeepSeekV3Config
from dsjax.nn.fp8 import Fp8Linear

_shard_map = getattr(jax, "shard_map", None)
if _shard_map is None:  # pragma: no cover - older JAX
    from jax.experimental.shard_map import shard_map as _shard_map


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


def vary_over(x: jax.Array, axes: tuple[str, ...]) -> jax.Array:
    """Marks a ``shard_map`` value that is identical over mesh ``axes`` as varying over them.

    Needed before a ``custom_vjp`` op mixes a replicated weight with sharded activations: its
    weight cotangent varies like the activations, and JAX only sums it over the data-parallel
    axes (the transpose of this cast) when the primal was marked varying. The FP8 recipe
    (:func:`dsjax.deep_gemm.fp8_linear`, ``fp8_grouped_linear``) now does this itself; the helper
    stays for other custom_vjp ops and for code that marks weights explicitly (a no-op on a
    value that already varies).
    """
    if not axes:
        return x
    pvary = getattr(jax.lax, "pvary", None)
    return pvary(x, axes) if pvary is not None else jax.lax.pcast(x, axes, to="varying")


class ModelFp8Linear(Fp8Linear):
    """:class:`~dsjax.nn.fp8.Fp8Linear` that can run data-parallel under an explicit ``shard_map``.

    Under plain ``jit`` the FP8 quantizers and GEMMs already run sharded (their partitioning
    rules, :mod:`dsjax.deep_gemm.partition`): each device quantizes and multiplies its own rows,
    bit-identical to the unsharded forward, and the weight gradient is all-reduced -- without any
    gather when every device holds a multiple of 128 tokens (the 1x128 tiles of Wgrad's ``xᵀ``
    run along the tokens; otherwise those operands are gathered for Wgrad). After
    :func:`shard_fp8_linears` the call runs inside ``shard_map`` over the leading (batch) axis
    instead, so Wgrad's tiles run along each device's own rows: never a gather, at any batch
    size, at the price of tiles that depend on the sharding (within FP8 rounding of the
    unsharded gradient). The recipe marks the replicated weight varying itself.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.shard: tuple | None = None  # (mesh, batch axes), set by shard_fp8_linears

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.shard is None or self.bias is not None:
            return super().__call__(x)
        mesh, axes = self.shard
        from jax.sharding import PartitionSpec as P  # pylint: disable=import-outside-toplevel
        dtype = self.dtype or x.dtype
        impl = self.implementation

        def local(xl, w):
            return fp8_linear(xl, w, implementation=impl)

        return _shard_map(local, mesh=mesh, in_specs=(P(axes), P()), out_specs=P(axes))(
            x.astype(dtype), self.kernel[...].astype(dtype))


def shard_fp8_linears(model: nnx.Module, mesh, axes: tuple[str, ...]) -> int:
    """Makes every :class:`ModelFp8Linear` of ``model`` run data-parallel over mesh ``axes`` in
    an explicit ``shard_map`` (their inputs' leading axis must be split over them); returns how
    many were switched.

    Optional since the FP8 ops have partitioning rules: plain ``jit`` already keeps the rows on
    their devices (see :class:`ModelFp8Linear` for when the two differ: the training loop keeps
    the explicit form so that Wgrad never gathers at small per-device batches).
    """
    n = 0
    for _, node in nnx.iter_graph(model):
        if isinstance(node, ModelFp8Linear):
            node.shard = (mesh, tuple(axes))
            n += 1
    return n


def linear_factory(cfg: DeepSeekV3Config, rngs: nnx.Rngs) -> Callable[[int, int], nnx.Module]:
    """``(in, out) -> linear without bias``: :class:`ModelFp8Linear` (an
    :class:`~dsjax.nn.fp8.Fp8Linear`) when ``cfg.use_fp8``, else ``nnx.Linear``. Both hold one
    ``kernel [in, out]`` parameter initialized the same way (LeCun normal, one key each), so
    checkpoints and weights carry over between the two."""
    if cfg.use_fp8:
        return lambda i, o: ModelFp8Linear(i, o, use_bias=False, rngs=rngs)
    return lambda i, o: nnx.Linear(i, o, use_bias=False, rngs=rngs)


class MLP(nnx.Module):
    """SwiGLU feed-forward: ``w2(silu(w1 x) * w3 x)`` (DeepSeek-V3's dense FFN and shared experts).

    ``linear(in, out)`` builds each of the three projections (default ``nnx.Linear`` without
    bias; :func:`linear_factory` gives FP8 ones).
    """

    def __init__(self, dim: int, inter_dim: int, *, rngs: nnx.Rngs, linear=None):
        make = linear or (lambda i, o: nnx.Linear(i, o, use_bias=False, rngs=rngs))
        self.w1 = make(dim, inter_dim)
        self.w2 = make(inter_dim, dim)
        self.w3 = make(dim, inter_dim)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.w2(jax.nn.silu(self.w1(x)) * self.w3(x))
