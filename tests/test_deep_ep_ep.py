"""DeepEP dispatch / combine on 8 host CPU devices (meshes 8 and 2x4), against numpy and reference_moe.

DeepEP's own checks: tokens arrive in per-source segments with the right local ids and weights;
combine(dispatch(x)) equals x times the number of distinct destination ranks; layout counts equal
an all-gathered reference; the FP8 path's calc_diff < 5e-4; an EP MoE layer's forward and
gradients equal the dense ``reference_moe``, both with the caller-weighted 2-D combine and with
combine's per-slot 3-D form (the weighted reduce inside combine; slots of other ranks hold NaN and
must not leak); overflow is counted (and strict mode raises).

Each implementation compiles one program per mode (cached, module-wide): shard_map programs over 8
devices compile slowly on 2 cores. Tolerances: f32 data is moved exactly and summed in f32 in a
fixed order; the MoE comparison differs from the dense oracle only by the order of f32 sums
(rtol 1e-5); bf16 sums of identical values are exact.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from dsjax import deep_ep

R, T, H, K, E = 8, 8, 256, 4, 16
L = E // R
NODES, GPUS = 2, 4
IMPLS = ["reference", "cpu"]
SCALE = np.float32(0.5) + np.float32(0.1) * np.arange(E, dtype=np.float32)


def _data():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((R * T, H)).astype(np.float32)
    x[:, 0] = np.repeat(np.arange(R), T)  # source rank
    x[:, 1] = np.tile(np.arange(T), R)    # source token
    idx = np.array([rng.choice(E, K, replace=False) for _ in range(R * T)], np.int32)
    idx[rng.random(idx.shape) < 0.2] = -1
    for s in range(R):
        idx[s * T + 0] = -1                           # a token with no expert
        idx[s * T + 1] = [s * L, s * L + 1, -1, -1]   # a token whose experts are all local
    w = rng.random((R * T, K)).astype(np.float32)
    return x, idx, w


X, IDX, W = _data()
PROBE = np.random.default_rng(1).standard_normal((R * T, H)).astype(np.float32)


def _expert_fn(ids, rows):
    return jnp.tanh(rows * jnp.asarray(SCALE)[ids][:, None])


def _moe_rows(rank, recv_x, recv_idx, recv_w):
    """Expert side of an EP MoE layer: weighted sum of the local experts' outputs per row."""
    y = jnp.zeros(recv_x.shape, jnp.float32)
    for k in range(K):
        e = jnp.maximum(recv_idx[:, k], 0) + rank * L
        y = y + jnp.where((recv_idx[:, k] >= 0)[:, None], recv_w[:, k:k + 1] * _expert_fn(e, recv_x), 0.0)
    return y.astype(recv_x.dtype)


def _moe_slots(rank, recv_x, recv_idx):
    """Per-slot expert outputs ``[N, K, H]`` for combine's 3-D form; slots without a local expert
    (and every slot of a padding row) hold NaN, which combine must never read."""
    ys = []
    for k in range(K):
        e = jnp.maximum(recv_idx[:, k], 0) + rank * L
        ys.append(jnp.where((recv_idx[:, k] >= 0)[:, None], _expert_fn(e, recv_x), jnp.nan))
    return jnp.stack(ys, axis=1).astype(recv_x.dtype)


def _mesh(hier: bool) -> Mesh:
    devs = np.array(jax.devices()[:R])
    return Mesh(devs.reshape(NODES, GPUS), ("node", "gpu")) if hier else Mesh(devs, ("ep",))


def _shard(mesh, *arrays):
    spec = P(tuple(mesh.axis_names))
    return [jax.device_put(a, NamedSharding(mesh, spec)) for a in arrays]


def _dests(row, per):
    return sorted({int(e) // per for e in row if e >= 0})


def _expected_rows(hier: bool):
    """Per destination rank: the (source rank, token) list in dsjax's receive order."""
    out = []
    for d in range(R):
        pairs = [(s, t) for s in range(R) for t in range(T) if d in _dests(IDX[s * T + t], L)]
        if hier:  # forwarder (= source gpu) first, then source node, then token
            pairs.sort(key=lambda p: (p[0] % GPUS, p[0] // GPUS, p[1]))
        out.append(pairs)
    return out


@functools.cache
def _moe_run(impl: str, hier: bool):
    """One compiled program: dispatch, MoE via the 2-D and the 3-D combine, plain combine (+ weights),
    layout, and the gradients of each MoE output (one shared forward, one pullback per output)."""
    mesh = _mesh(hier)
    axes = tuple(mesh.axis_names)
    n = R * T  # worst case: nothing can be dropped
    kw = (dict(axis_name="gpu", node_axis_name="node") if hier else dict(axis_name="ep"))

    def local(x, idx, w):
        rank = jax.lax.axis_index(axes)
        recv_x, recv_idx, recv_w, per_expert, h = deep_ep.dispatch(
            x, idx, w, num_experts=E, num_worst_tokens=n, expert_alignment=4, implementation=impl, **kw)
        out = deep_ep.combine(_moe_rows(rank, recv_x, recv_idx, recv_w), h, implementation=impl)
        out3 = deep_ep.combine(_moe_slots(rank, recv_x, recv_idx), h, topk_weights=recv_w, implementation=impl)
        plain, comb_w = deep_ep.combine(recv_x, h, topk_weights=recv_w, implementation=impl)
        lay = deep_ep.get_dispatch_layout(idx, num_experts=E, num_ranks=R, ranks_per_node=GPUS,
                                          implementation=impl)
        aux = dict(recv_x=recv_x, recv_idx=recv_idx, recv_w=recv_w, per_expert=per_expert,
                   dropped=h.num_dropped[None], kept=h.num_recv_tokens[None], plain=plain, comb_w=comb_w,
                   per_rank=lay.num_tokens_per_rank, per_node=lay.num_tokens_per_node,
                   per_exp_layout=lay.num_tokens_per_expert, in_rank=lay.is_token_in_rank,
                   hop1=h.send_src[0])
        return (out, out3), aux

    spec = P(axes)
    sm = jax.shard_map(local, mesh=mesh, in_specs=(spec, spec, spec), out_specs=((spec, spec), spec))

    @jax.jit
    def fn(x, w, idx):
        (out, out3), pull, aux = jax.vjp(lambda x, w: sm(x, idx, w), x, w, has_aux=True)
        probe, zero = jnp.asarray(PROBE), jnp.zeros_like(out)
        return out, out3, aux, pull((probe, zero)), pull((zero, probe))

    x, w, idx = _shard(mesh, X, W, IDX)
    out, out3, aux, grads, grads3 = fn(x, w, idx)
    return jax.tree.map(np.asarray, (out, aux, grads, out3, grads3))


@functools.cache
def _oracle():
    def loss(x, w):
        out = deep_ep.reference_moe(x, jnp.asarray(IDX), w, _expert_fn)
        return (out * PROBE).sum(), out
    (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(X, W)
    return np.asarray(out), [np.asarray(g) for g in grads]


@pytest.mark.parametrize("hier", [False, True], ids=["flat8", "hier2x4"])
@pytest.mark.parametrize("impl", IMPLS)
def test_moe_layer_matches_reference_moe(impl, hier):
    out, _, grads, _, _ = _moe_run(impl, hier)
    ref_out, ref_grads = _oracle()
    np.testing.assert_allclose(out, ref_out, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(grads[0], ref_grads[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(grads[1], ref_grads[1], rtol=1e-5, atol=1e-4)
    # tokens without experts get nothing back, and no gradient
    assert (out[0::T] == 0).all() and (grads[0][0::T] == 0).all()


@pytest.mark.parametrize("hier", [False, True], ids=["flat8", "hier2x4"])
@pytest.mark.parametrize("impl", IMPLS)
def test_per_slot_combine_matches_reference_moe(impl, hier):
    """combine(x [N, K, H], topk_weights=recv_w) is the weighted MoE output; NaN in the slots of
    other ranks' experts and in padding rows reaches neither the output nor the gradients."""
    _, _, _, out3, grads3 = _moe_run(impl, hier)
    ref_out, ref_grads = _oracle()
    assert np.isfinite(out3).all() and all(np.isfinite(g).all() for g in grads3)
    np.testing.assert_allclose(out3, ref_out, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(grads3[0], ref_grads[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(grads3[1], ref_grads[1], rtol=1e-5, atol=1e-4)
    assert (out3[0::T] == 0).all() and (grads3[0][0::T] == 0).all() and (grads3[1][0::T] == 0).all()


@pytest.mark.parametrize("hier", [False, True], ids=["flat8", "hier2x4"])
@pytest.mark.parametrize("impl", IMPLS)
def test_dispatch_layout_segments_and_ids(impl, hier):
    _, aux, _, _, _ = _moe_run(impl, hier)
    n = R * T
    recv_x, recv_idx, recv_w = (aux[k].reshape(R, n, -1) for k in ("recv_x", "recv_idx", "recv_w"))
    per_expert = aux["per_expert"].reshape(R, L)
    assert (aux["dropped"] == 0).all()
    for d, pairs in enumerate(_expected_rows(hier)):
        m = len(pairs)
        assert aux["kept"][d] == m
        got = recv_x[d, :m, :2].astype(int)
        np.testing.assert_array_equal(got, np.array(pairs).reshape(m, 2), err_msg=f"rank {d} order")
        rows = np.array([s * T + t for s, t in pairs], int).reshape(m)
        np.testing.assert_array_equal(recv_x[d, :m], X[rows])
        gid = IDX[rows]
        mine = (gid >= 0) & (gid // L == d)
        np.testing.assert_array_equal(recv_idx[d, :m], np.where(mine, gid - d * L, -1))
        np.testing.assert_array_equal(recv_w[d, :m], np.where(mine, W[rows], 0))
        assert (recv_x[d, m:] == 0).all() and (recv_idx[d, m:] == -1).all() and (recv_w[d, m:] == 0).all()
        counts = [(recv_idx[d, :m] == e).any(1).sum() for e in range(L)]
        np.testing.assert_array_equal(per_expert[d], -(-np.array(counts) // 4) * 4)  # expert_alignment=4


@pytest.mark.parametrize("hier", [False, True], ids=["flat8", "hier2x4"])
@pytest.mark.parametrize("impl", IMPLS)
def test_combine_of_dispatch_counts_destinations(impl, hier):
    _, aux, _, _, _ = _moe_run(impl, hier)
    ndest = np.array([len(_dests(r, L)) for r in IDX], np.float32)
    np.testing.assert_array_equal(aux["plain"], X * ndest[:, None])
    np.testing.assert_array_equal(aux["comb_w"], np.where(IDX >= 0, W, 0))


@pytest.mark.parametrize("impl", IMPLS)
def test_layout_counts_equal_all_gathered_reference(impl):
    _, aux, _, _, _ = _moe_run(impl, False)
    in_rank = np.zeros((R * T, R), bool)
    for i, row in enumerate(IDX):
        in_rank[i, _dests(row, L)] = True
    np.testing.assert_array_equal(aux["in_rank"], in_rank)
    np.testing.assert_array_equal(aux["per_rank"].reshape(R, R), in_rank.reshape(R, T, R).sum(1))
    np.testing.assert_array_equal(aux["per_rank"].reshape(R, R).sum(0), in_rank.sum(0))
    node = in_rank.reshape(R, T, NODES, GPUS).any(3).sum(1)
    np.testing.assert_array_equal(aux["per_node"].reshape(R, NODES), node)
    per_e = np.array([[(IDX[s * T:(s + 1) * T] == e).any(1).sum() for e in range(E)] for s in range(R)])
    np.testing.assert_array_equal(aux["per_exp_layout"].reshape(R, E), per_e)


@pytest.mark.parametrize("impl", IMPLS)
def test_two_hop_sends_one_copy_per_destination_node(impl):
    _, aux, _, _, _ = _moe_run(impl, True)
    hop1 = aux["hop1"].reshape(R, NODES, T)  # send_src of the node hop: [rank, dest node, slot]
    for s in range(R):
        for nd in range(NODES):
            want = [t for t in range(T) if any(d // GPUS == nd for d in _dests(IDX[s * T + t], L))]
            got = hop1[s, nd][hop1[s, nd] >= 0]
            np.testing.assert_array_equal(got, want)  # each token once per node, in order


@pytest.mark.parametrize("impl", ["reference", "cpu"])
def test_weight_gradient_ignores_slots_of_other_ranks(impl):
    """recv_topk_weights is 0 where the expert lives on another rank; a loss that touches those
    slots must not leak into topk_weights' gradient (a token sent to two ranks carries all K
    slots in both copies)."""
    import numpy as np
    from jax.sharding import Mesh, PartitionSpec as P

    from dsjax import deep_ep

    mesh = Mesh(np.array(jax.devices()[:4]), ("ep",))
    idx = jnp.asarray(np.array([[0, 7], [2, 3], [4, 1], [6, 5]] * 4, np.int32))
    w = jnp.asarray(np.random.default_rng(0).random((16, 2)), jnp.float32)
    x = jnp.ones((16, 8), jnp.float32)

    def local(x, idx, w):
        _, _, rw, _, _ = deep_ep.dispatch(x, idx, w, num_experts=8, axis_name="ep", num_worst_tokens=16,
                                          implementation=impl)
        return rw.sum()[None]

    f = jax.shard_map(local, mesh=mesh, in_specs=(P("ep"), P("ep"), P("ep")), out_specs=P("ep"))
    g = jax.grad(lambda w: f(x, idx, w).sum())(w)
    np.testing.assert_array_equal(np.asarray(g), np.ones((16, 2), np.float32))
