"""DeepGEMM's custom calls under ``jax.jit`` with sharded operands (dsjax.deep_gemm.partition).

Every op runs once unsharded and once jit'ed over a mesh of the 8 host CPU devices with sharded
inputs. Where each shard computes exactly the unsharded rows/columns/groups (rows, groups,
128-aligned ``n`` and block dims), the result must be bit-identical and the compiled HLO must
contain no collective at all, and the custom call must see the per-device shape (so no device
runs the whole problem). A sharded contraction dim is summed per shard and all-reduced: the only
collective is that all-reduce, and the result equals the unsharded one up to float32 summation
order: |diff| <= 1e-5 * max|out| (K/128 <= 16 block partials summed in another order, each
rounding ~2^-24 relative: 16 * 6e-8 ~ 1e-6, 10x margin). A layout the math does not allow
(a 128-block straddling two shards, the k-grouped GEMM's K) is gathered: still bit-identical.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from dsjax import deep_gemm as dg
from dsjax._src import ffi

pytestmark = pytest.mark.skipif(ffi.cpu_unavailable_reason() is not None,
                                reason=str(ffi.cpu_unavailable_reason()))

COLLECTIVES = ("all-gather", "all-reduce", "all-to-all", "collective-permute", "reduce-scatter")
ORDER = 1e-5  # float32 summation order of per-shard partial sums, see the module docstring


@pytest.fixture(scope="module")
def mesh8():
    return Mesh(np.array(jax.devices()[:8]), ("x",))


@pytest.fixture(scope="module")
def mesh24():
    return Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("dp", "tp"))


def _rand(seed: int, shape, scale: float = 1.0) -> jax.Array:
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape, np.float32) * scale)


def _tok(x):
    return dg.per_token_cast_to_fp8(x, implementation="cpu")


def _blk(x):
    return dg.per_block_cast_to_fp8(x, implementation="cpu")


def _sharded(fn, args, specs, mesh):
    """(result, compiled HLO text) of jit(fn) on ``args`` placed with ``specs`` over ``mesh``."""
    placed = jax.tree.map(lambda a, s: jax.device_put(a, NamedSharding(mesh, s)), args, specs,
                          is_leaf=lambda s: isinstance(s, P))
    f = jax.jit(fn)
    return f(*placed), f.lower(*placed).compile().as_text()


def _bits(x) -> np.ndarray:
    x = np.asarray(x)
    return x.view(np.uint8) if x.dtype.itemsize == 1 else x.view(f"u{x.dtype.itemsize}")


def _same(a, b) -> None:
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert x.shape == y.shape and x.dtype == y.dtype
        np.testing.assert_array_equal(_bits(x), _bits(y))


def _collectives(hlo: str) -> list[str]:
    return [ln.strip() for ln in hlo.splitlines()
            if any(re.search(rf"\b{c}(-start)?\(", ln) for c in COLLECTIVES)]


def _call_shapes(hlo: str, target: str) -> list[str]:
    """Result shapes of every custom call to ``target`` in the compiled HLO."""
    out = []
    for ln in hlo.splitlines():
        if f'custom_call_target="{target}"' in ln:
            out.append(ln.split("=", 1)[1].split("custom-call(")[0].strip())
    assert out, f"no custom call to {target}"
    return out


def _close(x, y) -> None:
    x, y = np.asarray(x, np.float32), np.asarray(y, np.float32)
    assert np.abs(x - y).max() <= ORDER * np.abs(y).max()


# ------------------------------------------------------------------ quantizers


@pytest.mark.parametrize("shape,spec,local,free", [
    ((256, 384), P("x"), "[32,384]", True),                 # rows
    ((4, 64, 256), P(None, "x"), "[4,8,256]", True),        # a batch dim
    ((16, 1024), P(None, "x"), "[16,128]", True),           # k in whole 128-groups per shard
    ((16, 512), P(None, "x"), "[16,512]", False),           # 64 per shard: groups would straddle
])
def test_per_token_cast_sharded(mesh8, shape, spec, local, free):
    x = _rand(0, shape)
    out, hlo = _sharded(_tok, (x,), (spec,), mesh8)
    _same(out, jax.jit(_tok)(x))
    assert all(s.startswith(f"(f8e4m3fn{local}")
               for s in _call_shapes(hlo, "dsjax_deep_gemm_per_token_cast_to_fp8"))
    assert (not _collectives(hlo)) == free


@pytest.mark.parametrize("shape,spec,mesh,free", [
    ((1024, 200), P("x"), "mesh8", True),                   # 128 rows per shard, ragged n
    ((256, 512), P("dp", "tp"), "mesh24", True),            # 128x128 per shard
    ((4, 256, 512), P("dp", None, "tp"), "mesh24", True),   # grouped weights
    ((512, 256), P("x"), "mesh8", False),                   # 64 rows per shard: gathered
])
def test_per_block_cast_sharded(request, shape, spec, mesh, free):
    x = _rand(1, shape)
    out, hlo = _sharded(_blk, (x,), (spec,), request.getfixturevalue(mesh))
    _same(out, jax.jit(_blk)(x))
    assert (not _collectives(hlo)) == free


# ------------------------------------------------------------------ GEMMs


def _gemm(a, b, c=None, out_dtype=jnp.bfloat16):
    return dg.fp8_gemm_nt(_tok(a), _blk(b), c=c, out_dtype=out_dtype, implementation="cpu")


@pytest.mark.parametrize("out_dtype", [jnp.bfloat16, jnp.float32])
def test_fp8_gemm_nt_rows_and_columns(mesh24, out_dtype):
    """m over dp, n over tp in 128-row blocks of b (and c), quantized inside the jit."""
    a, b, c = _rand(2, (64, 384)), _rand(3, (512, 384)), _rand(4, (64, 512))
    fn = lambda a, b, c: _gemm(a, b, c, out_dtype)  # noqa: E731
    out, hlo = _sharded(fn, (a, b, c), (P("dp"), P("tp"), P("dp", "tp")), mesh24)
    _same(out, jax.jit(fn)(a, b, c))
    assert not _collectives(hlo)
    dt = "bf16" if out_dtype == jnp.bfloat16 else "f32"
    assert _call_shapes(hlo, "dsjax_deep_gemm_fp8_gemm_nt") == [f"{dt}[32,128]{{1,0}}"]


def test_fp8_gemm_nt_batch_sharded_weight_replicated(mesh8):
    a, b = _rand(5, (256, 256)), _rand(6, (200, 256))      # n=200: b's blocks stay whole
    out, hlo = _sharded(_gemm, (a, b), (P("x"), P()), mesh8)
    _same(out, jax.jit(_gemm)(a, b))
    assert not _collectives(hlo)


def test_fp8_gemm_nt_unaligned_n_is_gathered(mesh24):
    """n = 256 over 4 shards is 64 rows of b per shard, inside one 128-row scale block: the rule
    replicates n instead (still no gather of the row-sharded a)."""
    a, b = _rand(7, (64, 256)), _rand(8, (256, 256))
    out, hlo = _sharded(_gemm, (a, b), (P("dp"), P("tp")), mesh24)
    _same(out, jax.jit(_gemm)(a, b))
    assert _call_shapes(hlo, "dsjax_deep_gemm_fp8_gemm_nt") == ["bf16[32,256]{1,0}"]


@pytest.mark.parametrize("with_c", [False, True])
def test_fp8_gemm_nt_k_sharded_reduces(mesh8, with_c):
    """k over 8 shards of 128: per-shard f32 partial products, one all-reduce of the output."""
    a, b, c = _rand(9, (64, 1024)), _rand(10, (96, 1024)), _rand(11, (64, 96))
    aq, bq = jax.jit(_tok)(a), jax.jit(_blk)(b)
    fn = lambda aq, bq, c: dg.fp8_gemm_nt(aq, bq, c=c if with_c else None,  # noqa: E731
                                          out_dtype=jnp.float32, implementation="cpu")
    spec = (P(None, "x"), P(None, "x"))
    out, hlo = _sharded(fn, (aq, bq, c), (spec, spec, P()), mesh8)
    _close(out, jax.jit(fn)(aq, bq, c))
    coll = _collectives(hlo)
    assert len(coll) == 1 and "all-reduce" in coll[0] and "f32[64,96]" in coll[0], coll
    assert _call_shapes(hlo, "dsjax_deep_gemm_fp8_gemm_nt") == ["f32[64,96]{1,0}"]


def test_fp8_gemm_nt_k_unaligned_is_gathered(mesh8):
    """k = 512 over 8 shards would cut the 1x128 scale groups: gathered, bit-identical."""
    a, b = _rand(12, (32, 512)), _rand(13, (64, 512))
    aq, bq = jax.jit(_tok)(a), jax.jit(_blk)(b)
    fn = lambda aq, bq: dg.fp8_gemm_nt(aq, bq, implementation="cpu")  # noqa: E731
    spec = (P(None, "x"), P())  # 4 scale groups cannot split 8 ways; the values can
    out, _ = _sharded(fn, (aq, bq), (spec, spec), mesh8)
    _same(out, jax.jit(fn)(aq, bq))


def test_fp8_gemm_nt_1d1d_rows_columns_and_k(mesh24, mesh8):
    """Per-row b scales: n shards at any size (96 / 4 = 24); k (the Wgrad token axis) reduces."""
    a, b, c = _rand(14, (64, 256)), _rand(15, (96, 256)), _rand(16, (64, 96))
    fn = lambda a, b, c: dg.fp8_gemm_nt_1d1d(_tok(a), _tok(b), c=c,  # noqa: E731
                                             implementation="cpu")
    out, hlo = _sharded(fn, (a, b, c), (P("dp"), P("tp"), P("dp", "tp")), mesh24)
    _same(out, jax.jit(fn)(a, b, c))
    assert not _collectives(hlo)
    assert _call_shapes(hlo, "dsjax_deep_gemm_fp8_gemm_nt") == ["f32[32,24]{1,0}"]

    a, b = _rand(17, (64, 1024)), _rand(18, (96, 1024))
    out, hlo = _sharded(fn, (a, b, c), (P(None, "x"), P(None, "x"), P()), mesh8)
    _close(out, jax.jit(fn)(a, b, c))
    assert all("all-reduce" in ln for ln in _collectives(hlo))


def test_m_grouped_masked_by_group(mesh8):
    g, m_max, n, k = 8, 32, 256, 256
    a, b = _rand(19, (g, m_max, k)), _rand(20, (g, n, k))
    masked = jnp.asarray([0, 32, 5, 17, 1, 31, 0, 8], jnp.int32)
    fn = lambda a, b, mm: dg.m_grouped_fp8_gemm_nt_masked(  # noqa: E731
        _tok(a), _blk(b), mm, 16, implementation="cpu")
    out, hlo = _sharded(fn, (a, b, masked), (P("x"), P("x"), P("x")), mesh8)
    _same(out, jax.jit(fn)(a, b, masked))
    assert not _collectives(hlo)
    assert _call_shapes(hlo, "dsjax_deep_gemm_m_grouped_fp8_gemm_nt_masked") == [
        "bf16[1,32,256]{2,1,0}"]


def test_m_grouped_masked_rows_are_not_split(mesh8):
    """Splitting m_max would shift each shard's rows against masked_m: the rule keeps it whole."""
    a, b = _rand(21, (2, 64, 128)), _rand(22, (2, 128, 128))
    masked = jnp.asarray([40, 3], jnp.int32)
    fn = lambda a, b, mm: dg.m_grouped_fp8_gemm_nt_masked(  # noqa: E731
        _tok(a), _blk(b), mm, 16, implementation="cpu")
    out, _ = _sharded(fn, (a, b, masked), (P(None, "x"), P(), P()), mesh8)
    _same(out, jax.jit(fn)(a, b, masked))


def test_m_grouped_contiguous_by_row_blocks(mesh8):
    """1024 rows in 128-row blocks over 8 shards; any block may use any group (b replicated)."""
    a, b = _rand(23, (1024, 256)), _rand(24, (3, 128, 256))
    m_idx = jnp.asarray(np.repeat(np.array([0, 2, -1, 1, 1, 0, 2, -1], np.int32), 128))
    fn = lambda a, b, mi: dg.m_grouped_fp8_gemm_nt_contiguous(  # noqa: E731
        _tok(a), _blk(b), mi, implementation="cpu")
    out, hlo = _sharded(fn, (a, b, m_idx), (P("x"), P(), P("x")), mesh8)
    _same(out, jax.jit(fn)(a, b, m_idx))
    assert not _collectives(hlo)
    assert _call_shapes(hlo, "dsjax_deep_gemm_m_grouped_fp8_gemm_nt_contiguous") == [
        "bf16[128,128]{1,0}"]


def test_k_grouped_rows_columns_and_gathered_k(mesh24, mesh8):
    m, n, kk = 64, 96, 512
    a, b, c = _rand(25, (m, kk)), _rand(26, (n, kk)), _rand(27, (3, m, n))
    gks = jnp.asarray([128, 0, 256], jnp.int32)
    fn = lambda a, b, gk, c: dg.k_grouped_fp8_gemm_nt_contiguous(  # noqa: E731
        _tok(a), _tok(b), gk, c=c, implementation="cpu")
    ref = jax.jit(fn)(a, b, gks, c)
    out, hlo = _sharded(fn, (a, b, gks, c), (P("dp"), P("tp"), P(), P(None, "dp", "tp")), mesh24)
    _same(out, ref)
    assert not _collectives(hlo)
    # K holds the groups' offsets: a K-sharded input is gathered, never summed wrongly.
    out, _ = _sharded(fn, (a, b, gks, c), (P(None, "x"), P(None, "x"), P(), P()), mesh8)
    _same(out, ref)


def test_vmap_of_partitioned_ops_under_sharding(mesh8):
    x = _rand(28, (8, 16, 256))
    fn = jax.vmap(_tok)
    out, hlo = _sharded(fn, (x,), (P("x"),), mesh8)
    _same(out, jax.jit(fn)(x))
    assert not _collectives(hlo)


# ------------------------------------------------------------------ the FP8 training recipe


def _fwd_bwd(x, w, dy):
    y, vjp = jax.vjp(lambda x, w: dg.fp8_linear(x, w, implementation="cpu"), x, w)
    return (y, *vjp(dy))


def test_fp8_linear_batch_sharded_under_jit(mesh8):
    """8 x 128 tokens over 8 devices, replicated weight: Fprop and Dgrad bit-identical, Wgrad
    all-reduced (the one collective: the f32 [k, n] weight gradient), no gather anywhere."""
    x, w, dy = _rand(30, (8, 128, 256)), _rand(31, (256, 192), 0.05), _rand(32, (8, 128, 192))
    (y, dx, dw), hlo = _sharded(_fwd_bwd, (x, w, dy), (P("x"), P(), P("x")), mesh8)
    y1, dx1, dw1 = jax.jit(_fwd_bwd)(x, w, dy)
    _same((y, dx), (y1, dx1))
    _close(dw, dw1)
    coll = _collectives(hlo)
    assert len(coll) == 1 and "all-reduce" in coll[0] and "f32[256,192]" in coll[0], coll
    assert {s.split("{")[0] for s in _call_shapes(hlo, "dsjax_deep_gemm_fp8_gemm_nt")} == {
        "f32[128,192]", "f32[128,256]", "f32[256,192]"}  # Fprop, Dgrad per shard; Wgrad partial
    assert y.sharding.spec[0] == "x" and dx.sharding.spec[0] == "x"


def test_fp8_linear_unaligned_batch_forward_stays_local(mesh8):
    """40 tokens per device: Fprop and Dgrad still run per shard without communication; Wgrad's
    tiles along the tokens would straddle devices, so its operands are gathered (same answer)."""
    x, w, dy = _rand(33, (8, 40, 256)), _rand(34, (256, 192), 0.05), _rand(35, (8, 40, 192))
    fwd = lambda x, w: dg.fp8_linear(x, w, implementation="cpu")  # noqa: E731
    y, hlo = _sharded(fwd, (x, w), (P("x"), P()), mesh8)
    _same(y, jax.jit(fwd)(x, w))
    assert not _collectives(hlo)
    (y, dx, dw), _ = _sharded(_fwd_bwd, (x, w, dy), (P("x"), P(), P("x")), mesh8)
    y1, dx1, dw1 = jax.jit(_fwd_bwd)(x, w, dy)
    _same((y, dx), (y1, dx1))
    _close(dw, dw1)


def test_fp8_linear_module_under_nnx_jit(mesh24):
    """``dsjax.nn.Fp8Linear`` in a user's jit with the batch over both mesh axes: same loss and
    input gradient bits as unsharded, kernel gradient up to summation order, no gather."""
    from dsjax.nn import Fp8Linear  # pylint: disable=import-outside-toplevel

    lin = Fp8Linear(256, 96, implementation="cpu", rngs=nnx.Rngs(0))
    x, probe = _rand(36, (16, 64, 256)), _rand(37, (16, 64, 96))
    grad = nnx.jit(nnx.value_and_grad(lambda m, x, p: jnp.sum(m(x) * p), argnums=(0, 1)))
    l1, (g1, gx1) = grad(lin, x, probe)
    sh = NamedSharding(mesh24, P(("dp", "tp")))
    xs, ps = jax.device_put(x, sh), jax.device_put(probe, sh)
    l8, (g8, gx8) = grad(lin, xs, ps)
    _same(gx8, gx1)
    _close(g8["kernel"][...], g1["kernel"][...])
    _close(g8["bias"][...], g1["bias"][...])
    assert abs(float(l8) - float(l1)) <= ORDER * abs(float(l1))  # the loss's own sum order
    hlo = nnx.jit(lambda m, x, p: jnp.sum(m(x) * p)).lower(lin, xs, ps).compile().as_text()
    assert not any("all-gather" in c for c in _collectives(hlo))
    assert {s.split("{")[0] for s in _call_shapes(hlo, "dsjax_deep_gemm_fp8_gemm_nt")} == {
        "f32[128,96]"}


def test_recipe_marks_replicated_weights_varying_in_shard_map(mesh8):
    """No ``pvary`` by the user, varying-axes checks on: the weight gradients come back summed
    over the devices (a missing sum would be ~8x off, an extra one too) for both recipe ops."""
    x, w = _rand(38, (1024, 256)), _rand(39, (256, 128), 0.05)
    wg = _rand(40, (3, 256, 128), 0.05)
    m_idx = jnp.asarray(np.repeat(np.array([0, 2, -1, 1, 1, 0, 2, 0], np.int32), 128))
    probe = _rand(41, (1024, 128))

    def loss(x, w, wg, mi, p):
        return jnp.sum((dg.fp8_linear(x, w, implementation="cpu")
                        + dg.fp8_grouped_linear(x, wg, mi, implementation="cpu")) * p)

    def sharded(x, w, wg, mi, p):
        local = jax.shard_map(lambda *a: jax.lax.psum(loss(*a), "x"), mesh=mesh8,
                              in_specs=(P("x"), P(), P(), P("x"), P("x")), out_specs=P())
        return local(x, w, wg, mi, p)

    g8 = jax.jit(jax.grad(sharded, argnums=(0, 1, 2)))(x, w, wg, m_idx, probe)
    g1 = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(x, w, wg, m_idx, probe)
    _same(g8[0], g1[0])  # Dgrad is per row
    _close(g8[1], g1[1])
    _close(g8[2], g1[2])


def test_explicit_axes_shard_at_trace_time():
    """A mesh with Explicit axes (jax.make_mesh's default): shardings are part of the types, so
    the ops shard_map themselves at trace time; results carry the row sharding in their type,
    gradients type-check through custom_vjp, and values match the unsharded ones."""
    mesh = jax.make_mesh((8,), ("x",), axis_types=(jax.sharding.AxisType.Explicit,))
    x, w, dy = _rand(42, (1024, 256)), _rand(43, (256, 192), 0.05), _rand(44, (1024, 192))
    y1, dx1, dw1 = jax.jit(_fwd_bwd)(x, w, dy)
    with jax.set_mesh(mesh):
        xs, dys = (jax.device_put(a, NamedSharding(mesh, P("x"))) for a in (x, dy))
        f = jax.jit(_fwd_bwd)
        y, dx, dw = f(xs, w, dys)
        hlo = f.lower(xs, w, dys).compile().as_text()
        # 64 rows per device cannot be quantized along the rows without straddling 128-groups:
        # resharded (gathered) explicitly, still the unsharded bytes.
        q = jax.jit(_tok)(jax.device_put(x[:512].T, NamedSharding(mesh, P(None, "x"))))
    assert jax.typeof(y).sharding.spec[0] == "x" and jax.typeof(dx).sharding.spec[0] == "x"
    _same((y, dx), (y1, dx1))
    _close(dw, dw1)
    coll = _collectives(hlo)
    assert len(coll) == 1 and "all-reduce" in coll[0] and "f32[256,192]" in coll[0], coll
    _same(q, jax.jit(_tok)(x[:512].T))


def test_eager_calls_reuse_one_jitted_op_and_follow_the_kernel_environment(monkeypatch):
    """Eager calls (no tracer) run a cached jit of the partitioned op, keyed by the op's static
    parameters and the DSJAX_* environment; results equal the traced call bit for bit."""
    from dsjax.deep_gemm import partition

    a, b = _tok(_rand(1, (64, 256))), _blk(_rand(2, (128, 256)))
    partition._EAGER.clear()
    first = dg.fp8_gemm_nt(a, b, out_dtype=jnp.float32, implementation="cpu")
    keys = set(partition._EAGER)
    assert len(keys) == 1, keys  # the operands were quantized before the clear: one GEMM op
    again = dg.fp8_gemm_nt(a, b, out_dtype=jnp.float32, implementation="cpu")
    assert set(partition._EAGER) == keys
    _same(first, again)
    traced = jax.jit(lambda a, b: dg.fp8_gemm_nt(a, b, out_dtype=jnp.float32,
                                                 implementation="cpu"))(a, b)
    _same(first, traced)
    dg.fp8_gemm_nt(a, b, out_dtype=jnp.bfloat16, implementation="cpu")
    assert len(partition._EAGER) == len(keys) + 1  # another out dtype is another op
    monkeypatch.setenv("DSJAX_TEST_ENV_KEY", "1")
    dg.fp8_gemm_nt(a, b, out_dtype=jnp.float32, implementation="cpu")
    assert len(partition._EAGER) == len(keys) + 2  # a changed DSJAX_* environment re-traces


def test_ffi_gemms_capture_no_constants():
    """A constant captured by an FFI wrapper becomes an extra operand of the op's
    custom_partitioning, which jaxlib 0.11.2 crashes on (SIGSEGV compiling inside shard_map).
    The absent accumulator of every GEMM must therefore be built in the trace."""
    from dsjax.deep_gemm import _gemm_ffi

    a, b1 = _tok(_rand(1, (64, 256))), _tok(_rand(2, (128, 256)))
    b2 = _blk(_rand(2, (128, 256)))
    gks = jnp.array([128, 128], jnp.int32)
    calls = {
        "dense": (lambda a, b, g: _gemm_ffi.fp8_gemm_nt(a, b, None, jnp.float32, False), b2),
        "1d1d": (lambda a, b, g: _gemm_ffi.fp8_gemm_nt(a, b, None, jnp.float32, True), b1),
        # [m, K] x [n, K], K = 256 in two groups of 128
        "k_grouped": (lambda a, b, g: _gemm_ffi.k_grouped_contiguous(a, b, g, None), b1),
    }
    for name, (fn, b) in calls.items():
        closed = jax.make_jaxpr(fn)(a, b, gks)
        assert not closed.consts, (name, [getattr(c, "shape", c) for c in closed.consts])
