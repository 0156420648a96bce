"""Public FP8 quantizers: DeepGEMM's 1x128 (per-token) and 128x128 (per-block) casts.

Each call validates its arguments, picks an implementation (``auto`` | ``cuda`` | ``cpu`` |
``reference``; see :mod:`dsjax._src.dispatch`) and runs it. The CPU and CUDA twins produce the
same bytes and scales as :mod:`dsjax.deep_gemm.reference`, which documents the semantics.
The FFI implementations run through :mod:`dsjax.deep_gemm.partition`: under ``jax.jit`` with a
sharded ``x`` each device quantizes its own rows (leading dims freely, the blocked dims in steps of
128 per shard, so every group is the global one and the bytes equal the unsharded call's).
The casts are not differentiable (their outputs are FP8 codes); taking a gradient raises TypeError.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from dsjax._src import checks, dispatch
from dsjax.deep_gemm import _ffi, partition, reference

_HAS = ("reference", "cpu", "cuda")
GROUP = reference.GROUP


def _not_differentiable(name: str):
    def rule(use_ue8m0, impl, primals, tangents):
        raise TypeError(
            f"{name} is not differentiable: it returns float8 codes and scales. Quantize outside "
            "the differentiated function, or use dsjax.deep_gemm's FP8 training ops (custom_vjp) "
            "that quantize inside their forward and backward passes.")
    return rule


def _run(kind: str, x: jax.Array, use_ue8m0: bool, impl: str) -> tuple[jax.Array, jax.Array]:
    if impl == "reference":
        fn = reference.per_token_cast_to_fp8 if kind == "token" else reference.per_block_cast_to_fp8
        return fn(x, use_ue8m0=use_ue8m0)
    return _ffi_cast(kind, x, use_ue8m0)


def _ffi_cast(kind: str, x: jax.Array, use_ue8m0: bool) -> tuple[jax.Array, jax.Array]:
    fn = _ffi.per_token_cast_to_fp8 if kind == "token" else _ffi.per_block_cast_to_fp8

    def local(x):
        return tuple(fn(x, use_ue8m0))

    def vmap_rule(axis_size, in_batched, x):
        # The vmapped axis arrives in front: one more leading batch dim of the same op.
        return _ffi_cast(kind, x, use_ue8m0), (True, True)

    return partition.partitioned(partition.quant_layout(kind, x.ndim), local,
                                 vmap_rule=vmap_rule, key=(kind, use_ue8m0))(x)


@functools.partial(jax.custom_jvp, nondiff_argnums=(1, 2))
def _per_token(x, use_ue8m0, impl):
    return _run("token", x, use_ue8m0, impl)


@functools.partial(jax.custom_jvp, nondiff_argnums=(1, 2))
def _per_block(x, use_ue8m0, impl):
    return _run("block", x, use_ue8m0, impl)


_per_token.defjvp(_not_differentiable("per_token_cast_to_fp8"))
_per_block.defjvp(_not_differentiable("per_block_cast_to_fp8"))


def _check_flag(op: str, use_ue8m0: object) -> None:
    if not isinstance(use_ue8m0, bool):
        raise TypeError(f"{op}: use_ue8m0 must be a Python bool, got {type(use_ue8m0).__name__}")


def per_token_cast_to_fp8(
    x: jax.Array, *, use_ue8m0: bool = False, implementation: dispatch.Implementation = "auto"
) -> tuple[jax.Array, jax.Array]:
    """Quantizes ``x`` to FP8 with one scale per 1x128 group along the last axis.

    Args:
        x: float32, bfloat16 or float16 ``[..., k]`` (leading dims are batch; typically
            ``[m, k]`` activations). ``k`` need not be a multiple of 128: the last group is partial.
        use_ue8m0: round each scale up to a power of two (UE8M0, as DeepGEMM's SM100 path wants).
        implementation: ``"auto"`` | ``"cuda"`` | ``"cpu"`` | ``"reference"``.

    Returns:
        ``(x_fp8, scales)``: ``x_fp8`` float8_e4m3fn ``[..., k]`` and ``scales`` float32
        ``[..., ceil(k/128)]`` with ``x ≈ x_fp8 * scales`` (per group). A group's scale is
        ``max(amax, 1e-4) / 448``; values are ``x / scale`` rounded to nearest even and saturated
        at ±448. A NaN makes its whole group NaN (bytes 0x7F/0xFF) and its scale NaN.

    Raises:
        TypeError: ``x`` is not a float32/bfloat16/float16 array, or on differentiation.
        ValueError: ``x`` has rank 0, or the implementation cannot run here.
    """
    op = "per_token_cast_to_fp8"
    checks.check_dtype("x", x, checks.FLOAT_INPUTS, op=op)
    checks.check_rank("x", x, op=op, at_least=1, layout="[..., k]")
    _check_flag(op, use_ue8m0)
    impl = dispatch.choose(implementation, op=op, has=_HAS)
    return _per_token(x, use_ue8m0, impl)


def per_block_cast_to_fp8(
    x: jax.Array, *, use_ue8m0: bool = False, implementation: dispatch.Implementation = "auto"
) -> tuple[jax.Array, jax.Array]:
    """Quantizes ``x`` to FP8 with one scale per 128x128 block of the last two axes.

    Args:
        x: float32, bfloat16 or float16 ``[..., m, n]`` (typically a weight ``[n, k]``; leading
            dims are batch, e.g. grouped expert weights ``[G, n, k]``). Partial edge blocks allowed.
        use_ue8m0: round each scale up to a power of two.
        implementation: ``"auto"`` | ``"cuda"`` | ``"cpu"`` | ``"reference"``.

    Returns:
        ``(x_fp8, scales)``: float8_e4m3fn ``[..., m, n]`` and float32
        ``[..., ceil(m/128), ceil(n/128)]``; same scale and rounding rules as per-token.

    Raises:
        TypeError: wrong dtype, or on differentiation.
        ValueError: rank below 2, or the implementation cannot run here.
    """
    op = "per_block_cast_to_fp8"
    checks.check_dtype("x", x, checks.FLOAT_INPUTS, op=op)
    checks.check_rank("x", x, op=op, at_least=2, layout="[..., m, n]")
    _check_flag(op, use_ue8m0)
    impl = dispatch.choose(implementation, op=op, has=_HAS)
    return _per_block(x, use_ue8m0, impl)


def _check_pair(op: str, q: jax.Array, s: jax.Array, expected_s: tuple[int, ...], layout: str) -> None:
    checks.check_dtype("x_fp8", q, (jnp.float8_e4m3fn,), op=op)
    checks.check_dtype("scales", s, (jnp.float32,), op=op)
    checks.check_shape("scales", s, expected_s, op=op, layout=layout)


def dequantize_per_token(x_fp8: jax.Array, scales: jax.Array) -> jax.Array:
    """float32 ``x_fp8 * scales`` for 1x128 scales: ``[..., k]``, ``[..., ceil(k/128)]`` -> ``[..., k]``.

    Pure JAX on every backend (XLA fuses it into its consumer).
    """
    op = "dequantize_per_token"
    checks.check_rank("x_fp8", x_fp8, op=op, at_least=1, layout="[..., k]")
    k = x_fp8.shape[-1]
    _check_pair(op, x_fp8, scales, (*x_fp8.shape[:-1], -(-k // GROUP)), "[..., ceil(k/128)]")
    return reference.dequantize_per_token(x_fp8, scales)


def dequantize_per_block(x_fp8: jax.Array, scales: jax.Array) -> jax.Array:
    """float32 ``x_fp8 * scales`` for 128x128 scales: ``[..., m, n]`` -> ``[..., m, n]``. Pure JAX."""
    op = "dequantize_per_block"
    checks.check_rank("x_fp8", x_fp8, op=op, at_least=2, layout="[..., m, n]")
    m, n = x_fp8.shape[-2:]
    _check_pair(op, x_fp8, scales, (*x_fp8.shape[:-2], -(-m // GROUP), -(-n // GROUP)),
                "[..., ceil(m/128), ceil(n/128)]")
    return reference.dequantize_per_block(x_fp8, scales)
