"""DeepEP FP8 dispatch, overflow accounting / strict mode, low-latency mode and argument checks.

8 host CPU devices, one compiled program per (mode, implementation). Tolerances: FP8 vs bf16
``calc_diff < 5e-4`` (DeepEP's own bound; E4M3 with 1x128 scales gives ~1e-4 on Gaussian data);
low-latency combine rounds to bf16 three times (expert output, expert-side sum, final sum), so its
error is bounded by ``3·2^-8·Σ|terms|``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from dsjax import deep_ep
from dsjax._src.testing import calc_diff
from dsjax.deep_gemm import dequantize_per_token, per_token_cast_to_fp8

R, T, H, K, E = 8, 8, 256, 4, 16
L = E // R
MAX_T = 10
SPEC = P("ep")


def _data(seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((R * T, H)).astype(np.float32)
    idx = np.array([rng.choice(E, K, replace=False) for _ in range(R * T)], np.int32)
    idx[rng.random(idx.shape) < 0.2] = -1
    idx[5] = -1
    w = rng.random((R * T, K)).astype(np.float32)
    return x, idx, w


X, IDX, W = _data()
XB = jnp.asarray(X, jnp.bfloat16)
MESH = Mesh(np.array(jax.devices()[:R]), ("ep",))


def _put(*arrays):
    return [jax.device_put(a, NamedSharding(MESH, SPEC)) for a in arrays]


def _sm(fn, n_in, out_specs):
    return jax.jit(jax.shard_map(fn, mesh=MESH, in_specs=(SPEC,) * n_in, out_specs=out_specs))


def _dests(row):
    return sorted({int(e) // L for e in row if e >= 0})


def _recv_rows(d):
    return [s * T + t for s in range(R) for t in range(T) if d in _dests(IDX[s * T + t])]


@functools.cache
def _fp8_run(impl):
    q, s = per_token_cast_to_fp8(XB, implementation="reference")

    def local(xb, q, s, idx, w):
        kw = dict(num_experts=E, axis_name="ep", num_worst_tokens=R * T, implementation=impl)
        rb, ridx_b, rw_b, _, hb = deep_ep.dispatch(xb, idx, w, **kw)
        (rq, rs), ridx, _, _, _ = deep_ep.dispatch((q, s), idx, w, **kw)
        # per-slot combine in bf16: every live slot holds the row itself, the others NaN
        slots = jnp.where((ridx_b >= 0)[..., None], rb[:, None], jnp.asarray(jnp.nan, jnp.bfloat16))
        weighted = deep_ep.combine(slots, hb, topk_weights=rw_b, implementation=impl)
        return rb, rq, rs, ridx, deep_ep.combine(rb, hb, implementation=impl), weighted

    out = _sm(local, 5, (SPEC,) * 6)(*_put(XB, q, s, IDX, W))
    return [np.asarray(o) for o in out], np.asarray(q), np.asarray(s)


@pytest.mark.parametrize("impl", ["reference", "cpu"])
def test_fp8_dispatch(impl):
    (rb, rq, rs, ridx, plain, weighted), q, s = _fp8_run(impl)
    n = R * T
    for d in range(R):
        rows = _recv_rows(d)
        m = len(rows)
        blk = slice(d * n, d * n + m)
        np.testing.assert_array_equal(rq[blk].view(np.uint8), q[rows].view(np.uint8))  # codes unchanged
        np.testing.assert_array_equal(rs[blk], s[rows])
        assert (rq[d * n + m:(d + 1) * n].view(np.uint8) == 0).all()
        deq = np.asarray(dequantize_per_token(jnp.asarray(rq[blk]), jnp.asarray(rs[blk])))
        assert calc_diff(deq, rb[blk].astype(np.float32)) < 5e-4
    # bf16 combine(dispatch(x)) = x · (number of destination ranks), exactly (f32 sums of equal bf16)
    ndest = np.array([len(_dests(r)) for r in IDX], np.float32)
    want = (np.asarray(XB).astype(np.float32) * ndest[:, None]).astype(jnp.bfloat16)
    np.testing.assert_array_equal(plain.astype(np.float32), want.astype(np.float32))
    # bf16 per-slot combine = x · Σ of the token's live weights; two bf16 roundings (the per-rank
    # reduce, the cross-rank sum; unit roundoff 2^-8 each) of same-sign terms:
    # |error| <= 2·2^-8 · |result| to first order
    assert weighted.dtype == jnp.bfloat16 and np.isfinite(weighted.astype(np.float32)).all()
    want_w = np.asarray(XB).astype(np.float64) * np.where(IDX >= 0, W, 0).sum(1, dtype=np.float64)[:, None]
    err = np.abs(weighted.astype(np.float64) - want_w)
    assert (err <= 2.0 ** -7 * 1.01 * np.abs(want_w) + 1e-30).all(), err.max()


NWT, CAP = 12, 3


def _overflow_expected():
    """Kept copies per token and dropped count for num_worst_tokens=NWT, send_capacity=CAP."""
    kept = np.zeros(R * T, np.float32)
    dropped = 0
    for d in range(R):
        recv = []
        for s in range(R):
            toks = [s * T + t for t in range(T) if d in _dests(IDX[s * T + t])]
            dropped += max(0, len(toks) - CAP)
            recv += toks[:CAP]
        dropped += max(0, len(recv) - NWT)
        kept[recv[:NWT]] += 1
    return kept, dropped


@functools.cache
def _overflow_fn(impl, strict):
    def local(x, idx, w):
        recv_x, _, _, _, h = deep_ep.dispatch(x, idx, w, num_experts=E, axis_name="ep", num_worst_tokens=NWT,
                                              send_capacity=CAP, strict=strict, implementation=impl)
        return deep_ep.combine(recv_x, h, implementation=impl), h.num_dropped[None]
    return _sm(local, 3, (SPEC, SPEC))


@pytest.mark.parametrize("impl", ["reference", "cpu"])
def test_overflow_is_counted(impl):
    kept, dropped = _overflow_expected()
    assert dropped > 0  # the case must overflow to mean anything
    plain, nd = (np.asarray(a) for a in _overflow_fn(impl, False)(*_put(X, IDX, W)))
    np.testing.assert_array_equal(nd, np.full(R, dropped))
    np.testing.assert_array_equal(plain, X * kept[:, None])


def test_strict_mode_raises_on_overflow():
    with pytest.raises(Exception, match=r"copies were dropped for lack of capacity"):
        jax.block_until_ready(_overflow_fn("cpu", True)(*_put(X, IDX, W)))


def test_strict_mode_passes_without_overflow():
    def local(x, idx, w):
        recv_x, _, _, cnt, h = deep_ep.dispatch(x, idx, w, num_experts=E, axis_name="ep", num_worst_tokens=R * T,
                                                strict=True, implementation="cpu")
        return cnt, h.num_dropped[None]
    cnt, nd = _sm(local, 3, (SPEC, SPEC))(*_put(X, IDX, W))
    assert (np.asarray(nd) == 0).all() and np.asarray(cnt).sum() > 0


@functools.cache
def _ll_run(impl):
    def local(xb, idx, w):
        kw = dict(num_max_dispatch_tokens_per_rank=MAX_T, num_experts=E, axis_name="ep", implementation=impl)
        (q, s), cnt, _ = deep_ep.low_latency_dispatch(xb, idx, use_fp8=True, **kw)
        rb, cnt_b, h = deep_ep.low_latency_dispatch(xb, idx, use_fp8=False, **kw)
        rank = jax.lax.axis_index("ep")
        scale = (rank * L + jnp.arange(L) + 1).astype(jnp.float32)[:, None, None]
        y = (rb.astype(jnp.float32) * scale).astype(jnp.bfloat16)
        out = deep_ep.low_latency_combine(y, idx, w, h, implementation=impl)
        return q[None], s[None], cnt[None], rb[None], cnt_b[None], out

    spec_r = P("ep")
    out = _sm(local, 3, (spec_r,) * 6)(*_put(XB, IDX, W))
    return [np.asarray(o) for o in out]


@pytest.mark.parametrize("impl", ["reference", "cpu"])
def test_low_latency_masked_layout_and_combine(impl):
    q, s, cnt, rb, cnt_b, out = _ll_run(impl)
    gq, gs = (np.asarray(a) for a in per_token_cast_to_fp8(XB, implementation="reference"))
    xb = np.asarray(XB)
    m = R * MAX_T
    assert rb.shape == (R, L, m, H) and q.shape == (R, L, m, H) and s.shape == (R, L, m, H // 128)
    for d in range(R):
        for e in range(L):
            rows = [i for i in range(R * T) if d * L + e in IDX[i]]
            assert cnt[d, e] == len(rows) == cnt_b[d, e]
            np.testing.assert_array_equal(rb[d, e, :len(rows)].astype(np.float32), xb[rows].astype(np.float32))
            np.testing.assert_array_equal(q[d, e, :len(rows)].view(np.uint8), gq[rows].view(np.uint8))
            np.testing.assert_array_equal(s[d, e, :len(rows)], gs[rows])
            assert (rb[d, e, len(rows):].astype(np.float32) == 0).all()
            assert (q[d, e, len(rows):].view(np.uint8) == 0).all()
    terms = np.where((IDX >= 0)[..., None], W[..., None] * (IDX[..., None] + 1) * xb.astype(np.float64)[:, None], 0)
    want = terms.sum(1)
    bound = 3 * 2.0 ** -8 * np.abs(terms).sum(1) + 1e-6
    assert (np.abs(out.astype(np.float64) - want) <= bound).all()
    assert (out[5].astype(np.float32) == 0).all()  # a token with no expert


def _trace(fn, *args):
    """Traces fn inside shard_map over the 8-device mesh (no compile): validation runs here."""
    return jax.eval_shape(jax.shard_map(fn, mesh=MESH, in_specs=(SPEC,) * len(args), out_specs=SPEC,
                                        check_vma=False), *args)


def test_dispatch_argument_checks():
    kw = dict(num_experts=E, axis_name="ep", num_worst_tokens=R * T)
    x, idx, w = jnp.asarray(X), jnp.asarray(IDX), jnp.asarray(W)
    with pytest.raises(ValueError, match="axis_name='ep' is not a mesh axis bound here"):
        deep_ep.dispatch(x, idx, w, **kw)
    cases = [
        (lambda x, i, w: deep_ep.dispatch(x.astype(jnp.float16), i, w, **kw)[0], TypeError, "x must have dtype bfloat16 or float32, got float16"),
        (lambda x, i, w: deep_ep.dispatch(x, i, w[:, :2], **kw)[0], ValueError, r"topk_weights must have shape \(8, 4\)"),
        (lambda x, i, w: deep_ep.dispatch(x, i[:4], w[:4], **kw)[0], ValueError, "topk_idx must have 8 rows"),
        (lambda x, i, w: deep_ep.dispatch(x, i, w, num_experts=12, axis_name="ep", num_worst_tokens=8)[0], ValueError, "multiple of the number of EP ranks"),
        (lambda x, i, w: deep_ep.dispatch(x, i, w, num_experts=E, axis_name="ep", num_worst_tokens=0)[0], ValueError, "num_worst_tokens must be >= 1, got 0"),
        (lambda x, i, w: deep_ep.dispatch(x, i, w, forward_capacity=4, **kw)[0], ValueError, "forward_capacity applies to the two-hop path"),
        (lambda x, i, w: deep_ep.dispatch((x.astype(jnp.float8_e4m3fn), x[:, :3]), i, w, **kw)[0][0], ValueError, r"scales\) must have shape \(8, 2\)"),
        (lambda x, i, w: deep_ep.dispatch(x, i, w, implementation="cuda", **kw)[0], ValueError, "implementation='cuda' cannot run here"),
        (lambda x, i, w: deep_ep.low_latency_dispatch(x, i, num_max_dispatch_tokens_per_rank=4, num_experts=E, axis_name="ep")[0][0], ValueError, "more than num_max_dispatch_tokens_per_rank=4"),
    ]
    for fn, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            _trace(fn, x, idx, w)


def test_combine_argument_checks():
    def bad_rows(x, i, w):
        recv_x, _, _, _, h = deep_ep.dispatch(x, i, w, num_experts=E, axis_name="ep", num_worst_tokens=20)
        return deep_ep.combine(recv_x[:10], h)
    with pytest.raises(ValueError, match="x must have num_worst_tokens=20 rows"):
        _trace(bad_rows, jnp.asarray(X), jnp.asarray(IDX), jnp.asarray(W))
    with pytest.raises(TypeError, match="handle must be the handle returned by deep_ep.dispatch"):
        deep_ep.combine(jnp.zeros((4, 8)), {"not": "a handle"})

    def per_slot(make_x, make_w):
        def fn(x, i, w):
            recv_x, _, rw, _, h = deep_ep.dispatch(x, i, w, num_experts=E, axis_name="ep", num_worst_tokens=20)
            slots = jnp.broadcast_to(recv_x[:, None], (20, K, H))
            return deep_ep.combine(make_x(slots), h, topk_weights=make_w(rw))
        return fn
    cases = [
        (per_slot(lambda s: s, lambda w: None), "per-slot x .* needs topk_weights .* got None"),
        (per_slot(lambda s: s[:, :2], lambda w: w), r"per-slot x must have num_topk=4 slots .* got shape \(20, 2, 256\)"),
        (per_slot(lambda s: s, lambda w: w[:, :3]), r"topk_weights must have num_topk=4 columns like x, got shape \(20, 3\)"),
        (per_slot(lambda s: s[..., None], lambda w: w), r"x must have rank 2 .* or 3 .* got shape \(20, 4, 256, 1\)"),
        (per_slot(lambda s: s[:10], lambda w: w), "x must have num_worst_tokens=20 rows"),
    ]
    for fn, msg in cases:
        with pytest.raises(ValueError, match=msg):
            _trace(fn, jnp.asarray(X), jnp.asarray(IDX), jnp.asarray(W))


FWD_CAP = 3


@functools.cache
def _two_hop_run(impl):
    mesh = Mesh(np.array(jax.devices()[:R]).reshape(2, 4), ("node", "gpu"))
    spec = P(("node", "gpu"))
    q, s = per_token_cast_to_fp8(XB, implementation="reference")

    def local(x, q, s, idx, w):
        kw = dict(num_experts=E, axis_name="gpu", node_axis_name="node", num_worst_tokens=R * T, implementation=impl)
        (rq, rs), _, _, _, _ = deep_ep.dispatch((q, s), idx, w, **kw)
        rx, _, _, _, h = deep_ep.dispatch(x, idx, w, forward_capacity=FWD_CAP, **kw)
        # flat mode over both mesh axes at once (a tuple axis name): rank = node * 4 + gpu
        flat, flat_idx, _, _, _ = deep_ep.dispatch(x, idx, w, num_experts=E, axis_name=("node", "gpu"),
                                                   num_worst_tokens=R * T, implementation=impl)
        return rq, rs, deep_ep.combine(rx, h, implementation=impl), h.num_dropped[None], flat, flat_idx

    fn = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(spec,) * 5, out_specs=spec))
    args = [jax.device_put(a, NamedSharding(mesh, spec)) for a in (X, q, s, IDX, W)]
    return [np.asarray(o) for o in fn(*args)], np.asarray(q), np.asarray(s)


@pytest.mark.parametrize("impl", ["reference", "cpu"])
def test_two_hop_fp8_and_forward_capacity(impl):
    (rq, rs, plain, nd, flat, flat_idx), q, s = _two_hop_run(impl)
    gpus, n = 4, R * T
    kept = np.zeros(R * T, np.float32)
    dropped = 0
    for d in range(R):
        rows = sorted(_recv_rows(d), key=lambda i: ((i // T) % gpus, (i // T) // gpus, i % T))
        np.testing.assert_array_equal(rq[d * n:d * n + len(rows)].view(np.uint8), q[rows].view(np.uint8))
        np.testing.assert_array_equal(rs[d * n:d * n + len(rows)], s[rows])
        for g in range(gpus):  # rows forwarded by rank (node of d, g): at most FWD_CAP of them
            fwd = [i for i in rows if (i // T) % gpus == g]
            dropped += max(0, len(fwd) - FWD_CAP)
            kept[fwd[:FWD_CAP]] += 1
        flat_rows = _recv_rows(d)  # flat order: source rank, then token
        np.testing.assert_array_equal(flat[d * n:d * n + len(flat_rows)], X[flat_rows])
        gid = IDX[flat_rows]
        np.testing.assert_array_equal(flat_idx[d * n:d * n + len(flat_rows)], np.where(gid // L == d, gid - d * L, -1))
        assert (flat_idx[d * n + len(flat_rows):(d + 1) * n] == -1).all()
    assert dropped > 0
    np.testing.assert_array_equal(nd, np.full(R, dropped))
    np.testing.assert_array_equal(plain, X * kept[:, None])


@pytest.mark.gpu
def test_cuda_matches_reference_on_one_gpu():
    """The CUDA kernels inside the whole dispatch / combine / low-latency path (one GPU = one rank)."""
    mesh = Mesh(np.array(jax.devices("gpu")[:1]), ("ep",))
    e, t = 8, 32
    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.standard_normal((t, H)), jnp.bfloat16)
    idx = np.array([rng.choice(e, K, replace=False) for _ in range(t)], np.int32)
    idx[rng.random(idx.shape) < 0.2] = -1
    w = rng.random((t, K)).astype(np.float32)

    def run(impl):
        def local(x, idx, w):
            kw = dict(num_experts=e, axis_name="ep", implementation=impl)
            rx, ridx, rw, cnt, h = deep_ep.dispatch(x, idx, w, num_worst_tokens=t, expert_alignment=8, **kw)
            y = (rx.astype(jnp.float32) * 1.5).astype(jnp.bfloat16)
            out, cw = deep_ep.combine(y, h, topk_weights=rw, implementation=impl)
            slots = jnp.where((ridx >= 0)[..., None], (rx[:, None] * (1.0 + jnp.arange(K)[:, None])).astype(rx.dtype),
                              jnp.asarray(jnp.nan, rx.dtype))
            out3 = deep_ep.combine(slots, h, topk_weights=rw, implementation=impl)
            xs, ws = jax.lax.stop_gradient(x), jax.lax.stop_gradient(w)  # low latency: inference only
            (q, s), llc, llh = deep_ep.low_latency_dispatch(xs, idx, num_max_dispatch_tokens_per_rank=t, **kw)
            ll_out = deep_ep.low_latency_combine(
                jnp.zeros((e, t, H), jnp.bfloat16) + xs[:1], idx, ws, llh, implementation=impl)
            return rx, ridx, rw, cnt, out, cw, q, s, llc, ll_out, out3

        def loss(x, w):
            outs = jax.shard_map(local, mesh=mesh, in_specs=(P("ep"),) * 3, out_specs=P("ep"))(x, idx, w)
            return (outs[4].astype(jnp.float32).sum() + (outs[2] ** 2).sum()
                    + (outs[10].astype(jnp.float32) ** 2).sum()), outs
        (_, outs), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(x, w)
        return jax.tree.map(np.asarray, (outs, grads))

    got, want = run("cuda"), run("reference")
    for name, a, b in zip(("rx", "ridx", "rw", "cnt", "out", "cw", "q", "s", "llc", "ll_out", "out3"), got[0], want[0]):
        if a.dtype == jnp.float8_e4m3fn:
            np.testing.assert_array_equal(a.view(np.uint8), b.view(np.uint8), err_msg=name)
        else:
            np.testing.assert_allclose(a.astype(np.float64), b.astype(np.float64), rtol=2.0 ** -8, atol=1e-6, err_msg=name)
    for a, b in zip(got[1], want[1]):
        np.testing.assert_allclose(a.astype(np.float64), b.astype(np.float64), rtol=2.0 ** -8, atol=1e-5)
