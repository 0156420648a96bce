"""FP8 GEMMs (dense 1d2d / 1d1d, m-grouped contiguous / masked, k-grouped): every implementation
against the float64 product of the dequantized inputs, plus layouts, edge cases and errors.

Tolerances: DeepGEMM's bound ``calc_diff < 1e-3`` against the float64 product of the dequantized
operands is the spec. Both implementations accumulate in f32, so against that product they are
far tighter: f32 output differs from it by f32 rounding only (we assert max error <= 1e-5 of the
output's max magnitude: K <= 7168 terms of f32 rounding, ~sqrt(K)*2^-24, is ~5e-6 at worst), and
bf16 output adds one bf16 rounding (relative 2^-9). Hopper's FP8 tensor cores keep only ~14
significant bits while accumulating inside one instruction (DeepSeek-V3 §3.3.2, the reason for the
promotion every 128 K), so the CUDA kernels get 2^-10 of the peak instead of 1e-5.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsjax import deep_gemm as dg
from dsjax._src import ffi
from dsjax._src.testing import calc_diff

IMPLS = ["reference", pytest.param("cpu", marks=pytest.mark.skipif(
    ffi.cpu_unavailable_reason() is not None, reason=str(ffi.cpu_unavailable_reason()))),
         pytest.param("cuda", marks=pytest.mark.gpu)]


def _rand(rng: np.random.Generator, shape, scale=1.0) -> jax.Array:
    return jnp.asarray(rng.standard_normal(shape, dtype=np.float32) * scale)


def _deq_tok(q, s) -> np.ndarray:
    q = np.asarray(q).astype(np.float64)
    return q * np.repeat(np.asarray(s, np.float64), 128, axis=-1)[..., :q.shape[-1]]


def _deq_blk(q, s) -> np.ndarray:
    q = np.asarray(q).astype(np.float64)
    s = np.repeat(np.repeat(np.asarray(s, np.float64), 128, axis=-2), 128, axis=-1)
    return q * s[..., :q.shape[-2], :q.shape[-1]]


def _check(out, want: np.ndarray, out_dtype=jnp.float32, impl: str = "cpu") -> None:
    out = np.asarray(out, np.float64)
    assert out.shape == want.shape
    assert calc_diff(out, want) < 1e-3  # the spec
    peak = max(np.abs(want).max(), 1e-30)
    bound = 1e-5 if out_dtype == jnp.float32 else 2.0 ** -8
    if impl == "cuda":
        bound = max(bound, 2.0 ** -10)
    np.testing.assert_array_less(np.abs(out - want).max() / peak, bound)


def _operands(rng, m, n, k, lead_a=(), lead_b=(), per_row=False):
    a = dg.per_token_cast_to_fp8(_rand(rng, (*lead_a, m, k)))
    w = _rand(rng, (*lead_b, n, k))
    b = dg.per_token_cast_to_fp8(w) if per_row else dg.per_block_cast_to_fp8(w)
    return a, b


DENSE = [(m, n, k) for m in (1, 64, 128, 257) for (n, k) in ((512, 384), (384, 1024))]
DENSE += [(64, 2112, 7168), (33, 300, 200), (130, 129, 130), (5, 17, 0)]
# Several row tiles of the CPU twin, with A pre-decoded (n=136) and decoded per tile (n=16).
DENSE += [(400, 136, 256), (400, 16, 256)]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("m,n,k", DENSE)
def test_fp8_gemm_nt(impl, m, n, k):
    rng = np.random.default_rng(m * 7 + n + k)
    a, b = _operands(rng, m, n, k)
    want = _deq_tok(*a) @ _deq_blk(*b).T
    out_dtype = jnp.float32 if (m + n) % 2 else jnp.bfloat16
    d = dg.fp8_gemm_nt(a, b, out_dtype=out_dtype, implementation=impl)
    assert d.dtype == out_dtype
    _check(d, want, out_dtype, impl)


@pytest.mark.parametrize("impl", IMPLS)
def test_fp8_gemm_nt_with_c_under_jit(impl):
    rng = np.random.default_rng(1)
    a, b = _operands(rng, 70, 200, 300)
    c = _rand(rng, (70, 200), 10.0)
    f = jax.jit(lambda a, b, c: dg.fp8_gemm_nt(a, b, c=c, out_dtype=jnp.float32,
                                               implementation=impl))
    _check(f(a, b, c), _deq_tok(*a) @ _deq_blk(*b).T + np.asarray(c, np.float64), impl=impl)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("m,n,k", [(64, 256, 384), (129, 100, 257)])
def test_fp8_gemm_nt_1d1d(impl, m, n, k):
    rng = np.random.default_rng(2)
    a, b = _operands(rng, m, n, k, per_row=True)
    c = _rand(rng, (m, n))
    d = dg.fp8_gemm_nt_1d1d(a, b, c=c, implementation=impl)
    assert d.dtype == jnp.float32
    _check(d, _deq_tok(*a) @ _deq_tok(*b).T + np.asarray(c, np.float64), impl=impl)


def test_fp8_gemm_nt_vmap_matches_loop():
    rng = np.random.default_rng(3)
    a, b = _operands(rng, 16, 128, 256, lead_a=(3,))
    out = jax.vmap(lambda q, s: dg.fp8_gemm_nt((q, s), b, out_dtype=jnp.float32))(*a)
    for i in range(3):
        _check(out[i], _deq_tok(a[0][i], a[1][i]) @ _deq_blk(*b).T)


def _contiguous_layout(sizes: list[int], groups_order: list[int]) -> np.ndarray:
    rows = []
    for g, size in zip(groups_order, sizes):
        padded = -(-size // 128) * 128
        rows += [g] * size + [-1] * (padded - size)
    return np.asarray(rows, np.int32)


@pytest.mark.parametrize("impl", IMPLS)
def test_m_grouped_contiguous(impl):
    # 4 groups: group 1 is empty, group 3 has exactly 128 rows, an all-padding block in the middle.
    rng = np.random.default_rng(4)
    mi = np.concatenate([_contiguous_layout([100, 128], [2, 3]), np.full(128, -1, np.int32),
                         _contiguous_layout([1, 200], [0, 2])])
    groups, n, k = 4, 320, 384
    a, b = _operands(rng, mi.shape[0], n, k, lead_b=(groups,))
    d = dg.m_grouped_fp8_gemm_nt_contiguous(a, b, jnp.asarray(mi), out_dtype=jnp.float32,
                                            implementation=impl)
    a64, b64 = _deq_tok(*a), _deq_blk(*b)
    want = np.zeros((mi.shape[0], n))
    for r, g in enumerate(mi):
        if g >= 0:
            want[r] = a64[r] @ b64[g].T
    _check(d, want, impl=impl)
    assert not np.asarray(d)[mi < 0].any()


@pytest.mark.parametrize("impl", IMPLS)
def test_m_grouped_masked(impl):
    rng = np.random.default_rng(5)
    groups, m_max, n, k = 4, 96, 200, 256
    masked = np.asarray([0, 96, 1, 50], np.int32)  # empty, full, one row, partial
    a, b = _operands(rng, m_max, n, k, lead_a=(groups,), lead_b=(groups,))
    d = jax.jit(lambda a, b, mm: dg.m_grouped_fp8_gemm_nt_masked(
        a, b, mm, expected_m=48, out_dtype=jnp.float32, implementation=impl))(a, b, masked)
    a64, b64 = _deq_tok(*a), _deq_blk(*b)
    want = np.einsum("gmk,gnk->gmn", a64, b64)
    want[np.arange(m_max)[None, :] >= masked[:, None]] = 0.0
    _check(d, want, impl=impl)


@pytest.mark.parametrize("impl", IMPLS)
def test_k_grouped_contiguous(impl):
    rng = np.random.default_rng(6)
    m, n, ktot = 96, 160, 128 * 7
    ks = [256, 0, 128, 384]  # an empty group; 128 columns of capacity padding at the end
    a, b = _operands(rng, m, n, ktot, per_row=True)
    c = _rand(rng, (len(ks), m, n))
    d = jax.jit(lambda a, b, ks, c: dg.k_grouped_fp8_gemm_nt_contiguous(
        a, b, ks, c=c, implementation=impl))(a, b, jnp.asarray(ks, jnp.int32), c)
    a64, b64 = _deq_tok(*a), _deq_tok(*b)
    want = np.asarray(c, np.float64).copy()
    off = 0
    for g, kg in enumerate(ks):
        want[g] += a64[:, off:off + kg] @ b64[:, off:off + kg].T
        off += kg
    _check(d, want, impl=impl)


# ---------------------------------------------------------------- errors


def _small(rng=np.random.default_rng(7)):
    return _operands(rng, 8, 128, 256)


def test_errors_name_argument_expected_given():
    a, b = _small()
    with pytest.raises(TypeError, match=r"a\[0\] \(values\) must have dtype float8_e4m3fn, got float32"):
        dg.fp8_gemm_nt((a[0].astype(jnp.float32), a[1]), b)
    with pytest.raises(TypeError, match="a must be a \\(values, scales\\) pair"):
        dg.fp8_gemm_nt(a[0], b)
    with pytest.raises(ValueError, match=r"b\[1\] \(scales\) must have shape \(1, 2\)"):
        dg.fp8_gemm_nt(a, (b[0], b[1][:, :1].repeat(1, 0).reshape(1, 1)))
    with pytest.raises(ValueError, match="must share k"):
        dg.fp8_gemm_nt(a, dg.per_block_cast_to_fp8(jnp.ones((128, 384))))
    with pytest.raises(TypeError, match="out_dtype must be bfloat16 or float32, got float16"):
        dg.fp8_gemm_nt(a, b, out_dtype=jnp.float16)
    with pytest.raises(ValueError, match=r"c must have shape \(8, 128\)"):
        dg.fp8_gemm_nt(a, b, c=jnp.zeros((8, 127)))
    with pytest.raises(ValueError, match="implementation must be one of"):
        dg.fp8_gemm_nt(a, b, implementation="tpu")
    with pytest.raises(ValueError, match=r"b\[1\] \(scales\) must have shape \(128, 2\)"):
        dg.fp8_gemm_nt_1d1d(a, b)  # 128x128 scales where 1x128 are required


def test_grouped_layout_errors():
    rng = np.random.default_rng(8)
    a, b = _operands(rng, 256, 128, 128, lead_b=(2,))
    bad = np.zeros(256, np.int32)
    bad[100:] = 1  # group 1 starts at row 100, not at a multiple of 128
    with pytest.raises(ValueError, match="128-row alignment: rows 0..127 mix groups"):
        dg.m_grouped_fp8_gemm_nt_contiguous(a, b, jnp.asarray(bad))
    with pytest.raises(ValueError, match=r"m_indices\[0\] = 2"):
        dg.m_grouped_fp8_gemm_nt_contiguous(a, b, jnp.full((256,), 2, jnp.int32))
    with pytest.raises(TypeError, match="m_indices must have dtype int32, got int64|float32"):
        dg.m_grouped_fp8_gemm_nt_contiguous(a, b, jnp.zeros((256,), jnp.float32))
    am, bm = _operands(rng, 16, 128, 128, lead_a=(2,), lead_b=(2,))
    with pytest.raises(ValueError, match=r"masked_m must be in \[0, m_max=16\], got masked_m\[1\] = 17"):
        dg.m_grouped_fp8_gemm_nt_masked(am, bm, jnp.asarray([3, 17], jnp.int32), expected_m=8)
    with pytest.raises(ValueError, match="expected_m must be a positive Python int"):
        dg.m_grouped_fp8_gemm_nt_masked(am, bm, jnp.asarray([3, 7], jnp.int32), expected_m=0)
    ak, bk = _operands(rng, 8, 16, 256, per_row=True)
    with pytest.raises(ValueError, match=r"multiples of 128, got group_ks\[0\] = 100"):
        dg.k_grouped_fp8_gemm_nt_contiguous(ak, bk, [100, 28])
    with pytest.raises(ValueError, match="sum\\(group_ks\\) must be <= K=256, got 384"):
        dg.k_grouped_fp8_gemm_nt_contiguous(ak, bk, [256, 128])


@pytest.mark.skipif(ffi.cpu_unavailable_reason() is not None, reason="needs the CPU module")
def test_cpu_twin_checks_traced_layouts_at_run_time():
    rng = np.random.default_rng(9)
    a, b = _operands(rng, 256, 128, 128, lead_b=(2,))
    bad = np.zeros(256, np.int32)
    bad[100:] = 1
    f = jax.jit(lambda mi: dg.m_grouped_fp8_gemm_nt_contiguous(a, b, mi, implementation="cpu"))
    with pytest.raises(Exception, match="128-row alignment"):
        jax.block_until_ready(f(jnp.asarray(bad)))
    am, bm = _operands(rng, 16, 128, 128, lead_a=(2,), lead_b=(2,))
    g = jax.jit(lambda mm: dg.m_grouped_fp8_gemm_nt_masked(am, bm, mm, expected_m=8,
                                                           implementation="cpu"))
    with pytest.raises(Exception, match=r"masked_m\[0\] must be in \[0, m_max=16\], got -1"):
        jax.block_until_ready(g(jnp.asarray([-1, 2], jnp.int32)))
    ak, bk = _operands(rng, 8, 16, 256, per_row=True)
    h = jax.jit(lambda ks: dg.k_grouped_fp8_gemm_nt_contiguous(ak, bk, ks, implementation="cpu"))
    with pytest.raises(Exception, match="sum\\(group_ks\\) must be <= K=256, got 384"):
        jax.block_until_ready(h(jnp.asarray([256, 128], jnp.int32)))


def test_alignment_constant():
    assert dg.get_m_alignment_for_contiguous_layout() == 128


@pytest.mark.gpu
def test_cuda_traced_layout_edge_cases_follow_documented_semantics():
    # Under jit the CUDA kernels cannot raise on data: out-of-range group indices are padding
    # (zero rows) and masked counts past m_max are clamped, as the reference does.
    rng = np.random.default_rng(10)
    a, b = _operands(rng, 256, 128, 256, lead_b=(2,))
    mi = np.zeros(256, np.int32)
    mi[128:] = 5  # group 5 does not exist
    f = jax.jit(lambda mi: dg.m_grouped_fp8_gemm_nt_contiguous(a, b, mi, out_dtype=jnp.float32,
                                                               implementation="cuda"))
    d = np.asarray(f(jnp.asarray(mi)))
    assert not d[128:].any()
    _check(d[:128], _deq_tok(a[0][:128], a[1][:128]) @ _deq_blk(b[0][0], b[1][0]).T, impl="cuda")
    am, bm = _operands(rng, 16, 128, 128, lead_a=(2,), lead_b=(2,))
    g = jax.jit(lambda mm: dg.m_grouped_fp8_gemm_nt_masked(am, bm, mm, expected_m=8,
                                                           out_dtype=jnp.float32,
                                                           implementation="cuda"))
    d = np.asarray(g(jnp.asarray([99, -3], jnp.int32)))
    assert not d[1].any()
    _check(d[0], _deq_tok(am[0][0], am[1][0]) @ _deq_blk(bm[0][0], bm[1][0]).T, impl="cuda")


_KERNEL_SCRIPT = r"""
import jax, jax.numpy as jnp, numpy as np
from dsjax import deep_gemm as dg
rng = np.random.default_rng(11)
def tok(x): return dg.per_token_cast_to_fp8(jnp.asarray(x, jnp.float32))
def blk(x): return dg.per_block_cast_to_fp8(jnp.asarray(x, jnp.float32))
def deq(q, s, per_block):
    q = np.asarray(q).astype(np.float64); s = np.asarray(s, np.float64)
    if per_block: s = np.repeat(s, 128, axis=-2)[..., :q.shape[-2], :]
    return q * np.repeat(s, 128, axis=-1)[..., :q.shape[-1]]
worst = 0.0
for m, n, k in [(257, 300, 200), (13, 50, 384), (200, 700, 130), (500, 40, 256)]:
    a, b = tok(rng.standard_normal((m, k))), blk(rng.standard_normal((n, k)))
    c = rng.standard_normal((m, n)).astype(np.float32)
    want = deq(*a, False) @ deq(*b, True).T + c
    got = np.asarray(dg.fp8_gemm_nt(a, b, c=jnp.asarray(c), out_dtype=jnp.float32, implementation="cpu"))
    worst = max(worst, np.abs(got - want).max() / np.abs(want).max())
mi = np.repeat(np.asarray([1, -1, 0], np.int32), 128)
a, b = tok(rng.standard_normal((384, 256))), blk(rng.standard_normal((2, 96, 256)))
got = np.asarray(dg.m_grouped_fp8_gemm_nt_contiguous(a, b, jnp.asarray(mi), out_dtype=jnp.float32, implementation="cpu"))
bw = deq(*b, True)
want = np.concatenate([deq(*a, False)[:128] @ bw[1].T, np.zeros((128, 96)), deq(*a, False)[256:] @ bw[0].T])
worst = max(worst, np.abs(got - want).max() / np.abs(want).max())
print("WORST", worst)
"""


@pytest.mark.skipif(ffi.cpu_unavailable_reason() is not None, reason="needs the CPU module")
@pytest.mark.parametrize("kernel", ["avx2", "generic"])
def test_every_cpu_micro_kernel(kernel):
    """The CPU twin picks its micro-kernel once per process (AVX-512, AVX2/FMA or portable), so
    the narrower ones run in a subprocess; same 1e-5-of-peak bound as above."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, DSJAX_DEEP_GEMM_CPU_KERNEL=kernel, JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", _KERNEL_SCRIPT], env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    worst = float(out.stdout.split("WORST")[-1])
    assert worst <= 1e-5, worst
