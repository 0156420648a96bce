"""The Hopper TMA + WGMMA FP8 GEMMs (``DSJAX_DEEP_GEMM_KERNEL=wgmma``) and their selection.

CPU-side tests (run everywhere): the environment variable's parsing and error, which CUDA target
each 1d2d GEMM lowers to (checked on a CUDA lowering exported on the CPU, no GPU needed), the
documented fallbacks to the mma kernel, and that the CPU twin is unaffected by the setting.

GPU tests (marker ``gpu``): the WGMMA kernels (dense, m-grouped contiguous and masked) against the
float64 product of the dequantized inputs on DeepGEMM's shape families. Tolerances as in ``test_deep_gemm_gemm.py``: DeepGEMM's
``calc_diff < 1e-3`` is the spec; in addition the max error relative to the output's peak must be
below 2^-10 for f32 output (Hopper's FP8 tensor cores keep ~14 significant bits while accumulating
inside one wgmma, DeepSeek-V3 §3.3.2, and the kernel promotes to f32 every 128 K), or 2^-8 for
bf16 output (one bf16 rounding, relative 2^-9, on top).
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsjax import deep_gemm as dg
from dsjax._src import ffi
from dsjax._src.testing import calc_diff
from dsjax.deep_gemm import _gemm_ffi

ENV = _gemm_ffi.KERNEL_ENV
needs_cpu_ffi = pytest.mark.skipif(ffi.cpu_unavailable_reason() is not None,
                                   reason=str(ffi.cpu_unavailable_reason()))


def _operands(rng: np.random.Generator, m: int, n: int, k: int, per_row: bool = False):
    a = dg.per_token_cast_to_fp8(jnp.asarray(rng.standard_normal((m, k), dtype=np.float32)))
    w = jnp.asarray(rng.standard_normal((n, k), dtype=np.float32))
    b = dg.per_token_cast_to_fp8(w) if per_row else dg.per_block_cast_to_fp8(w)
    return a, b


def _deq_tok(q, s) -> np.ndarray:
    q = np.asarray(q).astype(np.float64)
    return q * np.repeat(np.asarray(s, np.float64), 128, axis=-1)[..., :q.shape[-1]]


def _deq_blk(q, s) -> np.ndarray:
    q = np.asarray(q).astype(np.float64)
    s = np.repeat(np.repeat(np.asarray(s, np.float64), 128, axis=-2), 128, axis=-1)
    return q * s[..., :q.shape[-2], :q.shape[-1]]


def _grouped_b(rng: np.random.Generator, g: int, n: int, k: int):
    w = jnp.asarray(rng.standard_normal((g, n, k), dtype=np.float32))
    return dg.per_block_cast_to_fp8(w)


def _want_contiguous(a, b, m_indices: np.ndarray) -> np.ndarray:
    xa, xb = _deq_tok(*a), _deq_blk(*b)
    want = np.zeros((xa.shape[0], xb.shape[1]))
    for r, g in enumerate(m_indices):
        if 0 <= g < xb.shape[0]:
            want[r] = xa[r] @ xb[g].T
    return want


def _check(out, want: np.ndarray, out_dtype, bound_f32: float) -> None:
    out = np.asarray(out, np.float64)
    assert out.shape == want.shape
    assert calc_diff(out, want) < 1e-3
    peak = max(float(np.abs(want).max()), 1e-30)
    bound = bound_f32 if np.dtype(out_dtype) == np.float32 else 2.0 ** -8
    assert np.abs(out - want).max() / peak < bound


def _cuda_targets(kind: str, m: int, n: int, k: int, per_row: bool = False) -> list[str]:
    """The dsjax GEMM custom-call targets of the CUDA lowering of one GEMM (no GPU needed).

    ``kind``: ``dense`` ([m, k] x [n, k]), ``contiguous`` (2 groups) or ``masked`` (2 groups of
    ``m`` rows).
    """
    spec = lambda *s, dt=jnp.float32: jax.ShapeDtypeStruct(s, dt)  # noqa: E731
    kb, nb = -(-k // 128), -(-n // 128)
    g = () if kind == "dense" else (2,)
    lead_a = (2,) if kind == "masked" else ()
    a = (spec(*lead_a, m, k, dt=jnp.float8_e4m3fn), spec(*lead_a, m, kb))
    b = (spec(*g, n, k, dt=jnp.float8_e4m3fn), spec(*g, n, kb) if per_row else spec(*g, nb, kb))
    rows = spec(2 if kind == "masked" else m, dt=jnp.int32)

    def f(a, b, rows):
        if kind == "contiguous":
            return _gemm_ffi.m_grouped_contiguous(a, b, rows, jnp.bfloat16)
        if kind == "masked":
            return _gemm_ffi.m_grouped_masked(a, b, rows, jnp.bfloat16)
        return _gemm_ffi.fp8_gemm_nt(a, b, None, jnp.bfloat16, per_row)

    names = [*_gemm_ffi.WGMMA_TARGETS, *_gemm_ffi.WGMMA_TARGETS.values()]
    checks = [jax.export.DisabledSafetyCheck.custom_call(t) for t in names]
    exp = jax.export.export(jax.jit(f), platforms=["cuda"], disabled_checks=checks)(a, b, rows)
    return re.findall(r"@(dsjax_deep_gemm_\w+)", exp.mlir_module())


# ---------------------------------------------------------------- selection (CPU)
@pytest.mark.parametrize("value,want", [(None, "mma"), ("", "mma"), ("mma", "mma"),
                                        ("wgmma", "wgmma"), (" WGMMA\n", "wgmma")])
def test_selected_kernel(monkeypatch, value, want):
    if value is None:
        monkeypatch.delenv(ENV, raising=False)
    else:
        monkeypatch.setenv(ENV, value)
    assert _gemm_ffi.selected_kernel() == want


def test_bad_kernel_value_raises_naming_variable_choices_and_value(monkeypatch):
    monkeypatch.setenv(ENV, "tma")
    with pytest.raises(ValueError, match=r"DSJAX_DEEP_GEMM_KERNEL must be one of 'mma', 'wgmma' "
                                         r"\(unset means 'mma'\), got 'tma'"):
        _gemm_ffi.selected_kernel()
    # ...and through the public op, before anything runs.
    a, b = _operands(np.random.default_rng(0), 4, 8, 128)
    with pytest.raises(ValueError, match="got 'tma'"):
        dg.fp8_gemm_nt(a, b, implementation="cpu")


def test_unsupported_reasons():
    assert _gemm_ffi.wgmma_unsupported_reason(16384) is None
    assert _gemm_ffi.wgmma_unsupported_reason(16) is None
    assert "1x128 b scales" in _gemm_ffi.wgmma_unsupported_reason(256, True)
    assert "got k=0" in _gemm_ffi.wgmma_unsupported_reason(0)
    assert "got k=200" in _gemm_ffi.wgmma_unsupported_reason(200)


_D, _C, _M = "dsjax_deep_gemm_fp8_gemm_nt", "dsjax_deep_gemm_m_grouped_fp8_gemm_nt_contiguous", \
    "dsjax_deep_gemm_m_grouped_fp8_gemm_nt_masked"


@pytest.mark.parametrize("kernel,kind,m,n,k,per_row,want", [
    ("mma", "dense", 128, 256, 512, False, _D),
    ("wgmma", "dense", 128, 256, 512, False, _D + "_wgmma"),
    ("wgmma", "dense", 1, 300, 144, False, _D + "_wgmma"),
    ("wgmma", "dense", 64, 256, 200, False, _D),  # k % 16 != 0: mma
    ("wgmma", "dense", 64, 256, 512, True, _D),   # 1d1d: mma
    ("mma", "contiguous", 256, 256, 512, False, _C),
    ("wgmma", "contiguous", 256, 256, 512, False, _C + "_wgmma"),
    ("wgmma", "contiguous", 256, 256, 72, False, _C),  # k % 16 != 0: mma
    ("mma", "masked", 64, 256, 512, False, _M),
    ("wgmma", "masked", 64, 256, 512, False, _M + "_wgmma"),
    ("wgmma", "masked", 64, 256, 100, False, _M),  # k % 16 != 0: mma
])
def test_cuda_lowering_uses_selected_target(monkeypatch, kernel, kind, m, n, k, per_row, want):
    monkeypatch.setenv(ENV, kernel)
    assert _cuda_targets(kind, m, n, k, per_row) == [want]


def test_k_grouped_ignores_selection(monkeypatch):
    monkeypatch.setenv(ENV, "wgmma")
    spec = jax.ShapeDtypeStruct
    a = (spec((64, 256), jnp.float8_e4m3fn), spec((64, 2), jnp.float32))
    b = (spec((32, 256), jnp.float8_e4m3fn), spec((32, 2), jnp.float32))
    f = lambda a, b, ks: _gemm_ffi.k_grouped_contiguous(a, b, ks, None)  # noqa: E731
    name = "dsjax_deep_gemm_k_grouped_fp8_gemm_nt_contiguous"
    exp = jax.export.export(jax.jit(f), platforms=["cuda"], disabled_checks=[
        jax.export.DisabledSafetyCheck.custom_call(name)])(a, b, spec((2,), jnp.int32))
    assert re.findall(r"@(dsjax_deep_gemm_\w+)", exp.mlir_module()) == [name]


@needs_cpu_ffi
def test_cpu_twin_unaffected_by_wgmma_selection(monkeypatch):
    monkeypatch.setenv(ENV, "wgmma")
    rng = np.random.default_rng(1)
    a, b = _operands(rng, 70, 130, 272)
    c = jnp.asarray(rng.standard_normal((70, 130), dtype=np.float32))
    want = _deq_tok(*a) @ _deq_blk(*b).T + np.asarray(c, np.float64)
    f = jax.jit(lambda a, b, c: dg.fp8_gemm_nt(a, b, c=c, out_dtype=jnp.float32,
                                               implementation="cpu"))
    text = f.lower(a, b, c).as_text()
    assert "dsjax_deep_gemm_fp8_gemm_nt_wgmma" not in text
    # f32 output of the CPU twin: f32 rounding only (see test_deep_gemm_gemm.py).
    _check(f(a, b, c), want, jnp.float32, 1e-5)
    # The grouped layouts too (the platform_dependent default branch, eagerly).
    mi = np.asarray([1] * 128 + [-1] * 4, np.int32)
    bg = _grouped_b(rng, 2, 40, 144)
    ag = dg.per_token_cast_to_fp8(jnp.asarray(rng.standard_normal((132, 144), dtype=np.float32)))
    d = dg.m_grouped_fp8_gemm_nt_contiguous(ag, bg, jnp.asarray(mi), out_dtype=jnp.float32,
                                            implementation="cpu")
    _check(d, _want_contiguous(ag, bg, mi), jnp.float32, 1e-5)
    am = dg.per_token_cast_to_fp8(jnp.asarray(rng.standard_normal((2, 8, 144), dtype=np.float32)))
    d = np.asarray(dg.m_grouped_fp8_gemm_nt_masked(am, bg, jnp.asarray([8, 3], jnp.int32),
                                                   expected_m=8, out_dtype=jnp.float32,
                                                   implementation="cpu"))
    xa, xb = _deq_tok(*am), _deq_blk(*bg)
    _check(d[0], xa[0] @ xb[0].T, jnp.float32, 1e-5)
    _check(d[1, :3], xa[1, :3] @ xb[1].T, jnp.float32, 1e-5)
    assert not d[1, 3:].any()


@needs_cpu_ffi
def test_wgmma_selection_composes_with_sharding_and_vmap_on_cpu(monkeypatch):
    # The platform_dependent switch must survive custom_partitioning's per-shard re-lowering
    # and vmap (its default branch, the CPU twin, runs here).
    monkeypatch.setenv(ENV, "wgmma")
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    rng = np.random.default_rng(2)
    a, b = _operands(rng, 512, 256, 256)
    mesh = Mesh(np.array(jax.devices()[:4]), ("x",))
    a_sh = jax.device_put(a, NamedSharding(mesh, P("x")))
    f = jax.jit(lambda a, b: dg.fp8_gemm_nt(a, b, out_dtype=jnp.float32, implementation="cpu"))
    d = f(a_sh, b)
    assert d.sharding.spec == P("x")
    _check(d, _deq_tok(*a) @ _deq_blk(*b).T, jnp.float32, 1e-5)
    q, sc = a[0].reshape(4, 128, 256), a[1].reshape(4, 128, 2)
    v = jax.vmap(lambda q, s: dg.fp8_gemm_nt((q, s), b, out_dtype=jnp.float32,
                                             implementation="cpu"))(q, sc)
    _check(v.reshape(512, 256), _deq_tok(*a) @ _deq_blk(*b).T, jnp.float32, 1e-5)


# ---------------------------------------------------------------- the kernel (GPU)
_GPU_DENSE = [(m, n, k) for m in (1, 64, 128) for (n, k) in ((2112, 7168), (7168, 2048),
                                                             (576, 7168), (4096, 512))]
_GPU_DENSE += [(4096, 2112, 7168), (4096, 384, 1536)]
# Tails: m not a multiple of 64/128, n not a multiple of 128 (odd n: scalar stores), k not a
# multiple of 128 (TMA zero fill of the last K block), k = 16 (one partial block).
_GPU_DENSE += [(65, 129, 144), (200, 300, 1040), (333, 1, 16), (129, 255, 4096)]


@pytest.fixture
def wgmma(monkeypatch):
    monkeypatch.setenv(ENV, "wgmma")


@pytest.mark.gpu
@pytest.mark.parametrize("m,n,k", _GPU_DENSE)
def test_wgmma_dense_matches_reference(wgmma, m, n, k):
    rng = np.random.default_rng(m + 3 * n + 7 * k)
    a, b = _operands(rng, m, n, k)
    want = _deq_tok(*a) @ _deq_blk(*b).T
    out_dtype = jnp.float32 if (m + n) % 2 else jnp.bfloat16
    f = jax.jit(lambda a, b: dg.fp8_gemm_nt(a, b, out_dtype=out_dtype, implementation="cuda"))
    assert _gemm_ffi.WGMMA_TARGET in f.lower(a, b).as_text()
    d = f(a, b)
    assert d.dtype == out_dtype
    _check(d, want, out_dtype, 2.0 ** -10)


@pytest.mark.gpu
@pytest.mark.parametrize("out_dtype", [jnp.bfloat16, jnp.float32])
@pytest.mark.parametrize("m,n,k", [(128, 256, 512), (300, 130, 1024), (1, 4096, 7168)])
def test_wgmma_adds_c(wgmma, m, n, k, out_dtype):
    rng = np.random.default_rng(m * n + k)
    a, b = _operands(rng, m, n, k)
    c = rng.standard_normal((m, n), dtype=np.float32) * 30.0
    want = _deq_tok(*a) @ _deq_blk(*b).T + c.astype(np.float64)
    d = dg.fp8_gemm_nt(a, b, c=jnp.asarray(c), out_dtype=out_dtype, implementation="cuda")
    assert d.dtype == out_dtype
    _check(d, want, out_dtype, 2.0 ** -10)


@pytest.mark.gpu
def test_wgmma_agrees_with_mma_kernel(monkeypatch):
    rng = np.random.default_rng(5)
    a, b = _operands(rng, 512, 640, 2048)
    outs = {}
    for kernel in ("mma", "wgmma"):
        monkeypatch.setenv(ENV, kernel)
        f = jax.jit(lambda a, b: dg.fp8_gemm_nt(a, b, out_dtype=jnp.float32, implementation="cuda"))
        outs[kernel] = np.asarray(f(a, b), np.float64)
    # Both promote every 128 K in f32 from tensor-core partial sums; they differ only in the
    # order of f32 additions inside a block: far below the 2^-10 bound against the exact product.
    peak = np.abs(outs["mma"]).max()
    assert np.abs(outs["mma"] - outs["wgmma"]).max() / peak < 2.0 ** -10


@pytest.mark.gpu
def test_wgmma_under_vmap(wgmma):
    rng = np.random.default_rng(6)
    xs = jnp.asarray(rng.standard_normal((3, 96, 256), dtype=np.float32))
    w = jnp.asarray(rng.standard_normal((192, 256), dtype=np.float32))
    b = dg.per_block_cast_to_fp8(w)
    a = dg.per_token_cast_to_fp8(xs)
    f = jax.jit(jax.vmap(lambda q, s: dg.fp8_gemm_nt((q, s), b, out_dtype=jnp.float32,
                                                     implementation="cuda")))
    d = np.asarray(f(*a))
    for i in range(3):
        _check(d[i], _deq_tok(a[0][i], a[1][i]) @ _deq_blk(*b).T, jnp.float32, 2.0 ** -10)


@pytest.mark.gpu
def test_wgmma_fallbacks_are_correct(wgmma):
    # k % 16 != 0 and the 1d1d GEMM run on the mma kernel (documented), with correct results.
    rng = np.random.default_rng(7)
    a, b = _operands(rng, 100, 200, 200)
    f = jax.jit(lambda a, b: dg.fp8_gemm_nt(a, b, out_dtype=jnp.float32, implementation="cuda"))
    assert _gemm_ffi.WGMMA_TARGET not in f.lower(a, b).as_text()
    _check(f(a, b), _deq_tok(*a) @ _deq_blk(*b).T, jnp.float32, 2.0 ** -10)
    a1, b1 = _operands(rng, 100, 200, 256, per_row=True)
    d = dg.fp8_gemm_nt_1d1d(a1, b1, implementation="cuda")
    _check(d, _deq_tok(*a1) @ _deq_tok(*b1).T, jnp.float32, 2.0 ** -10)


@pytest.mark.gpu
@pytest.mark.parametrize("k,per_row,match", [(200, False, "k must be a positive multiple of 16"),
                                             (256, True, "b_per_row must be false")])
def test_wgmma_target_rejects_unsupported_calls(k, per_row, match):
    # Called directly (bypassing the Python routing) the handler returns an error, never aborts.
    rng = np.random.default_rng(8)
    (aq, sa), (bq, sb) = _operands(rng, 32, 64, k, per_row=per_row)
    out = jax.ShapeDtypeStruct((32, 64), jnp.float32)
    with pytest.raises(Exception, match=match):
        jax.block_until_ready(ffi.call(_gemm_ffi.WGMMA_TARGET, out, aq, sa, bq, sb,
                                       jnp.zeros((0,), jnp.float32), b_per_row=per_row,
                                       has_c=False, config="b128x128"))


@pytest.mark.gpu
def test_wgmma_target_rejects_unknown_config():
    rng = np.random.default_rng(9)
    (aq, sa), (bq, sb) = _operands(rng, 32, 64, 256)
    out = jax.ShapeDtypeStruct((32, 64), jnp.float32)
    with pytest.raises(Exception, match=r"config must be one of b64x64, .*, got 'b1x1'"):
        jax.block_until_ready(ffi.call(_gemm_ffi.WGMMA_TARGET, out, aq, sa, bq, sb,
                                       jnp.zeros((0,), jnp.float32), b_per_row=False,
                                       has_c=False, config="b1x1"))


# Row tags: aligned groups with an empty group and -1 padding; a small (64-row) problem; and,
# under jit only (Python rejects them when concrete), a tile that mixes two groups and an index
# outside [0, G) (padding on the GPU, as documented).
_CONTIGUOUS = [
    ("aligned", [0] * 128 + [2] * 256 + [3] * 100 + [-1] * 28, 4, 576, 2048),
    ("small", [1] * 64, 2, 300, 1024),
    ("mixed", [0] * 64 + [1] * 128 + [7] * 64, 2, 256, 512),
]


@pytest.mark.gpu
@pytest.mark.parametrize("out_dtype", [jnp.bfloat16, jnp.float32])
@pytest.mark.parametrize("name,tags,g,n,k", _CONTIGUOUS, ids=[c[0] for c in _CONTIGUOUS])
def test_wgmma_contiguous_matches_reference(wgmma, name, tags, g, n, k, out_dtype):
    rng = np.random.default_rng(len(tags) + n)
    mi = np.asarray(tags, np.int32)
    a = dg.per_token_cast_to_fp8(jnp.asarray(rng.standard_normal((mi.size, k), dtype=np.float32)))
    b = _grouped_b(rng, g, n, k)
    f = jax.jit(lambda a, b, mi: dg.m_grouped_fp8_gemm_nt_contiguous(
        a, b, mi, out_dtype=out_dtype, implementation="cuda"))
    assert _gemm_ffi.WGMMA_TARGETS[_C] in f.lower(a, b, jnp.asarray(mi)).as_text()
    d = f(a, b, jnp.asarray(mi))
    assert d.dtype == out_dtype
    want = _want_contiguous(a, b, mi)
    _check(d, want, out_dtype, 2.0 ** -10)
    assert not np.asarray(d, np.float32)[(mi < 0) | (mi >= g)].any()


@pytest.mark.gpu
@pytest.mark.parametrize("out_dtype", [jnp.bfloat16, jnp.float32])
@pytest.mark.parametrize("g,m_max,masked,n,k", [(3, 192, [0, 192, 70], 4096, 7168),
                                                 (2, 64, [64, 1], 2112, 2048),
                                                 (4, 256, [256, 0, 129, 3], 7168, 2048)])
def test_wgmma_masked_matches_reference(wgmma, g, m_max, masked, n, k, out_dtype):
    rng = np.random.default_rng(g * m_max + n)
    a = dg.per_token_cast_to_fp8(jnp.asarray(rng.standard_normal((g, m_max, k), dtype=np.float32)))
    b = _grouped_b(rng, g, n, k)
    mm = jnp.asarray(masked, jnp.int32)
    f = jax.jit(lambda a, b, mm: dg.m_grouped_fp8_gemm_nt_masked(
        a, b, mm, expected_m=max(masked) or 1, out_dtype=out_dtype, implementation="cuda"))
    assert _gemm_ffi.WGMMA_TARGETS[_M] in f.lower(a, b, mm).as_text()
    d = np.asarray(f(a, b, mm), np.float64)
    xa, xb = _deq_tok(*a), _deq_blk(*b)
    for i, cnt in enumerate(masked):
        assert not d[i, cnt:].any()
        if cnt:
            _check(d[i, :cnt], xa[i, :cnt] @ xb[i].T, out_dtype, 2.0 ** -10)


# ---------------------------------------------------------------- every configuration (GPU)
def _masked_case(rng, g, m_max, masked, n, k):
    a = dg.per_token_cast_to_fp8(jnp.asarray(rng.standard_normal((g, m_max, k), dtype=np.float32)))
    return a, _grouped_b(rng, g, n, k), np.asarray(masked, np.int32)


@pytest.mark.gpu
@pytest.mark.parametrize("config", list(_gemm_ffi.WGMMA_CONFIGS))
def test_wgmma_config_matrix(monkeypatch, config):
    """One configuration (forced by DSJAX_DEEP_GEMM_WGMMA_CONFIG) on every layout and tail.

    Dense: more tiles than SMs (so persistent CTAs walk several tiles and the stage ring wraps
    across tiles), m/n/k tails with odd n, k = 16, c added, bf16 and f32 out. Contiguous: -1 rows,
    an empty group, a group of 64 rows (two groups in one 128-row tile). Masked: masked_m of 0,
    of m_max and in between. Cluster configurations run the grouped layouts without the cluster.
    Each case checks every output element against the float64 product (zeros where documented).
    """
    monkeypatch.setenv(ENV, "wgmma")
    monkeypatch.setenv(_gemm_ffi.WGMMA_CONFIG_ENV, config)
    rng = np.random.default_rng(sum(map(ord, config)))
    dense = [(2048, 2176, 256, jnp.bfloat16, False), (200, 300, 1040, jnp.float32, True),
             (333, 1, 16, jnp.float32, False), (129, 255, 4096, jnp.bfloat16, True)]
    for m, n, k, out_dtype, with_c in dense:
        a, b = _operands(rng, m, n, k)
        c = rng.standard_normal((m, n), dtype=np.float32) * 10.0 if with_c else None
        f = jax.jit(lambda a, b, c: dg.fp8_gemm_nt(a, b, c=c, out_dtype=out_dtype,
                                                   implementation="cuda"))
        cc = None if c is None else jnp.asarray(c)
        text = f.lower(a, b, cc).as_text()
        assert _gemm_ffi.WGMMA_TARGET in text and f'config = "{config}"' in text
        want = _deq_tok(*a) @ _deq_blk(*b).T + (0.0 if c is None else c.astype(np.float64))
        _check(f(a, b, cc), want, out_dtype, 2.0 ** -10)

    tags = np.asarray([0] * 128 + [2] * 256 + [-1] * 100 + [3] * 64 + [1] * 64 + [-1] * 5,
                      np.int32)
    a = dg.per_token_cast_to_fp8(jnp.asarray(rng.standard_normal((tags.size, 528),
                                                                 dtype=np.float32)))
    b = _grouped_b(rng, 5, 330, 528)  # group 4 is empty
    for out_dtype in (jnp.bfloat16, jnp.float32):
        d = jax.jit(lambda a, b, mi: dg.m_grouped_fp8_gemm_nt_contiguous(
            a, b, mi, out_dtype=out_dtype, implementation="cuda"))(a, b, jnp.asarray(tags))
        _check(d, _want_contiguous(a, b, tags), out_dtype, 2.0 ** -10)
        assert not np.asarray(d, np.float32)[tags < 0].any()

    a, b, masked = _masked_case(rng, 4, 192, [0, 192, 70, 129], 400, 784)
    for out_dtype in (jnp.bfloat16, jnp.float32):
        d = np.asarray(jax.jit(lambda a, b, mm: dg.m_grouped_fp8_gemm_nt_masked(
            a, b, mm, expected_m=192, out_dtype=out_dtype, implementation="cuda"))(
                a, b, jnp.asarray(masked)), np.float64)
        xa, xb = _deq_tok(*a), _deq_blk(*b)
        for i, cnt in enumerate(masked):
            assert not d[i, cnt:].any()
            if cnt:
                _check(d[i, :cnt], xa[i, :cnt] @ xb[i].T, out_dtype, 2.0 ** -10)
