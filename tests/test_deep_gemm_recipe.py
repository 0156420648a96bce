"""DeepSeek-V3 FP8 training recipe: fp8_linear / fp8_grouped_linear (custom_vjp) and dsjax.nn layers.

Oracle: plain autodiff of the float32 product of the *unquantized* inputs. E4M3 keeps 3 mantissa
bits, so each quantized operand carries ~2.5% RMS relative rounding error and a GEMM of two
quantized operands lands at calc_diff ~6-8e-4 from the exact product on Gaussian data; DeepGEMM's
own tests use the bound 1e-3, and so do we (Fprop, Dgrad and Wgrad alike: each is one such GEMM).
The implementations agree with each other far more tightly (same quantized bytes, f32 accumulation).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from dsjax import deep_gemm as dg
from dsjax._src import ffi
from dsjax._src.testing import calc_diff
from dsjax.nn import Fp8GroupedLinear, Fp8Linear

IMPLS = ["reference", pytest.param("cpu", marks=pytest.mark.skipif(
    ffi.cpu_unavailable_reason() is not None, reason=str(ffi.cpu_unavailable_reason()))),
         pytest.param("cuda", marks=pytest.mark.gpu)]
FP8_BOUND = 1e-3


def _normal(rng, shape, scale=1.0):
    return jnp.asarray(rng.standard_normal(shape, dtype=np.float32) * scale)


def _hi_dot(x, w):
    return jnp.dot(x, w, precision=jax.lax.Precision.HIGHEST)


@pytest.mark.parametrize("impl", IMPLS)
def test_fp8_linear_values_and_gradients(impl):
    rng = np.random.default_rng(0)
    x, w, dy = _normal(rng, (2, 48, 300)), _normal(rng, (300, 200), 0.05), _normal(rng, (2, 48, 200))

    def loss(f):
        return lambda x, w: jnp.sum(f(x, w) * dy)

    fp8 = lambda x, w: dg.fp8_linear(x, w, implementation=impl)  # noqa: E731
    y = jax.jit(fp8)(x, w)
    assert y.shape == (2, 48, 200) and y.dtype == jnp.float32
    assert calc_diff(y, _hi_dot(x, w)) < FP8_BOUND
    gx, gw = jax.jit(jax.grad(loss(fp8), argnums=(0, 1)))(x, w)
    rx, rw = jax.grad(loss(_hi_dot), argnums=(0, 1))(x, w)
    assert gx.shape == x.shape and gw.shape == w.shape
    assert calc_diff(gx, rx) < FP8_BOUND
    assert calc_diff(gw, rw) < FP8_BOUND


@pytest.mark.skipif(ffi.cpu_unavailable_reason() is not None, reason="needs the CPU module")
def test_fp8_linear_cpu_matches_reference_and_keeps_dtypes():
    rng = np.random.default_rng(1)
    x = _normal(rng, (64, 256)).astype(jnp.bfloat16)
    w = _normal(rng, (256, 130), 0.05)  # f32 master weight, bf16 activations
    outs = {}
    for impl in ("reference", "cpu"):
        def f(x, w, impl=impl):
            y, vjp = jax.vjp(lambda x, w: dg.fp8_linear(x, w, implementation=impl), x, w)
            return (y, *vjp(jnp.ones_like(y)))

        y, dx, dw = jax.jit(f)(x, w)
        assert (y.dtype, dx.dtype, dw.dtype) == (jnp.bfloat16, jnp.bfloat16, jnp.float32)
        outs[impl] = [np.asarray(v, np.float32) for v in (y, dx, dw)]
    for ref, cpu in zip(outs["reference"], outs["cpu"]):
        # Same FP8 bytes on both; only f32 summation order differs (then one bf16 rounding).
        np.testing.assert_allclose(cpu, ref, rtol=2 ** -7, atol=1e-5 * np.abs(ref).max())


def _grouped_oracle(x, w, mi):
    y = jnp.einsum("mk,gkn->gmn", x, w, precision=jax.lax.Precision.HIGHEST)
    y = jnp.take_along_axis(y, jnp.clip(mi, 0)[None, :, None], axis=0)[0]
    return jnp.where((mi >= 0)[:, None], y, 0.0)


@pytest.mark.parametrize("impl", IMPLS)
def test_fp8_grouped_linear_values_and_gradients(impl):
    rng = np.random.default_rng(2)
    groups = 4
    # Experts laid out out of order (2, 0, 3), expert 1 empty, an all-padding block in between.
    mi = np.full(128 * 6, -1, np.int32)
    mi[0:100] = 2
    mi[128:256] = 2
    mi[384:390] = 0
    mi[512:700] = 3
    mi = jnp.asarray(mi)
    x, w = _normal(rng, (mi.shape[0], 256)), _normal(rng, (groups, 256, 192), 0.05)
    dy = _normal(rng, (mi.shape[0], 192))
    f = lambda x, w: dg.fp8_grouped_linear(x, w, mi, implementation=impl)  # noqa: E731
    y = jax.jit(f)(x, w)
    assert calc_diff(y, _grouped_oracle(x, w, mi)) < FP8_BOUND
    assert not np.asarray(y)[np.asarray(mi) < 0].any()
    gx, gw = jax.jit(jax.grad(lambda x, w: jnp.sum(f(x, w) * dy), argnums=(0, 1)))(x, w)
    rx, rw = jax.grad(lambda x, w: jnp.sum(_grouped_oracle(x, w, mi) * dy), argnums=(0, 1))(x, w)
    assert calc_diff(gx, rx) < FP8_BOUND
    assert not np.asarray(gx)[np.asarray(mi) < 0].any()  # padding rows get no gradient
    for g in (0, 2, 3):
        assert calc_diff(gw[g], rw[g]) < FP8_BOUND
    assert not np.asarray(gw[1]).any()  # the empty expert's gradient is exactly zero


def test_recipe_errors():
    x, w = jnp.ones((4, 64)), jnp.ones((64, 32))
    with pytest.raises(ValueError, match=r"x's last dim must equal w's first dim \(k\), got x \(4, 64\) and w \(63, 32\)"):
        dg.fp8_linear(x, jnp.ones((63, 32)))
    with pytest.raises(TypeError, match="x must have dtype float32 or bfloat16, got int32"):
        dg.fp8_linear(x.astype(jnp.int32), w)
    with pytest.raises(ValueError, match=r"w must have rank 2 \[k, n\]"):
        dg.fp8_linear(x, jnp.ones((1, 64, 32)))
    with pytest.raises(ValueError, match="multiple of 128 rows .* got m_sum=100"):
        dg.fp8_grouped_linear(jnp.ones((100, 64)), jnp.ones((2, 64, 32)), jnp.zeros((100,), jnp.int32))
    with pytest.raises(ValueError, match=r"m_indices must have shape \(128,\)"):
        dg.fp8_grouped_linear(jnp.ones((128, 64)), jnp.ones((2, 64, 32)), jnp.zeros((127,), jnp.int32))


def test_fp8_linear_is_a_drop_in_for_nnx_linear():
    fp8 = Fp8Linear(96, 40, rngs=nnx.Rngs(0))
    ref = nnx.Linear(96, 40, rngs=nnx.Rngs(0))
    assert fp8.kernel[...].shape == ref.kernel[...].shape and fp8.bias[...].shape == (40,)
    np.testing.assert_array_equal(fp8.kernel[...], ref.kernel[...])  # same default init
    x = _normal(np.random.default_rng(3), (8, 96))
    assert calc_diff(fp8(x), ref(x)) < FP8_BOUND
    experts = Fp8GroupedLinear(3, 96, 40, rngs=nnx.Rngs(1))
    mi = jnp.repeat(jnp.asarray([1, -1], jnp.int32), 128)
    y = experts(_normal(np.random.default_rng(4), (256, 96)), mi)
    assert y.shape == (256, 40) and not np.asarray(y[128:]).any()


class _MLP(nnx.Module):
    def __init__(self, linear, dtype, rngs):
        self.l1 = linear(128, 256, dtype=dtype, rngs=rngs)
        self.l2 = linear(256, 128, dtype=dtype, rngs=rngs)
        self.l3 = linear(128, 64, dtype=dtype, rngs=rngs)

    def __call__(self, x):
        h = jax.nn.gelu(self.l2(jax.nn.gelu(self.l1(x))))
        return self.l3(h).astype(jnp.float32)


def test_mlp_200_steps_fp8_within_one_percent_of_bf16():
    """Online regression (fresh batch each step, held-out evaluation), noise sigma 0.5: both runs
    must learn (held-out loss at most 0.5x its initial value) and end within 1% of each other."""
    rng = np.random.default_rng(0)
    teacher = rng.standard_normal((128, 64)).astype(np.float32) / np.sqrt(128)

    def data(n):
        x = rng.standard_normal((n, 128)).astype(np.float32)
        return x, np.tanh(x @ teacher * 2) + 0.5 * rng.standard_normal((n, 64)).astype(np.float32)

    steps, batch = 200, 128
    xtr, ytr = data(steps * batch)
    xte, yte = data(2048)

    def train(linear):
        model = _MLP(linear, jnp.bfloat16, nnx.Rngs(0))
        opt = nnx.Optimizer(model, optax.adam(optax.cosine_decay_schedule(3e-3, steps)),
                            wrt=nnx.Param)

        @nnx.jit
        def step(model, opt, x, y):
            loss, grads = nnx.value_and_grad(lambda m: jnp.mean((m(x) - y) ** 2))(model)
            opt.update(model, grads)
            return loss

        evaluate = lambda: float(jnp.mean((model(jnp.asarray(xte)) - yte) ** 2))  # noqa: E731
        first = evaluate()
        for i in range(steps):
            step(model, opt, xtr[i * batch:(i + 1) * batch], ytr[i * batch:(i + 1) * batch])
        return first, evaluate()

    f8_first, f8_last = train(Fp8Linear)
    bf_first, bf_last = train(nnx.Linear)
    assert f8_last < 0.5 * f8_first and bf_last < 0.5 * bf_first
    assert abs(f8_last - bf_last) / bf_last < 0.01, (f8_last, bf_last)


def test_fp8_linear_under_shard_map_data_parallel():
    """Rows sharded over 4 devices: Fprop quantizes per row, so y equals the unsharded y exactly;
    Wgrad quantizes xᵀ per 128-row group of each shard, so dw (psum'd) is checked against f32."""
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    shard_map = getattr(jax, "shard_map", None)
    if shard_map is None:  # older JAX
        from jax.experimental.shard_map import shard_map
    mesh = Mesh(np.array(jax.devices()[:4]), ("data",))
    rng = np.random.default_rng(5)
    x, w, dy = _normal(rng, (512, 256)), _normal(rng, (256, 192), 0.05), _normal(rng, (512, 192))
    xs = jax.device_put(x, NamedSharding(mesh, P("data")))
    dys = jax.device_put(dy, NamedSharding(mesh, P("data")))

    def local(x, w, dy):
        y, vjp = jax.vjp(lambda x, w: dg.fp8_linear(x, w), x, w)
        dx, dw = vjp(dy)
        return y, dx, jax.lax.psum(dw, "data")

    # FFI custom calls do not annotate their outputs as varying over the mesh axis, so the
    # varying-manual-axes check is off (the psum makes dw replicated by construction).
    kw = {"check_vma": False} if hasattr(jax, "shard_map") else {"check_rep": False}
    f = jax.jit(shard_map(local, mesh=mesh, in_specs=(P("data"), P(), P("data")),
                          out_specs=(P("data"), P("data"), P()), **kw))
    y, dx, dw = f(xs, w, dys)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(jax.jit(dg.fp8_linear)(x, w)))
    assert calc_diff(dx, _hi_dot(dy, w.T)) < FP8_BOUND
    assert calc_diff(dw, _hi_dot(x.T, dy)) < FP8_BOUND
