"""DeepSeek-V3's FP8 training recipe as differentiable JAX ops: ``fp8_linear``, ``fp8_grouped_linear``.

Follows the DeepSeek-V3 report §3.3 (Fig. 6): the three GEMMs of a linear layer -- Fprop
``y = x·w``, Dgrad ``dx = dy·wᵀ`` and Wgrad ``dw = xᵀ·dy`` -- each run in FP8 (E4M3) with online
quantization: activations and output gradients get 1x128 tile scales along the contraction axis of
their GEMM (so ``x`` and ``dy`` are quantized again, transposed, for Wgrad), weights 128x128 block
scales (one quantization serves Fprop and Dgrad: a 128x128 block is the same block transposed).
Accumulation is float32 with promotion every 128 elements of K. Master weights and gradients stay
in the caller's precision (f32/bf16); only the GEMM operands are FP8. Like DeepSeek-V3, the
forward pass caches the FP8 forms (xᵀ for Wgrad, the weight blocks for Dgrad), not ``x`` itself.

Sharding: the quantizers and GEMMs carry partitioning rules (:mod:`dsjax.deep_gemm.partition`),
so under ``jax.jit`` with batch-sharded activations and a replicated weight every device
quantizes and multiplies its own rows, with no gather: Fprop and Dgrad are bit-identical to the
unsharded call, and Wgrad (its contraction runs over the tokens) is per-shard partial sums
all-reduced, equal up to float32 summation order -- provided each shard holds a multiple of 128
rows, so that the 1x128 tiles of ``xᵀ`` and ``dyᵀ`` are the global ones; otherwise those two
operands are gathered for Wgrad (correct, slower). Inside ``jax.shard_map`` the ops make a
replicated weight varying over the activations' mesh axes themselves, so the weight gradient
comes back summed over them (the transpose of that cast), as for any replicated parameter.

Both ops are ``jax.custom_vjp`` whose forward and backward call the public GEMMs with the same
``implementation`` choice; plain autodiff of ``x @ w`` in float32 is the oracle in the tests.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dsjax._src import checks, dispatch
from dsjax._src.ffi import varying_axes, vary_to
from dsjax.deep_gemm import gemm, quant

GROUP = gemm.GROUP


def _gemm_out(dtype: Any) -> Any:
    return jnp.float32 if np.dtype(dtype) == np.dtype(jnp.float32) else jnp.bfloat16


def _tok(x: jax.Array, impl: str):
    return quant.per_token_cast_to_fp8(x, implementation=impl)


def _blk(x: jax.Array, impl: str):
    return quant.per_block_cast_to_fp8(x, implementation=impl)


def _impls(implementation: str, op: str) -> tuple[str, str]:
    """(quantizer implementation, GEMM implementation) for one user choice."""
    q = dispatch.choose(implementation, op=op, has=("reference", "cpu", "cuda"))
    g = dispatch.choose(implementation, op=op, has=gemm._HAS)
    return q, g


def _vary_alike(*xs: jax.Array) -> tuple[jax.Array, ...]:
    """Inside ``jax.shard_map``: casts every operand to vary over the union of their mesh axes.

    A custom_vjp's cotangents must vary like its primals; the weight gradient of sharded
    activations varies over their axes, so a replicated weight is marked varying here, and the
    transpose of that cast sums its gradient over those axes. Outside shard_map: a no-op.
    """
    union = set().union(*(varying_axes(x) for x in xs))
    return tuple(vary_to(x, union) for x in xs)


# ---------------------------------------------------------------- dense


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _linear(x2: jax.Array, w: jax.Array, qimpl: str, gimpl: str) -> jax.Array:
    return _linear_fwd(x2, w, qimpl, gimpl)[0]


def _linear_fwd(x2, w, qimpl, gimpl):
    xq = _tok(x2, qimpl)                       # [m, k], 1x128 along k
    wq, sw = _blk(w, qimpl)                    # [k, n], 128x128
    y = gemm.fp8_gemm_nt(xq, (wq.T, sw.T), out_dtype=_gemm_out(x2.dtype), implementation=gimpl)
    xt = _tok(x2.T, qimpl)                     # [k, m], 1x128 along m (Wgrad contraction)
    # Residuals must be arrays: w's dtype travels as an empty array of that dtype.
    return y.astype(x2.dtype), (xt, (wq, sw), jnp.zeros((0,), w.dtype))


def _linear_bwd(qimpl, gimpl, res, dy):
    xt, wqs, w_like = res
    dx = gemm.fp8_gemm_nt(_tok(dy, qimpl), wqs, out_dtype=jnp.float32, implementation=gimpl)
    dw = gemm.fp8_gemm_nt_1d1d(xt, _tok(dy.T, qimpl), implementation=gimpl)  # [k, n]
    return dx.astype(dy.dtype), dw.astype(w_like.dtype)


_linear.defvjp(_linear_fwd, _linear_bwd)


def fp8_linear(x: jax.Array, w: jax.Array, *,
               implementation: dispatch.Implementation = "auto") -> jax.Array:
    """``x @ w`` with FP8 Fprop, Dgrad and Wgrad GEMMs (DeepSeek-V3 recipe), differentiable.

    Args:
        x: float32 or bfloat16 ``[..., k]`` activations (leading dims are flattened into rows).
        w: float32 or bfloat16 ``[k, n]`` weight (the ``nnx.Linear`` kernel layout).
        implementation: ``"auto"`` | ``"cuda"`` | ``"cpu"`` | ``"reference"`` for the quantizers
            and GEMMs of all three passes (GEMMs without a CUDA kernel fall back to the reference
            under ``auto``).

    Sharding: under ``jit``, rows of ``x`` (any leading axis) sharded over a mesh stay on their
    devices (see the module docstring); inside ``shard_map`` a replicated ``w`` needs no
    ``pvary``: its gradient comes back summed over the axes ``x`` varies over.

    Returns:
        ``[..., n]`` in ``x.dtype``. Gradients: ``dx`` in ``x.dtype``, ``dw`` in ``w.dtype``.
        Values carry FP8 quantization error (calc_diff against the f32 product about 1e-4..1e-3).

    Raises:
        TypeError: non-float inputs. ValueError: rank or inner-dimension mismatch.
    """
    op = "fp8_linear"
    checks.check_dtype("x", x, (jnp.float32, jnp.bfloat16), op=op)
    checks.check_dtype("w", w, (jnp.float32, jnp.bfloat16), op=op)
    checks.check_rank("x", x, op=op, at_least=1, layout="[..., k]")
    checks.check_rank("w", w, op=op, exact=2, layout="[k, n]")
    if x.shape[-1] != w.shape[0]:
        raise ValueError(f"{op}: x's last dim must equal w's first dim (k), got x {tuple(x.shape)} "
                         f"and w {tuple(w.shape)}")
    qimpl, gimpl = _impls(implementation, op)
    lead = x.shape[:-1]
    x, w = _vary_alike(x, w)
    y = _linear(x.reshape(-1, x.shape[-1]), w, qimpl, gimpl)
    return y.reshape(*lead, w.shape[1])


# ---------------------------------------------------------------- grouped (MoE experts)


def _block_order(m_indices: jax.Array, groups: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Row permutation putting the 128-row blocks in group order, and each group's K extent.

    Returns ``(rows, group_ks, keep)``: ``rows`` int32 [m_sum] gathers the rows block by block
    sorted by group (all-padding blocks last), ``group_ks`` int32 [G] = 128 x blocks per group,
    ``keep`` bool [m_sum] marks non-padding rows.
    """
    m_sum = m_indices.shape[0]
    nblk = m_sum // GROUP
    blk = m_indices.reshape(nblk, GROUP).max(axis=1)               # -1 for all-padding blocks
    key = jnp.where(blk < 0, groups, blk)
    order = jnp.argsort(key, stable=True).astype(jnp.int32)
    rows = (order[:, None] * GROUP + jnp.arange(GROUP, dtype=jnp.int32)[None, :]).reshape(-1)
    counts = jnp.zeros((groups + 1,), jnp.int32).at[key].add(1)[:groups]
    return rows, counts * GROUP, m_indices >= 0


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _grouped(x, w, m_indices, qimpl, gimpl):
    return _grouped_fwd(x, w, m_indices, qimpl, gimpl)[0]


def _grouped_fwd(x, w, m_indices, qimpl, gimpl):
    groups = w.shape[0]
    wq, sw = _blk(w, qimpl)                                           # [G, k, n], 128x128
    b = (jnp.swapaxes(wq, 1, 2), jnp.swapaxes(sw, 1, 2))              # [G, n, k]
    y = gemm.m_grouped_fp8_gemm_nt_contiguous(_tok(x, qimpl), b, m_indices,
                                              out_dtype=_gemm_out(x.dtype), implementation=gimpl)
    rows, group_ks, keep = _block_order(m_indices, groups)
    xs = jnp.where(keep[:, None], x, 0).astype(x.dtype)[rows]         # padding rows contribute 0
    xt = _tok(xs.T, qimpl)                                            # [k, m_sum], 1x128 along m
    res = (xt, (wq, sw), m_indices, rows, group_ks, keep, jnp.zeros((0,), w.dtype))
    return y.astype(x.dtype), res


def _grouped_bwd(qimpl, gimpl, res, dy):
    xt, wqs, m_indices, rows, group_ks, keep, w_like = res
    dyz = jnp.where(keep[:, None], dy, 0).astype(dy.dtype)
    dx = gemm.m_grouped_fp8_gemm_nt_contiguous(_tok(dyz, qimpl), wqs, m_indices,
                                               out_dtype=jnp.float32, implementation=gimpl)
    dyt = _tok(dyz[rows].T, qimpl)                                    # [n, m_sum]
    dw = gemm.k_grouped_fp8_gemm_nt_contiguous(xt, dyt, group_ks, implementation=gimpl)
    m_ct = np.zeros(m_indices.shape, jax.dtypes.float0)
    return dx.astype(dy.dtype), dw.astype(w_like.dtype), m_ct


_grouped.defvjp(_grouped_fwd, _grouped_bwd)


def fp8_grouped_linear(x: jax.Array, w: jax.Array, m_indices: jax.Array, *,
                       implementation: dispatch.Implementation = "auto") -> jax.Array:
    """MoE experts ``y[r] = x[r] @ w[m_indices[r]]`` on the contiguous layout, FP8 in all passes.

    Fprop and Dgrad are m-grouped contiguous GEMMs; Wgrad is the k-grouped GEMM over the rows of
    each expert (blocks reordered by expert, so any 128-aligned layout works).

    Args:
        x: float32 or bfloat16 ``[m_sum, k]``, ``m_sum`` a multiple of 128; each expert's rows
            start at a multiple of 128 (``get_m_alignment_for_contiguous_layout()``).
        w: float32 or bfloat16 ``[G, k, n]`` expert weights.
        m_indices: int32 ``[m_sum]``: each row's expert, -1 for padding rows (output zero, no
            gradient contribution).
        implementation: ``"auto"`` | ``"cuda"`` | ``"cpu"`` | ``"reference"``.

    Sharding: Fprop and Dgrad partition by 128-row blocks like :func:`fp8_linear`; Wgrad sorts
    the blocks by expert over the whole ``m_sum``, so under ``jit`` with sharded rows that
    permutation moves rows between devices. For data-parallel experts call it inside
    ``jax.shard_map`` (as :mod:`dsjax.nn.ep` does); a replicated ``w`` is marked varying there.

    Returns:
        ``[m_sum, n]`` in ``x.dtype``; gradients flow to ``x`` and ``w`` (none to ``m_indices``).
    """
    op = "fp8_grouped_linear"
    checks.check_dtype("x", x, (jnp.float32, jnp.bfloat16), op=op)
    checks.check_dtype("w", w, (jnp.float32, jnp.bfloat16), op=op)
    checks.check_rank("x", x, op=op, exact=2, layout="[m_sum, k]")
    checks.check_rank("w", w, op=op, exact=3, layout="[G, k, n]")
    if x.shape[1] != w.shape[1]:
        raise ValueError(f"{op}: x's last dim must equal w's k (dim 1), got x {tuple(x.shape)} "
                         f"and w {tuple(w.shape)}")
    if x.shape[0] % GROUP != 0:
        raise ValueError(f"{op}: x must have a multiple of {GROUP} rows (the contiguous layout pads "
                         f"every expert to {GROUP} rows), got m_sum={x.shape[0]}")
    checks.check_dtype("m_indices", m_indices, (jnp.int32,), op=op)
    checks.check_shape("m_indices", m_indices, (x.shape[0],), op=op, layout="[m_sum]")
    qimpl, gimpl = _impls(implementation, op)
    x, w = _vary_alike(x, w)
    return _grouped(x, w, m_indices, qimpl, gimpl)
