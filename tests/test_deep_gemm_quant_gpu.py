"""CUDA quantizers (marker gpu): bit-identical to the reference evaluated on the CPU.

The reference is run on the CPU backend so that the expected bytes do not depend on how XLA:GPU
schedules the same arithmetic; the CUDA kernel uses the encoding helpers shared with the CPU twin.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsjax.deep_gemm import per_block_cast_to_fp8, per_token_cast_to_fp8
from dsjax._src.testing import fp8_bytes

pytestmark = pytest.mark.gpu

CASES = [
    ("token", (4096, 7168), jnp.bfloat16),
    ("token", (7, 300), jnp.float32),
    ("token", (3, 5, 1000), jnp.float16),
    ("block", (7168, 2048), jnp.bfloat16),
    ("block", (130, 260), jnp.float32),
    ("block", (4, 200, 129), jnp.float16),
]


def _reference_on_cpu(fn, x_np, ue8m0):
    cpu = jax.devices("cpu")[0]
    with jax.default_device(cpu):
        q, s = jax.jit(functools.partial(fn, use_ue8m0=ue8m0, implementation="reference"))(
            jax.device_put(x_np, cpu))
    return fp8_bytes(q), np.asarray(s)


@pytest.mark.parametrize("use_ue8m0", [False, True])
@pytest.mark.parametrize("kind,shape,dtype", CASES)
def test_cuda_bit_identical(kind, shape, dtype, use_ue8m0):
    rng = np.random.default_rng(0)
    x_np = (rng.standard_normal(shape) * 10.0 ** rng.integers(-6, 4, size=shape[:-1] + (1,))).astype(
        jnp.dtype(dtype))
    x_np.flat[::997] = 0.0
    fn = per_token_cast_to_fp8 if kind == "token" else per_block_cast_to_fp8
    q, s = jax.jit(functools.partial(fn, use_ue8m0=use_ue8m0, implementation="cuda"))(jnp.asarray(x_np))
    q_ref, s_ref = _reference_on_cpu(fn, x_np, use_ue8m0)
    np.testing.assert_array_equal(np.asarray(s), s_ref)
    np.testing.assert_array_equal(fp8_bytes(q), q_ref)


def test_cuda_nan_group_and_auto_choice():
    x = np.ones((2, 256), np.float32)
    x[1, 200] = np.nan
    q, s = per_token_cast_to_fp8(jnp.asarray(x))  # auto -> cuda on an NVIDIA GPU
    qf = np.asarray(q).astype(np.float32)
    assert np.isnan(np.asarray(s)[1, 1]) and np.all(np.isnan(qf[1, 128:]))
    assert np.all(qf[0] == 448.0)


def test_cuda_vmap():
    x = jnp.asarray(np.random.default_rng(1).standard_normal((3, 64, 384)), jnp.bfloat16)
    f = functools.partial(per_token_cast_to_fp8, implementation="cuda")
    q1, s1 = jax.vmap(f)(x)
    q2, s2 = f(x)
    np.testing.assert_array_equal(fp8_bytes(q1), fp8_bytes(q2))
    np.testing.assert_array_equal(np.asarray(s1), np.asarray(s2))
