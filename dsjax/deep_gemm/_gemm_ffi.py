"""FFI wrappers of the FP8 GEMMs (CPU twin and CUDA share target names, attributes and layouts).

Optional operands (``c``) travel as a float32 ``[0]`` placeholder with ``has_c=False`` so that a
target has one fixed signature. Under ``jax.vmap`` the calls run once per batch element
(``sequential``): the grouped GEMMs are the batched forms.

CUDA kernel selection for the 1d2d GEMMs (``fp8_gemm_nt``, ``m_grouped_fp8_gemm_nt_contiguous``,
``m_grouped_fp8_gemm_nt_masked``): the environment variable ``DSJAX_DEEP_GEMM_KERNEL`` (read when
the op is traced) is ``mma`` (default: the correctness-first mma.sync kernel,
``ffi/deep_gemm/gemm.cu``) or ``wgmma`` (the Hopper TMA + WGMMA pipeline,
``ffi/deep_gemm/sm90/fp8_gemm_wgmma.cu``; opt-in until validated on a GPU). Any other value
raises ``ValueError``. With ``wgmma``, calls the WGMMA kernel cannot take run on ``mma`` instead
(see :func:`wgmma_unsupported_reason`: 1x128 b scales, i.e. ``fp8_gemm_nt_1d1d``, and ``k`` that
is 0 or not a multiple of 16, since TMA needs 16-byte row strides); the k-grouped GEMM always
uses ``mma``. The selection applies only where the computation is lowered for CUDA: the CPU twin
is the same on either setting.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp

from dsjax._src import ffi

Pair = tuple[jax.Array, jax.Array]


def _c_arg(c: jax.Array | None) -> tuple[jax.Array, bool]:
    # The absent accumulator is an empty operand built in the trace (jnp.zeros), not a captured
    # numpy constant: a captured constant becomes an extra operand of the op's
    # custom_partitioning, which XLA (jaxlib 0.11.2) crashes on compiling inside shard_map.
    return (jnp.zeros((0,), jnp.float32), False) if c is None else (c.astype(jnp.float32), True)


KERNEL_ENV = "DSJAX_DEEP_GEMM_KERNEL"
KERNELS = ("mma", "wgmma")
DENSE_TARGET = "dsjax_deep_gemm_fp8_gemm_nt"
WGMMA_TARGET = "dsjax_deep_gemm_fp8_gemm_nt_wgmma"
CONTIGUOUS_TARGET = "dsjax_deep_gemm_m_grouped_fp8_gemm_nt_contiguous"
MASKED_TARGET = "dsjax_deep_gemm_m_grouped_fp8_gemm_nt_masked"
# The WGMMA twin of each mma target: same operands and attributes.
WGMMA_TARGETS = {t: t + "_wgmma" for t in (DENSE_TARGET, CONTIGUOUS_TARGET, MASKED_TARGET)}


def selected_kernel() -> str:
    """The CUDA kernel ``DSJAX_DEEP_GEMM_KERNEL`` asks for: ``"mma"`` (default) or ``"wgmma"``.

    Unset or empty means ``"mma"``; the value is case- and whitespace-insensitive.

    Raises:
        ValueError: any other value (the message names the variable, the choices and the value).
    """
    raw = os.environ.get(KERNEL_ENV, "")
    value = raw.strip().lower() or "mma"
    if value not in KERNELS:
        raise ValueError(f"{KERNEL_ENV} must be one of {', '.join(repr(k) for k in KERNELS)} "
                         f"(unset means 'mma'), got {raw!r}")
    return value


def wgmma_unsupported_reason(k: int, b_per_row: bool = False) -> str | None:
    """Why the WGMMA kernel cannot run a GEMM with this ``k`` (None when it can).

    Mirrors ``CheckWgmmaSupported`` in ``ffi/deep_gemm/sm90/fp8_gemm_wgmma.cu``; any ``m``, ``n``
    and group count are supported (tails are zero-filled by TMA and guarded on store).
    """
    if b_per_row:
        return "1x128 b scales (fp8_gemm_nt_1d1d) are implemented by the mma kernel only"
    if k <= 0 or k % 16 != 0:
        return f"k must be a positive multiple of 16 for TMA (16-byte row strides), got k={k}"
    return None


def cuda_target(target: str, k: int, b_per_row: bool = False) -> str:
    """The CUDA FFI target a 1d2d GEMM lowers to under the current kernel selection.

    Args:
        target: the mma target (``DENSE_TARGET``, ``CONTIGUOUS_TARGET`` or ``MASKED_TARGET``).
        k: the contraction size.
        b_per_row: 1x128 b scales (the dense 1d1d GEMM).
    """
    if (selected_kernel() == "wgmma" and target in WGMMA_TARGETS
            and wgmma_unsupported_reason(k, b_per_row) is None):
        return WGMMA_TARGETS[target]
    return target


def _call(target: str, k: int, b_per_row: bool, out: Any, args: tuple[Any, ...],
          attrs: dict[str, Any]) -> Any:
    """Calls `target` (the CPU twin's name), or its WGMMA twin where lowered for CUDA when selected."""
    cuda = cuda_target(target, k, b_per_row)
    if cuda == target:
        return ffi.call(target, out, *args, **attrs)
    # The WGMMA targets exist only in the CUDA module, so only the CUDA lowering may name them;
    # every other platform keeps the shared target (the CPU twin).
    return jax.lax.platform_dependent(
        *args,
        default=lambda *xs: ffi.call(target, out, *xs, **attrs),
        cuda=lambda *xs: ffi.call(cuda, out, *xs, **attrs))


def fp8_gemm_nt(a: Pair, b: Pair, c: jax.Array | None, out_dtype: Any, b_per_row: bool) -> jax.Array:
    """[m, k] x [n, k] -> [m, n]; ``b_per_row`` selects 1x128 (1d1d) instead of 128x128 b scales."""
    (aq, sa), (bq, sb) = a, b
    cc, has_c = _c_arg(c)
    out = jax.ShapeDtypeStruct((aq.shape[0], bq.shape[0]), out_dtype)
    return _call(DENSE_TARGET, aq.shape[1], b_per_row, out, (aq, sa, bq, sb, cc),
                 dict(b_per_row=bool(b_per_row), has_c=has_c))


def m_grouped_contiguous(a: Pair, b: Pair, m_indices: jax.Array, out_dtype: Any) -> jax.Array:
    """[m_sum, k] x [G, n, k] by row group -> [m_sum, n]."""
    (aq, sa), (bq, sb) = a, b
    out = jax.ShapeDtypeStruct((aq.shape[0], bq.shape[1]), out_dtype)
    return _call(CONTIGUOUS_TARGET, aq.shape[1], False, out,
                 (aq, sa, bq, sb, m_indices.astype(jnp.int32)), {})


def m_grouped_masked(a: Pair, b: Pair, masked_m: jax.Array, out_dtype: Any) -> jax.Array:
    """[G, m_max, k] x [G, n, k] -> [G, m_max, n], rows past masked_m[g] zero."""
    (aq, sa), (bq, sb) = a, b
    out = jax.ShapeDtypeStruct((aq.shape[0], aq.shape[1], bq.shape[1]), out_dtype)
    return _call(MASKED_TARGET, aq.shape[-1], False, out,
                 (aq, sa, bq, sb, masked_m.astype(jnp.int32)), {})


def k_grouped_contiguous(a: Pair, b: Pair, group_ks: jax.Array, c: jax.Array | None) -> jax.Array:
    """[m, K] x [n, K] split along K by group_ks -> f32 [G, m, n]."""
    (aq, sa), (bq, sb) = a, b
    cc, has_c = _c_arg(c)
    out = jax.ShapeDtypeStruct((group_ks.shape[0], aq.shape[0], bq.shape[0]), jnp.float32)
    return ffi.call("dsjax_deep_gemm_k_grouped_fp8_gemm_nt_contiguous", out, aq, sa, bq, sb,
                    group_ks.astype(jnp.int32), cc, has_c=has_c)
