"""CUDA code paths that the shared-case GPU tests do not reach (marker gpu on every CUDA case).

* Zero-size problems through every CUDA handler that can see one: the handler must skip the launch
  (a grid dimension of 0 is a launch error that would poison the CUDA context for every later
  test) and return outputs of the right shape.
* Inconsistent operands given straight to the FFI targets (bypassing the Python checks): the
  handler returns an error naming the target, never launches.
* The m-grouped GEMMs with bfloat16 output and a K that is not a multiple of 16, i.e. the scalar
  staging path of the mma kernel with per-group operand offsets that are not 16-byte aligned.
* The data-dependent edge cases the CUDA kernels cannot report without a stream sync and instead
  handle as documented: k-grouped sizes summing past K are clamped, DeepEP ids at or above the
  expert / row count are ignored. The oracle is the reference run on the CPU on the sanitized
  input (those ids replaced by -1), which is exactly the documented meaning.

The ``cpu`` cases run the same checks against the CPU twin in CI, so the harness itself is tested
without a GPU. Tolerances: integers and moved bytes exact; FP8 GEMMs as in test_deep_gemm_gemm.py
(bf16 output: 2^-8 of the peak, the bf16 rounding; CUDA f32: 2^-10 of the peak, Hopper's
FP8 tensor-core accumulation inside one 128-wide K block); float32 sums in index order rtol 1e-6.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsjax import deep_gemm as dg
from dsjax._src import ffi
from dsjax.deep_ep import _ffi as ep_ffi
from dsjax.deep_ep import reference as ep_ref
from dsjax.deep_gemm import _ffi as quant_ffi
from dsjax.deep_gemm import _gemm_ffi

IMPLS = [pytest.param("cpu", marks=pytest.mark.skipif(
    ffi.cpu_unavailable_reason() is not None, reason=str(ffi.cpu_unavailable_reason()))),
         pytest.param("cuda", marks=pytest.mark.gpu)]
F8 = jnp.float8_e4m3fn


def _device(impl: str):
    return jax.devices("gpu")[0] if impl == "cuda" else jax.devices("cpu")[0]


def _run(impl: str, fn, *args):
    """`fn` jitted on the implementation's device (XLA picks the FFI handler of that platform)."""
    dev = _device(impl)
    with jax.default_device(dev):
        args = jax.device_put(args, dev)
        return jax.tree.map(np.asarray, jax.jit(fn)(*args))


def _fp8(shape) -> np.ndarray:
    return np.ones(shape, np.float32).astype(F8)


def _scales(shape) -> np.ndarray:
    return np.ones(shape, np.float32)


# ---------------------------------------------------------------- zero-size problems


@pytest.mark.parametrize("impl", IMPLS)
def test_zero_size_problems_skip_the_launch(impl):
    k = 256
    kb = k // 128
    got = _run(impl, lambda *x: (
        # dense: m = 0, then n = 0
        _gemm_ffi.fp8_gemm_nt((x[0], x[1]), (x[2], x[3]), None, jnp.bfloat16, False),
        _gemm_ffi.fp8_gemm_nt((x[2][:4], x[3][:4]), (x[0], jnp.zeros((0, kb), jnp.float32)), None,
                              jnp.float32, False),
        # masked with m_max = 0; contiguous with m_sum = 0
        _gemm_ffi.m_grouped_masked((x[0].reshape(2, 0, k), x[1].reshape(2, 0, kb)),
                                   (jnp.stack([x[2], x[2]]), jnp.stack([x[4], x[4]])),
                                   jnp.asarray([0, 0], jnp.int32), jnp.float32),
        _gemm_ffi.m_grouped_contiguous((x[0], x[1]), (x[2][None], x[4][None]),
                                       jnp.zeros((0,), jnp.int32), jnp.bfloat16),
        # k-grouped with no group, and with K = 0 (the output is c)
        _gemm_ffi.k_grouped_contiguous((x[2][:4], x[3][:4]), (x[2][:8], x[3][:8]),
                                       jnp.zeros((0,), jnp.int32), None),
        _gemm_ffi.k_grouped_contiguous((x[2][:4, :0], x[3][:4, :0]), (x[2][:8, :0], x[3][:8, :0]),
                                       jnp.zeros((1,), jnp.int32), x[5]),
        # quantizers with no rows / no columns
        quant_ffi.per_token_cast_to_fp8(jnp.zeros((0, 300), jnp.bfloat16), False),
        quant_ffi.per_block_cast_to_fp8(jnp.zeros((3, 0, 200), jnp.float32), False),
        # DeepEP: no rows to move or reduce, no received tokens
        ep_ffi.gather_rows(jnp.ones((5, 8), jnp.float32), jnp.zeros((0,), jnp.int32)),
        ep_ffi.gather_reduce(jnp.ones((5, 8), jnp.float32), jnp.zeros((0, 2), jnp.int32), None,
                             jnp.float32),
        ep_ffi.ll_layout(jnp.zeros((0, 2), jnp.int32), num_local_experts=3),
    ), _fp8((0, k)), _scales((0, kb)), _fp8((128, k)), _scales((128, kb)), _scales((1, kb)),
        np.full((1, 4, 8), 2.5, np.float32))
    shapes = [(0, 128), (4, 0), (2, 0, 128), (0, 128), (0, 4, 8), (1, 4, 8),
              ((0, 300), (0, 3)), ((3, 0, 200), (3, 0, 2)), (0, 8), (0, 8), ((0,), (3,), (0, 2))]
    for i, (out, want) in enumerate(zip(got, shapes)):
        if isinstance(out, tuple):
            assert tuple(o.shape for o in out) == want, i
        else:
            assert out.shape == want, i
    np.testing.assert_array_equal(got[5], 2.5)  # K = 0: D = c exactly
    np.testing.assert_array_equal(got[10][1], 0)  # no token reached any local expert
    # The context is still healthy: a real GEMM right after gives the right answer.
    a = dg.per_token_cast_to_fp8(jnp.ones((3, k), jnp.float32))
    b = dg.per_block_cast_to_fp8(jnp.ones((5, k), jnp.float32))
    d = _run(impl, lambda *x: _gemm_ffi.fp8_gemm_nt((x[0], x[1]), (x[2], x[3]), None, jnp.float32,
                                                    False), *a, *b)
    np.testing.assert_allclose(d, np.full((3, 5), float(k)), rtol=2.0 ** -10)


# ---------------------------------------------------------------- errors from the handlers


def _sds(shape, dtype):
    return jax.ShapeDtypeStruct(shape, dtype)


ERROR_CASES = {
    # target: (operands, results, attributes, message)
    "dense scales": (
        "dsjax_deep_gemm_fp8_gemm_nt",
        lambda: (_fp8((8, 256)), _scales((8, 1)), _fp8((128, 256)), _scales((1, 2)),
                 np.zeros((0,), np.float32)),
        _sds((8, 128), jnp.float32), dict(b_per_row=False, has_c=False),
        r"dsjax_deep_gemm_fp8_gemm_nt: a scales must have shape"),
    "quant scales": (
        "dsjax_deep_gemm_per_token_cast_to_fp8", lambda: (np.ones((4, 300), np.float32),),
        (_sds((4, 300), F8), _sds((4, 2), jnp.float32)), dict(use_ue8m0=False),
        r"dsjax_deep_gemm_per_token_cast_to_fp8: inconsistent shapes"),
    "gather_reduce weights": (
        "dsjax_deep_ep_gather_reduce",
        lambda: (np.ones((5, 8), np.float32), np.zeros((3, 2), np.int32), np.ones((3, 1), np.float32)),
        _sds((3, 8), jnp.float32), {}, r"dsjax_deep_ep_gather_reduce: weights must have shape \[3, 2\]"),
    "route reduce_idx": (
        "dsjax_deep_ep_route",
        lambda: (np.zeros((4, 2), np.int32), np.ones((4, 2), np.float32)),
        (_sds((4, 3), jnp.int32), _sds((8,), jnp.int32), _sds((8, 2), jnp.int32),
         _sds((8, 2), jnp.float32), _sds((), jnp.int32)),
        dict(experts_per_dest=2, num_dests=4, capacity=2, local_ids=True),
        r"dsjax_deep_ep_route: reduce_idx must have shape \[4, 4\]"),
    "decode q": (
        "dsjax_flash_mla_decode",
        lambda: (np.zeros((1, 1, 16, 575), jnp.bfloat16), np.zeros((2, 64, 1, 576), jnp.bfloat16),
                 np.zeros((1, 2), np.int32), np.full((1,), 10, np.int32),
                 np.zeros((1, 8), np.int32), np.asarray([0, 1], np.int32)),
        (_sds((1, 1, 16, 512), jnp.bfloat16), _sds((1, 16, 1), jnp.float32),
         _sds((2, 1, 16, 512), jnp.float32), _sds((2, 1, 16), jnp.float32)),
        dict(softmax_scale=np.float32(0.1), causal=False, is_fp8=False),
        r"flash_mla: q's last dim must be 576, got 575"),
}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", sorted(ERROR_CASES))
def test_handlers_return_errors_on_inconsistent_operands(impl, case):
    target, operands, results, attrs, message = ERROR_CASES[case]
    with pytest.raises(Exception, match=message):
        _run(impl, lambda *x: ffi.call(target, results, *x, **attrs), *operands())


# ---------------------------------------------------------------- grouped GEMMs, scalar staging


def _deq(q, s, per_block: bool) -> np.ndarray:
    q = np.asarray(q).astype(np.float64)
    s = np.asarray(s, np.float64)
    if per_block:
        s = np.repeat(s, 128, axis=-2)[..., :q.shape[-2], :]
    return q * np.repeat(s, 128, axis=-1)[..., :q.shape[-1]]


def _assert_close(out, want, bound):
    out = np.asarray(out, np.float64)
    assert out.shape == want.shape
    peak = max(np.abs(want).max(), 1e-30)
    assert np.abs(out - want).max() / peak < bound


@pytest.mark.parametrize("impl", IMPLS)
def test_grouped_gemms_bf16_output_with_k_not_a_multiple_of_16(impl):
    rng = np.random.default_rng(12)
    k, n = 200, 136  # k % 16 == 8: every group's operands start off a 16-byte boundary
    mi = np.concatenate([np.full(128, 1), np.full(70, 0), np.full(58, -1)]).astype(np.int32)
    a = dg.per_token_cast_to_fp8(jnp.asarray(rng.standard_normal((256, k)), jnp.float32))
    b = dg.per_block_cast_to_fp8(jnp.asarray(rng.standard_normal((2, n, k)), jnp.float32))
    am = dg.per_token_cast_to_fp8(jnp.asarray(rng.standard_normal((3, 70, k)), jnp.float32))
    bm = dg.per_block_cast_to_fp8(jnp.asarray(rng.standard_normal((3, n, k)), jnp.float32))
    masked = np.asarray([70, 0, 65], np.int32)
    d_c, d_m = _run(impl, lambda a0, a1, b0, b1, mi, m0, m1, n0, n1, mm: (
        _gemm_ffi.m_grouped_contiguous((a0, a1), (b0, b1), mi, jnp.bfloat16),
        _gemm_ffi.m_grouped_masked((m0, m1), (n0, n1), mm, jnp.bfloat16)),
        *a, *b, mi, *am, *bm, masked)
    a64, b64 = _deq(*a, False), _deq(*b, True)
    want = np.zeros((256, n))
    for g in (0, 1):
        want[mi == g] = a64[mi == g] @ b64[g].T
    _assert_close(d_c, want, 2.0 ** -8)
    assert not np.asarray(d_c, np.float32)[mi < 0].any()
    want = np.einsum("gmk,gnk->gmn", _deq(*am, False), _deq(*bm, True))
    want[np.arange(70)[None, :] >= masked[:, None]] = 0.0
    _assert_close(d_m, want, 2.0 ** -8)


# ---------------------------------------------------------------- documented CUDA edge semantics


@pytest.mark.gpu
def test_cuda_k_grouped_clamps_groups_past_k():
    # Under jit the CUDA kernel cannot raise on group_ks; a group reaching past K is cut at K
    # (the CPU twin raises instead: test_deep_gemm_gemm.py).
    rng = np.random.default_rng(13)
    m, n, k = 40, 72, 384
    a = dg.per_token_cast_to_fp8(jnp.asarray(rng.standard_normal((m, k)), jnp.float32))
    b = dg.per_token_cast_to_fp8(jnp.asarray(rng.standard_normal((n, k)), jnp.float32))
    ks = np.asarray([256, 256], np.int32)  # group 1 owns [256, 512) ∩ [0, 384)
    d = _run("cuda", lambda a0, a1, b0, b1, ks: dg.k_grouped_fp8_gemm_nt_contiguous(
        (a0, a1), (b0, b1), ks, implementation="cuda"), *a, *b, ks)
    a64, b64 = _deq(*a, False), _deq(*b, False)
    want = np.stack([a64[:, :256] @ b64[:, :256].T, a64[:, 256:] @ b64[:, 256:].T])
    _assert_close(d, want, 2.0 ** -10)


@pytest.mark.gpu
def test_cuda_deep_ep_ignores_out_of_range_ids():
    rng = np.random.default_rng(14)
    t, k, per, dests, e = 60, 4, 2, 4, 8
    idx = rng.integers(-1, e + 3, size=(t, k)).astype(np.int32)  # some ids >= e
    clean = np.where(idx >= e, -1, idx).astype(np.int32)
    w = rng.random((t, k)).astype(np.float32)
    x = rng.standard_normal((30, 24)).astype(np.float32)
    rows = rng.integers(-1, 40, size=50).astype(np.int32)  # some rows >= 30
    rows_clean = np.where(rows >= 30, -1, rows).astype(np.int32)
    ridx = rng.integers(-1, 40, size=(20, 3)).astype(np.int32)
    ridx_clean = np.where(ridx >= 30, -1, ridx).astype(np.int32)
    rw = rng.random((20, 3)).astype(np.float32)
    lidx = rng.integers(-1, 5, size=(33, 2)).astype(np.int32)  # 3 local experts; 3 and 4 invalid
    lidx_clean = np.where(lidx >= 3, -1, lidx).astype(np.int32)

    def ops(mod, idx, rows, ridx, lidx):
        x_, w_, rw_ = jnp.asarray(x), jnp.asarray(w), jnp.asarray(rw)
        return (mod.route(idx, w_, experts_per_dest=per, num_dests=dests, capacity=9, local_ids=True),
                mod.dispatch_layout(idx, num_experts=e, num_ranks=4, ranks_per_node=2),
                mod.gather_rows(x_, rows),
                mod.gather_reduce(x_, ridx, rw_, jnp.float32),
                mod.ll_layout(lidx, num_local_experts=3))

    got = _run("cuda", lambda *a: ops(ep_ffi, *a), idx, rows, ridx, lidx)
    want = _run("cpu", lambda *a: ops(ep_ref, *a), clean, rows_clean, ridx_clean, lidx_clean)
    names = ("route", "dispatch_layout", "gather_rows", "gather_reduce", "ll_layout")
    for name, g, wv in zip(names, got, want):
        for i, (a, b) in enumerate(zip(jax.tree.leaves(g), jax.tree.leaves(wv))):
            if name == "gather_reduce":
                np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6, err_msg=name)
            else:
                np.testing.assert_array_equal(a, b, err_msg=f"{name}[{i}]")


@pytest.mark.gpu
def test_dense_mma_more_row_tiles_than_grid_y():
    """More than 65535 64-row tiles: the mma kernel puts row tiles on grid.x (grid.y's limit is
    65535). Every row is checked, the last tile partial (a row count of 64 * 65536 + 3)."""
    m, n, k = 64 * 65536 + 3, 16, 128
    rng = np.random.default_rng(0)
    x = rng.integers(-3, 4, (m, k)).astype(np.float32)  # small integers: exact in E4M3 and f32
    w = rng.integers(-3, 4, (n, k)).astype(np.float32)
    a = (jnp.asarray(x.astype(F8)), jnp.ones((m, 1), jnp.float32))
    b = (jnp.asarray(w.astype(F8)), jnp.ones((1, 1), jnp.float32))
    got = _run("cuda", lambda a, b: dg.fp8_gemm_nt(a, b, out_dtype=jnp.float32,
                                                    implementation="cuda"), a, b)
    np.testing.assert_array_equal(got, x @ w.T)  # |sums| <= 128 * 9: exact in float32
