"""FP8 quantizers: bit-exact parity of every implementation with the reference, semantics
checked independently against NumPy/ml_dtypes, edge cases, transformations and bad input."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from dsjax import backends
from dsjax.deep_gemm import (
    dequantize_per_block,
    dequantize_per_token,
    per_block_cast_to_fp8,
    per_token_cast_to_fp8,
)
from dsjax._src.testing import fp8_bytes

CPU_OK = backends()["cpu"]
needs_cpu = pytest.mark.skipif(not CPU_OK, reason=f"CPU FFI module not built: {backends()['reasons'].get('cpu')}")
CAST = {"token": per_token_cast_to_fp8, "block": per_block_cast_to_fp8}


def _numpy_token(x: np.ndarray, ue8m0: bool) -> tuple[np.ndarray, np.ndarray]:
    """Independent NumPy statement of DeepGEMM's per-token cast (scale by true division,
    values times the f32 reciprocal, ml_dtypes' RNE cast)."""
    x = x.astype(np.float32)
    k = x.shape[-1]
    g = -(-k // 128)
    xp = np.zeros((*x.shape[:-1], g * 128), np.float32)
    xp[..., :k] = x
    xv = xp.reshape(*x.shape[:-1], g, 128)
    amax = np.abs(xv).max(-1)
    s = np.maximum(amax, np.float32(1e-4)) / np.float32(448)
    if ue8m0:
        s = np.exp2(np.ceil(np.log2(s.astype(np.float64)))).astype(np.float32)
    y = xv * (np.float32(1) / s)[..., None]
    q = np.clip(y, -448, 448).astype(ml_dtypes.float8_e4m3fn).reshape(*x.shape[:-1], g * 128)[..., :k]
    return q, s.astype(np.float32)


def _same(a, b) -> None:
    qa, sa = a
    qb, sb = b
    np.testing.assert_array_equal(fp8_bytes(qa), fp8_bytes(qb))
    np.testing.assert_array_equal(np.asarray(sa), np.asarray(sb))


def _impls() -> list[str]:
    out = ["reference"]
    if CPU_OK:
        out.append("cpu")
    return out


CASES = [
    # (kind, shape, dtype)
    ("token", (4, 128), jnp.float32),
    ("token", (7, 300), jnp.bfloat16),      # partial last group
    ("token", (3, 5, 1000), jnp.float16),   # leading batch dims
    ("token", (2, 1), jnp.float32),         # a single element per row
    ("token", (1, 7168), jnp.bfloat16),
    ("block", (128, 128), jnp.float32),
    ("block", (130, 260), jnp.bfloat16),    # partial blocks in both dims
    ("block", (3, 200, 129), jnp.float16),  # batch of blocks
    ("block", (1, 1), jnp.float32),
]


def _random(shape, dtype, seed=0) -> jax.Array:
    rng = np.random.default_rng(seed)
    # Mix magnitudes per row so groups see very different scales (1e-7 .. 1e4).
    mag = 10.0 ** rng.integers(-7, 5, size=shape[:-1] + (1,))
    return jnp.asarray(rng.standard_normal(shape) * mag, dtype)


@needs_cpu
@pytest.mark.parametrize("use_ue8m0", [False, True])
@pytest.mark.parametrize("kind,shape,dtype", CASES)
def test_cpu_bit_identical_to_reference(kind, shape, dtype, use_ue8m0):
    x = _random(shape, dtype)
    fn = CAST[kind]
    ref = jax.jit(functools.partial(fn, use_ue8m0=use_ue8m0, implementation="reference"))(x)
    got = fn(x, use_ue8m0=use_ue8m0, implementation="cpu")
    _same(ref, got)


@pytest.mark.parametrize("impl", _impls())
@pytest.mark.parametrize("use_ue8m0", [False, True])
def test_per_token_matches_numpy_statement(impl, use_ue8m0):
    x = np.asarray(_random((6, 520), jnp.float32, seed=3))
    q, s = per_token_cast_to_fp8(jnp.asarray(x), use_ue8m0=use_ue8m0, implementation=impl)
    q_np, s_np = _numpy_token(x, use_ue8m0)
    np.testing.assert_array_equal(np.asarray(s), s_np)
    np.testing.assert_array_equal(fp8_bytes(q), q_np.view(np.uint8))


@pytest.mark.parametrize("impl", _impls())
def test_per_block_scale_is_block_amax(impl):
    x = np.asarray(_random((200, 300), jnp.float32, seed=4))
    _, s = per_block_cast_to_fp8(jnp.asarray(x), implementation=impl)
    for i in range(2):
        for j in range(3):
            blk = x[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128]
            want = np.maximum(np.abs(blk).max(), np.float32(1e-4)) / np.float32(448)
            assert np.asarray(s)[i, j] == np.float32(want)


@pytest.mark.parametrize("impl", _impls())
@pytest.mark.parametrize("kind", ["token", "block"])
def test_edge_values(impl, kind):
    x = np.zeros((4, 256), np.float32)
    x[1, :128] = 1e-6           # tiny: amax under the 1e-4 clamp
    x[1, 128:] = -3e-5
    x[2, :] = np.linspace(-1e4, 1e4, 256)  # large dynamic range inside a group
    x[3, 5] = 448.0 * 3        # the group max maps exactly to +-448
    x[3, 6] = -448.0 * 3
    q, s = CAST[kind](jnp.asarray(x), implementation=impl)
    qf = np.asarray(q).astype(np.float32)
    s = np.asarray(s)
    assert np.all(np.isfinite(qf)) and np.abs(qf).max() <= 448.0
    if kind == "token":
        assert np.all(qf[0] == 0) and np.all(s[0] == np.float32(1e-4) / np.float32(448))
        assert s[1, 0] == np.float32(1e-4) / np.float32(448)       # clamped
        assert qf[3, 5] == 448.0 and qf[3, 6] == -448.0
    deq = (dequantize_per_token(q, jnp.asarray(s)) if kind == "token"
           else dequantize_per_block(q, jnp.asarray(s)))
    # E4M3 keeps 3 mantissa bits: relative error <= 2^-4 for values in the normal range of the group.
    big = np.abs(x) >= np.repeat(s, 128, axis=-1)[:, :256] * 2.0**-6 * 448 if kind == "token" else None
    if big is not None:
        rel = np.abs(np.asarray(deq) - x)[big] / np.abs(x)[big]
        assert rel.max() <= 2.0**-4


@pytest.mark.parametrize("impl", _impls())
def test_nan_and_inf_groups(impl):
    x = np.ones((2, 384), np.float32)
    x[0, 130] = np.nan  # group 1 of row 0
    x[1, 3] = np.inf    # group 0 of row 1
    q, s = per_token_cast_to_fp8(jnp.asarray(x), implementation=impl)
    qf, s = np.asarray(q).astype(np.float32), np.asarray(s)
    assert np.isnan(s[0, 1]) and np.all(np.isnan(qf[0, 128:256]))
    assert np.all(np.isfinite(qf[0, :128])) and np.all(np.isfinite(qf[0, 256:]))
    assert np.isinf(s[1, 0]) and np.isnan(qf[1, 3]) and np.all(qf[1, :3] == 0)
    assert np.all(qf[1, 128:] == 448.0)


@pytest.mark.parametrize("impl", _impls())
def test_ue8m0_scales_are_powers_of_two_at_least_the_exact_scale(impl):
    x = _random((16, 512), jnp.bfloat16, seed=7)
    _, s_exact = per_token_cast_to_fp8(x, implementation=impl)
    _, s = per_token_cast_to_fp8(x, use_ue8m0=True, implementation=impl)
    s, s_exact = np.asarray(s), np.asarray(s_exact)
    mant, _ = np.frexp(s)
    assert np.all(mant == 0.5)
    assert np.all(s >= s_exact) and np.all(s < 2 * s_exact)


@pytest.mark.parametrize("impl", _impls())
def test_round_to_nearest_even_at_midpoints(impl):
    # With scale 1 (amax 448) values sit exactly on E4M3 midpoints. In [8, 16) the step is 1:
    # 8.5 ties to 8 (even mantissa), 9.5 to 10; in [16, 32) the step is 2: 17 -> 16, 19 -> 20.
    # Just above a midpoint rounds up: 8.5001 -> 9.
    x = np.zeros((1, 128), np.float32)
    x[0, :7] = [448.0, 8.5, 9.5, 17.0, 19.0, 8.5001, -8.5]
    q, s = per_token_cast_to_fp8(jnp.asarray(x), implementation=impl)
    assert np.asarray(s)[0, 0] == 1.0
    np.testing.assert_array_equal(np.asarray(q).astype(np.float32)[0, :7], [448.0, 8.0, 10.0, 16.0, 20.0, 9.0, -8.0])


@pytest.mark.parametrize("impl", _impls())
def test_empty_inputs(impl):
    q, s = per_token_cast_to_fp8(jnp.zeros((0, 256), jnp.float32), implementation=impl)
    assert q.shape == (0, 256) and s.shape == (0, 2)
    q, s = per_block_cast_to_fp8(jnp.zeros((0, 256), jnp.bfloat16), implementation=impl)
    assert q.shape == (0, 256) and s.shape == (0, 2)


@needs_cpu
def test_vmap_matches_batched_call():
    x = _random((3, 8, 300), jnp.bfloat16, seed=11)
    for kind in ("token", "block"):
        fn = functools.partial(CAST[kind], implementation="cpu")
        _same(jax.vmap(fn)(x), fn(x))
        _same(jax.jit(jax.vmap(fn))(x), CAST[kind](x, implementation="reference"))


@needs_cpu
def test_shard_map_over_rows():
    devs = np.array(jax.devices()[:8])
    mesh = jax.sharding.Mesh(devs, ("x",))
    spec = jax.sharding.PartitionSpec("x")
    x = jax.device_put(_random((64, 384), jnp.float32, seed=12), jax.sharding.NamedSharding(mesh, spec))
    fn = jax.jit(jax.shard_map(functools.partial(per_token_cast_to_fp8, implementation="cpu"),
                               mesh=mesh, in_specs=spec, out_specs=(spec, spec)))
    _same(fn(x), per_token_cast_to_fp8(x, implementation="reference"))


@pytest.mark.parametrize("impl", _impls())
def test_not_differentiable(impl):
    x = jnp.ones((2, 128), jnp.float32)
    with pytest.raises(TypeError, match="per_token_cast_to_fp8 is not differentiable"):
        jax.grad(lambda x: per_token_cast_to_fp8(x, implementation=impl)[1].sum())(x)
    with pytest.raises(TypeError, match="per_block_cast_to_fp8 is not differentiable"):
        jax.grad(lambda x: per_block_cast_to_fp8(x, implementation=impl)[1].sum())(x)


def test_bad_input_messages():
    with pytest.raises(TypeError, match=r"per_token_cast_to_fp8: x must have dtype float32 or bfloat16 or float16, got int32"):
        per_token_cast_to_fp8(jnp.ones((2, 128), jnp.int32))
    with pytest.raises(ValueError, match=r"per_token_cast_to_fp8: x must have rank >= 1 \[..., k\], got shape \(\)"):
        per_token_cast_to_fp8(jnp.float32(1.0))
    with pytest.raises(ValueError, match=r"per_block_cast_to_fp8: x must have rank >= 2 \[..., m, n\], got shape \(5,\)"):
        per_block_cast_to_fp8(jnp.ones((5,), jnp.float32))
    with pytest.raises(TypeError, match="x must be an array, got list"):
        per_token_cast_to_fp8([1.0, 2.0])
    with pytest.raises(TypeError, match="use_ue8m0 must be a Python bool, got int"):
        per_token_cast_to_fp8(jnp.ones((2, 128)), use_ue8m0=1)
    q, s = per_token_cast_to_fp8(jnp.ones((2, 300)), implementation="reference")
    with pytest.raises(ValueError, match=r"dequantize_per_token: scales must have shape \(2, 3\)"):
        dequantize_per_token(q, s[:, :2])
    with pytest.raises(TypeError, match="dequantize_per_token: x_fp8 must have dtype float8_e4m3fn, got float32"):
        dequantize_per_token(q.astype(jnp.float32), s)


def test_dequantize_round_trip_error_bound():
    x = _random((32, 640), jnp.float32, seed=5)
    for kind, deq in (("token", dequantize_per_token), ("block", dequantize_per_block)):
        q, s = CAST[kind](x, implementation="reference")
        back = np.asarray(deq(q, s))
        # |x - deq| <= half an E4M3 step at 448 scaled down: 16 * scale (step 32 at the top binade),
        # and relative 2^-4 in the normal range; check the absolute bound per element.
        scale = np.asarray(s)
        if kind == "token":
            full = np.repeat(scale, 128, axis=-1)[:, :640]
        else:
            full = np.repeat(np.repeat(scale, 128, 0), 128, 1)[:32, :640]
        assert np.all(np.abs(back - np.asarray(x)) <= 16.0 * full)
