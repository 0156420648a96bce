"""DeepEP local kernels: every FFI implementation against the pure-JAX reference (one device).

Integers (slots, counts, layouts) and moved rows must match exactly; reductions are float32 sums
of at most a few terms in the same order on every implementation, so they match to 1 ulp-level
tolerance (rtol 1e-6), and bf16 outputs within one bf16 rounding (2^-8 relative).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsjax.deep_ep import _ffi, get_dispatch_layout, reference

IMPLS = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def _device(impl: str):
    return jax.devices("gpu")[0] if impl == "cuda" else jax.devices("cpu")[0]


def _topk(rng, t, k, e, p_none=0.2, dup=False):
    idx = np.array([rng.choice(e, k, replace=False) for _ in range(t)], np.int32).reshape(t, k)
    idx[rng.random(idx.shape) < p_none] = -1
    if dup and t > 1:
        idx[0, :] = idx[0, 0]  # one expert listed K times
    return idx


def _run(impl, fn, *args):
    with jax.default_device(_device(impl)):
        return jax.tree.map(np.asarray, jax.jit(fn)(*args))


ROUTE_CASES = [
    # (tokens, topk, experts_per_dest, num_dests, capacity, local_ids)
    (37, 4, 2, 8, 37, True),
    (37, 4, 2, 8, 3, True),      # capacity overflow: dropped pairs counted
    (64, 8, 8, 2, 64, False),    # first hop of the two-hop path
    (1, 3, 4, 4, 1, True),
    (0, 2, 2, 4, 1, True),       # no tokens
    (700, 6, 3, 5, 150, True),   # several chunks on the CPU pool
]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", ROUTE_CASES, ids=str)
def test_route(impl, case):
    t, k, per, d, c, local = case
    rng = np.random.default_rng(t * 7 + k)
    idx = _topk(rng, t, k, per * d, dup=True)
    w = rng.random((t, k)).astype(np.float32)
    kw = dict(experts_per_dest=per, num_dests=d, capacity=c, local_ids=local)
    want = _run("cpu", lambda i, w: reference.route(i, w, **kw), idx, w)
    got = _run(impl, lambda i, w: _ffi.route(i, w, **kw), idx, w)
    for name, a, b in zip(("reduce_idx", "send_src", "send_idx", "send_w", "num_dropped"), got, want):
        np.testing.assert_array_equal(a, b, err_msg=name)
    # Independent check of the slot contract: slot k of destination d is the k-th such token.
    red, src, _, _, dropped = want
    dests = [set(int(e) // per for e in row if e >= 0) for row in idx]
    n_drop = 0
    for dd in range(d):
        toks = [i for i in range(t) if dd in dests[i]]
        n_drop += max(0, len(toks) - c)
        np.testing.assert_array_equal(src[dd * c:dd * c + min(c, len(toks))], toks[:c])
    assert int(dropped) == n_drop


LAYOUT_CASES = [(50, 4, 16, 8, 4), (50, 8, 64, 8, None), (1, 1, 4, 4, 2), (300, 6, 32, 4, 2)]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", LAYOUT_CASES, ids=str)
def test_get_dispatch_layout(impl, case):
    t, k, e, r, rpn = case
    idx = _topk(np.random.default_rng(t + e), t, k, e, dup=True)
    kw = dict(num_experts=e, num_ranks=r, ranks_per_node=rpn)
    got = _run(impl, lambda i: tuple(get_dispatch_layout(i, **kw, implementation=impl)), idx)
    want = _run("cpu", lambda i: tuple(get_dispatch_layout(i, **kw, implementation="reference")), idx)
    for a, b in zip(got, want):
        if b is None:
            assert a is None
        else:
            np.testing.assert_array_equal(a, b)
    # numpy oracle
    per = e // r
    in_rank = np.zeros((t, r), bool)
    for i, row in enumerate(idx):
        for x in row[row >= 0]:
            in_rank[i, x // per] = True
    np.testing.assert_array_equal(want[3], in_rank)
    np.testing.assert_array_equal(want[0], in_rank.sum(0))
    np.testing.assert_array_equal(want[2], [sum(x in row for row in idx) for x in range(e)])
    if rpn is not None:
        np.testing.assert_array_equal(want[1], in_rank.reshape(t, r // rpn, rpn).any(2).sum(0))


GATHER_CASES = [
    ((20, 16), np.float32), ((20, 3, 8), jnp.bfloat16), ((20, 7), jnp.float8_e4m3fn),
    ((20, 5), np.int32), ((1, 256), jnp.bfloat16),
]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape,dtype", GATHER_CASES, ids=str)
def test_gather_rows(impl, shape, dtype):
    rng = np.random.default_rng(len(shape))
    x = jnp.asarray(rng.standard_normal(shape) * 10).astype(dtype)
    idx = rng.integers(-1, shape[0], size=31).astype(np.int32)
    got = _run(impl, _ffi.gather_rows, x, idx)
    want = _run("cpu", reference.gather_rows, x, idx)
    np.testing.assert_array_equal(got.view(np.uint8), want.view(np.uint8))
    xn = np.asarray(x)
    for n, i in enumerate(idx):
        row = xn[i] if i >= 0 else np.zeros_like(xn[0])
        np.testing.assert_array_equal(want[n].view(np.uint8), row.view(np.uint8))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("in_dtype,out_dtype", [(np.float32, np.float32), (jnp.bfloat16, jnp.bfloat16),
                                                (jnp.bfloat16, np.float32), (np.float32, jnp.bfloat16)])
@pytest.mark.parametrize("weighted", [True, False])
def test_gather_reduce(impl, in_dtype, out_dtype, weighted):
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.standard_normal((24, 40)), in_dtype)
    x = x.at[0].set(jnp.inf)  # only reachable through idx 0, never through padding
    idx = rng.integers(-1, 24, size=(17, 5)).astype(np.int32)
    idx[idx == 0] = 1
    idx[3] = -1
    w = rng.random((17, 5)).astype(np.float32) if weighted else None
    fn = lambda f: (lambda x, i, w: f(x, i, w, out_dtype))
    got = _run(impl, fn(_ffi.gather_reduce), x, idx, w)
    want = _run("cpu", fn(reference.gather_reduce), x, idx, w)
    assert got.dtype == np.dtype(out_dtype)
    rtol = 1e-6 if out_dtype == np.float32 else 2.0 ** -8
    np.testing.assert_allclose(got.astype(np.float64), want.astype(np.float64), rtol=rtol, atol=1e-6)
    np.testing.assert_array_equal(want[3].astype(np.float32), 0.0)
    xn = np.asarray(x).astype(np.float64)
    wn = np.ones(idx.shape) if w is None else w
    oracle = np.stack([sum(wn[n, j] * xn[i] for j, i in enumerate(row) if i >= 0) + np.zeros(40)
                       for n, row in enumerate(idx)])
    np.testing.assert_allclose(want.astype(np.float64), oracle, rtol=rtol, atol=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("m,k,nl", [(40, 4, 3), (1, 2, 1), (600, 8, 5)], ids=str)
def test_ll_layout(impl, m, k, nl):
    rng = np.random.default_rng(m)
    idx = rng.integers(-1, nl, size=(m, k)).astype(np.int32)
    got = _run(impl, lambda i: _ffi.ll_layout(i, num_local_experts=nl), idx)
    want = _run("cpu", lambda i: reference.ll_layout(i, num_local_experts=nl), idx)
    for a, b in zip(got, want):
        np.testing.assert_array_equal(a, b)
    src_row, count, pos = want
    for e in range(nl):
        rows = [r for r in range(m) if e in idx[r]]
        assert count[e] == len(rows)
        np.testing.assert_array_equal(src_row[e * m:e * m + len(rows)], rows)
        assert (src_row[e * m + len(rows):(e + 1) * m] == -1).all()
        for p, r in enumerate(rows):
            assert (pos[r][idx[r] == e] == e * m + p).all()
    assert (pos[idx < 0] == -1).all()


def test_cpu_twin_reports_bad_ids():
    idx = np.array([[0, 99]], np.int32)
    w = np.ones((1, 2), np.float32)
    with pytest.raises(Exception, match="expert id is >= 8"):
        _run("cpu", lambda i, w: _ffi.route(i, w, experts_per_dest=2, num_dests=4, capacity=1, local_ids=True), idx, w)
    with pytest.raises(Exception, match="outside"):
        _run("cpu", _ffi.gather_rows, np.ones((3, 2), np.float32), np.array([0, 3], np.int32))
    with pytest.raises(Exception, match="num_experts=8"):
        _run("cpu", lambda i: tuple(get_dispatch_layout(i, num_experts=8, num_ranks=4, implementation="cpu")), idx)


def test_layout_validation():
    idx = np.zeros((4, 2), np.int32)
    with pytest.raises(TypeError, match="topk_idx must have dtype int32, got float32"):
        get_dispatch_layout(idx.astype(np.float32), num_experts=8, num_ranks=4)
    with pytest.raises(ValueError, match="num_experts must be a multiple of the number of EP ranks"):
        get_dispatch_layout(idx, num_experts=6, num_ranks=4)
    with pytest.raises(ValueError, match="ranks_per_node must divide num_ranks=4, got 3"):
        get_dispatch_layout(idx, num_experts=8, num_ranks=4, ranks_per_node=3)
    with pytest.raises(ValueError, match="rank 2"):
        get_dispatch_layout(idx[0], num_experts=8, num_ranks=4)


def test_reference_gather_reduce_gradient_ignores_skipped_entries():
    """Skipped entries (idx -1) read row 0 internally; NaN there (and NaN weights on skipped entries)
    must not reach the gradients: the reference is the autodiff oracle of combine's 3-D form."""
    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.standard_normal((6, 5)), jnp.float32).at[0].set(jnp.nan)
    idx = jnp.asarray([[1, -1, 2], [-1, -1, -1], [5, 3, -1]], jnp.int32)
    w = jnp.asarray(rng.random((3, 3)), jnp.float32).at[0, 1].set(jnp.nan).at[2, 2].set(jnp.inf)
    g = jnp.asarray(rng.standard_normal((3, 5)), jnp.float32)
    gx, gw = jax.grad(lambda x, w: (reference.gather_reduce(x, idx, w, jnp.float32) * g).sum(), argnums=(0, 1))(x, w)
    gx, gw, xn, wn, gn = (np.asarray(a) for a in (gx, gw, x, w, g))
    want_gx = np.zeros_like(xn)
    want_gw = np.zeros_like(wn)
    for n, row in enumerate(np.asarray(idx)):
        for j, i in enumerate(row):
            if i >= 0:
                want_gx[i] += wn[n, j] * gn[n]
                want_gw[n, j] = xn[i] @ gn[n]
    np.testing.assert_allclose(gx, want_gx, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(gw, want_gw, rtol=1e-6, atol=1e-6)
