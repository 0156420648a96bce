"""Flax NNX layers on DeepSeek-V3's FP8 training recipe: ``Fp8Linear`` and ``Fp8GroupedLinear``.

Thin wrappers of :func:`dsjax.deep_gemm.fp8_linear` / :func:`dsjax.deep_gemm.fp8_grouped_linear`:
parameters stay in ``param_dtype`` (f32 master weights), and every GEMM of the forward and
backward pass runs in FP8 with 1x128 / 128x128 scales and f32 accumulation.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from dsjax._src import dispatch
from dsjax.deep_gemm import fp8_grouped_linear, fp8_linear

_default_kernel_init = nnx.initializers.lecun_normal()


class Fp8Linear(nnx.Module):
    """Drop-in for ``nnx.Linear`` (same parameters ``kernel [in, out]`` and ``bias [out]``) whose
    matmul runs in FP8 in the forward and backward passes.

    Args:
        in_features, out_features: sizes of the last axis of the input and output.
        use_bias: add a learned bias (in ``dtype`` precision, outside the FP8 GEMM).
        dtype: computation dtype of the activations (float32 or bfloat16); None keeps the input's.
        param_dtype: dtype of the master parameters (float32 by default).
        kernel_init, bias_init: initializers, as in ``nnx.Linear``.
        implementation: ``"auto"`` | ``"cuda"`` | ``"cpu"`` | ``"reference"``.
        rngs: the ``nnx.Rngs`` for initialization.
    """

    def __init__(self, in_features: int, out_features: int, *, use_bias: bool = True,
                 dtype: Any | None = None, param_dtype: Any = jnp.float32,
                 kernel_init: Any = _default_kernel_init, bias_init: Any = nnx.initializers.zeros,
                 implementation: dispatch.Implementation = "auto", rngs: nnx.Rngs):
        self.in_features, self.out_features = in_features, out_features
        self.dtype, self.implementation = dtype, implementation
        self.kernel = nnx.Param(kernel_init(rngs.params(), (in_features, out_features), param_dtype))
        self.bias = (nnx.Param(bias_init(rngs.params(), (out_features,), param_dtype))
                     if use_bias else None)

    def __call__(self, x: jax.Array) -> jax.Array:
        """``[..., in_features]`` -> ``[..., out_features]`` in ``dtype`` (or the input's dtype)."""
        dtype = self.dtype or x.dtype
        y = fp8_linear(x.astype(dtype), self.kernel[...].astype(dtype),
                       implementation=self.implementation)
        if self.bias is not None:
            y = y + self.bias[...].astype(dtype)
        return y


class Fp8GroupedLinear(nnx.Module):
    """MoE experts' linear layer on the contiguous layout: ``y[r] = x[r] @ kernel[m_indices[r]]``.

    Args:
        num_experts, in_features, out_features: ``kernel`` is ``[num_experts, in, out]``.
        dtype, param_dtype, kernel_init, implementation, rngs: as in :class:`Fp8Linear`.

    Call with ``x [m_sum, in]`` (``m_sum`` a multiple of 128, each expert's rows starting at a
    multiple of 128) and ``m_indices`` int32 ``[m_sum]`` (-1 for padding rows, whose output is 0).
    """

    def __init__(self, num_experts: int, in_features: int, out_features: int, *,
                 dtype: Any | None = None, param_dtype: Any = jnp.float32,
                 kernel_init: Any = nnx.initializers.variance_scaling(
                     1.0, "fan_in", "truncated_normal", in_axis=-2, out_axis=-1, batch_axis=(0,)),
                 implementation: dispatch.Implementation = "auto", rngs: nnx.Rngs):
        self.dtype, self.implementation = dtype, implementation
        self.kernel = nnx.Param(
            kernel_init(rngs.params(), (num_experts, in_features, out_features), param_dtype))

    def __call__(self, x: jax.Array, m_indices: jax.Array) -> jax.Array:
        dtype = self.dtype or x.dtype
        return fp8_grouped_linear(x.astype(dtype), self.kernel[...].astype(dtype), m_indices,
                                  implementation=self.implementation)
