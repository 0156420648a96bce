"""FFI wrappers of the FP8 quantizers (CPU twin and CUDA), shape inference and batching."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dsjax._src import ffi

GROUP = 128


def per_token_cast_to_fp8(x: jax.Array, use_ue8m0: bool) -> tuple[jax.Array, jax.Array]:
    k = x.shape[-1]
    out = (
        jax.ShapeDtypeStruct(x.shape, jnp.float8_e4m3fn),
        jax.ShapeDtypeStruct((*x.shape[:-1], -(-k // GROUP)), jnp.float32),
    )
    # Leading dims are batch dims for the kernel, so vmap just adds one.
    return tuple(ffi.call("dsjax_deep_gemm_per_token_cast_to_fp8", out, x,
                          vmap_method="broadcast_all", use_ue8m0=bool(use_ue8m0)))


def per_block_cast_to_fp8(x: jax.Array, use_ue8m0: bool) -> tuple[jax.Array, jax.Array]:
    m, n = x.shape[-2:]
    out = (
        jax.ShapeDtypeStruct(x.shape, jnp.float8_e4m3fn),
        jax.ShapeDtypeStruct((*x.shape[:-2], -(-m // GROUP), -(-n // GROUP)), jnp.float32),
    )
    return tuple(ffi.call("dsjax_deep_gemm_per_block_cast_to_fp8", out, x,
                          vmap_method="broadcast_all", use_ue8m0=bool(use_ue8m0)))
