"""Tests of the online EPLB pieces: load tracker, replica routing, weight relayout on 8 devices."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from dsjax.eplb import (ExpertLoad, ExpertLoadTracker, count_experts, rebalance_experts,
                        relayout_expert_weights, replica_route, round_robin_placement,
                        tie_replica_grads)

# --------------------------------------------------------------------------- tracker


def test_count_experts_ignores_padding():
    idx = jnp.array([[0, 2], [2, -1], [5, 1]], jnp.int32)  # 5 >= E: not counted either
    np.testing.assert_array_equal(np.asarray(count_experts(idx, 4)), [1, 1, 2, 0])


def test_tracker_sliding_window_under_jit():
    layers, experts, window = 2, 6, 3
    rng = np.random.default_rng(0)
    steps = [rng.integers(-1, experts, (layers, 5, 2)) for _ in range(5)]

    @jax.jit
    def step(tr, idx):
        # Count layer by layer with a traced layer index (as inside a scan over layers), then
        # the whole stack again at once: every token is counted twice.
        tr = jax.lax.fori_loop(0, layers, lambda l, t: t.add(idx[l], layer=l), tr)
        return tr.add(idx).advance()

    tr = ExpertLoadTracker.create(layers, experts, window=window)
    for t, idx in enumerate(steps):
        tr = step(tr, jnp.asarray(idx, jnp.int32))
        # After advance() the current slot is empty; the window holds the last W - 1 steps.
        recent = steps[max(0, t - window + 2):t + 1]
        want = np.zeros((layers, experts))
        for s in recent:
            for l in range(layers):
                v = s[l].reshape(-1)
                want[l] += 2 * np.bincount(v[v >= 0], minlength=experts)
        np.testing.assert_array_equal(np.asarray(tr.load()), want)
    assert int(tr.steps) == 5
    tr = tr.add_counts(jnp.ones((layers, experts)))
    assert float(tr.load().sum()) == pytest.approx(float(want.sum()) + layers * experts)


def test_tracker_is_pytree_and_nnx_state():
    tr = ExpertLoadTracker.create(2, 4, window=2)
    leaves, treedef = jax.tree_util.tree_flatten(tr)
    assert len(leaves) == 3
    assert jax.tree_util.tree_unflatten(treedef, leaves).window == 2

    class Moe(nnx.Module):
        def __init__(self):
            self.w = nnx.Param(jnp.ones((3,)))
            self.load = ExpertLoad(ExpertLoadTracker.create(2, 4, window=2))

        def __call__(self, idx):
            self.load.set_value(self.load.get_value().add(idx))
            return self.w[...].sum()

    m = Moe()

    @nnx.jit
    def fwd(m, idx):
        return m(idx)

    fwd(m, jnp.array([[[0, 1]], [[3, 3]]], jnp.int32))
    np.testing.assert_array_equal(np.asarray(m.load.get_value().load()),
                                  [[1, 1, 0, 0], [0, 0, 0, 2]])
    # Not a parameter: an optimizer over nnx.Param does not see it.
    params = nnx.state(m, nnx.Param)
    assert len(jax.tree_util.tree_leaves(params)) == 1


def test_tracker_errors():
    tr = ExpertLoadTracker.create(2, 4)
    with pytest.raises(ValueError, match=r"topk_idx must have shape \[2, ...\]"):
        tr.add(jnp.zeros((3, 5), jnp.int32))
    with pytest.raises(TypeError, match="topk_idx must have an integer dtype, got float32"):
        tr.add(jnp.zeros((2, 5), jnp.float32))
    with pytest.raises(ValueError, match=r"layer must be in \[0, 2\), got 2"):
        tr.add(jnp.zeros((5,), jnp.int32), layer=2)
    with pytest.raises(ValueError, match="window must be an int >= 1, got 0"):
        ExpertLoadTracker.create(2, 4, window=0)

# --------------------------------------------------------------------------- routing


def _solve_one_layer(seed=0):
    w = (np.random.default_rng(seed).pareto(1.0, (1, 16)) * 100 + 1).astype(np.float32)
    out = rebalance_experts(jnp.asarray(w), 32, 4, 2, 8)
    return out.phy2log[0], out.log2phy[0], out.logcnt[0]


@pytest.mark.parametrize("salt", [0, 3])
def test_replica_route_balance_and_determinism(salt):
    phy2log, log2phy, logcnt = _solve_one_layer()
    rng = np.random.default_rng(1)
    topk = rng.integers(0, 16, (333, 4)).astype(np.int32)
    topk[::7, 1] = -1
    route = jax.jit(lambda t, s: replica_route(t, log2phy, logcnt, salt=s))
    phy = np.asarray(route(jnp.asarray(topk), salt))
    np.testing.assert_array_equal(phy, np.asarray(route(jnp.asarray(topk), salt)))
    assert (phy[topk < 0] == -1).all()
    valid = topk >= 0
    # Every routed slot holds the expert the token chose.
    np.testing.assert_array_equal(np.asarray(phy2log)[phy[valid]], topk[valid])
    # Tokens of an expert spread evenly over its replicas: sizes differ by at most one.
    per_slot = np.bincount(phy[valid], minlength=32)
    logcnt = np.asarray(logcnt)
    assert (logcnt > 1).any()
    for e in range(16):
        slots = np.asarray(log2phy)[e, :logcnt[e]]
        n_e = int((topk == e).sum())
        loads = per_slot[slots]
        assert loads.sum() == n_e
        assert loads.max() - loads.min() <= 1, (e, loads)


def test_replica_route_salt_rotates_and_shapes():
    _, log2phy, logcnt = _solve_one_layer()
    e = int(np.argmax(np.asarray(logcnt)))
    topk = jnp.full((1, 1), e, jnp.int32)  # one token: the salt picks the replica
    cnt = int(logcnt[e])
    got = {int(replica_route(topk, log2phy, logcnt, salt=s)[0, 0]) for s in range(cnt)}
    assert got == set(np.asarray(log2phy)[e, :cnt].tolist())
    assert replica_route(jnp.zeros((0, 8), jnp.int32), log2phy, logcnt).shape == (0, 8)
    with pytest.raises(ValueError, match=r"logcnt must have shape \(16,\)"):
        replica_route(topk, log2phy, logcnt[:3])

# --------------------------------------------------------------------------- relayout


def _layouts():
    w_a = (np.random.default_rng(2).pareto(1.0, (1, 16)) * 10 + 1).astype(np.float32)
    w_b = (np.random.default_rng(3).pareto(1.0, (1, 16)) * 10 + 1).astype(np.float32)
    a = rebalance_experts(jnp.asarray(w_a), 32, 4, 2, 8).phy2log[0]
    b = rebalance_experts(jnp.asarray(w_b), 32, 4, 2, 8).phy2log[0]
    assert not np.array_equal(np.asarray(a), np.asarray(b))
    return a, b


def _expert_weights(phy2log, base):
    # Replicas are copies of their expert: slot s holds base[phy2log[s]].
    return jax.tree_util.tree_map(lambda x: x[np.asarray(phy2log)], base)


def test_relayout_round_trip_gather():
    a, b = _layouts()
    base = {"w1": jnp.asarray(np.random.default_rng(4).normal(size=(16, 3, 5)), jnp.float32),
            "w2": jnp.arange(16 * 2, dtype=jnp.int32).reshape(16, 2)}
    wa = _expert_weights(a, base)
    wb = jax.jit(relayout_expert_weights)(wa, a, b)
    jax.tree_util.tree_map(np.testing.assert_array_equal, wb, _expert_weights(b, base))
    back = relayout_expert_weights(wb, b, a)
    jax.tree_util.tree_map(np.testing.assert_array_equal, back, wa)


def test_relayout_under_shard_map_8_devices():
    a, b = _layouts()
    mesh = Mesh(np.array(jax.devices()[:8]), ("ep",))
    base = jnp.asarray(np.random.default_rng(5).normal(size=(16, 4, 6)), jnp.float32)
    wa = jax.device_put(_expert_weights(a, base), NamedSharding(mesh, P("ep")))

    def move(w, old, new):
        return relayout_expert_weights(w, old, new, axis_name="ep")

    f = jax.jit(jax.shard_map(move, mesh=mesh, in_specs=(P("ep"), P(), P()), out_specs=P("ep")))
    wb = f(wa, a, b)
    np.testing.assert_array_equal(np.asarray(wb), np.asarray(_expert_weights(b, base)))
    np.testing.assert_array_equal(np.asarray(f(wb, b, a)), np.asarray(wa))
    # The lowered program moves data with collective permutes, not an all-gather.
    hlo = f.lower(wa, a, b).as_text()
    assert "collective_permute" in hlo and "all_gather" not in hlo


def test_relayout_errors():
    a, b = _layouts()
    w = jnp.zeros((32, 2))
    missing = jnp.asarray(np.where(np.asarray(a) == 0, 1, np.asarray(a)), jnp.int32)
    with pytest.raises(ValueError, match=r"must appear in old_phy2log, missing \[0\]"):
        relayout_expert_weights(w, missing, b)
    with pytest.raises(ValueError, match=r"new_phy2log must have shape \(32,\)"):
        relayout_expert_weights(w, a, b[:8])
    with pytest.raises(ValueError, match="leading axis 32"):
        relayout_expert_weights(jnp.zeros((31, 2)), a, b)


# --------------------------------------------------------------------------- placement state


@pytest.mark.parametrize("e,r", [(8, 12), (4, 4), (3, 8)])
def test_round_robin_placement_is_consistent(e, r):
    phy2log, log2phy, logcnt = (np.asarray(a) for a in round_robin_placement(e, r))
    assert phy2log.shape == (r,) and log2phy.shape == (e, r - e + 1) and logcnt.shape == (e,)
    np.testing.assert_array_equal(phy2log, np.arange(r) % e)
    np.testing.assert_array_equal(logcnt, np.bincount(phy2log, minlength=e))
    for x in range(e):
        np.testing.assert_array_equal(log2phy[x, :logcnt[x]], np.flatnonzero(phy2log == x))
        assert (log2phy[x, logcnt[x]:] == -1).all()
    # Same shapes as the solver's output, so a later placement can replace it in place.
    res = rebalance_experts(jnp.ones((1, e)), r, 1, 1, 1)
    assert res.log2phy.shape[1:] == log2phy.shape and res.phy2log.shape[1:] == phy2log.shape
    # replica_route with it spreads an expert's tokens over its slots.
    idx = jnp.zeros((6, 1), jnp.int32)
    got = np.asarray(replica_route(idx, jnp.asarray(log2phy), jnp.asarray(logcnt)))
    assert sorted(np.bincount(got.ravel(), minlength=r)[phy2log == 0]) == sorted(
        [6 // logcnt[0] + (i < 6 % logcnt[0]) for i in range(logcnt[0])])
    with pytest.raises(ValueError, match=r"num_replicas must be >= num_experts \(5\), got 4"):
        round_robin_placement(5, 4)


def test_tie_replica_grads_sums_replicas_and_keeps_singletons_exact():
    phy2log = jnp.array([2, 0, 1, 2, 0, 2], jnp.int32)
    g = jnp.asarray(np.random.default_rng(6).normal(size=(6, 3, 2)), jnp.float32)
    h = jnp.arange(6, dtype=jnp.bfloat16)
    out = jax.jit(tie_replica_grads)({"g": g, "h": h}, phy2log)
    gn = np.asarray(g)
    for s, e in enumerate(np.asarray(phy2log)):
        want = gn[np.asarray(phy2log) == e].sum(0)
        np.testing.assert_allclose(np.asarray(out["g"][s]), want, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(out["g"][2]), gn[2])     # one replica: unchanged
    assert out["h"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(out["h"], np.float32), [8, 5, 2, 8, 5, 8])  # 0+3+5, 1+4, 2
    with pytest.raises(ValueError, match=r"leading axis 6 \(slots\), got shape \(5,\)"):
        tie_replica_grads(jnp.zeros(5), phy2log)
    with pytest.raises(TypeError, match="phy2log must have an integer dtype"):
        tie_replica_grads(g, phy2log.astype(jnp.float32))


# --------------------------------------------------------------------------- sharded replica tie

_COLLECTIVE = re.compile(r"=\s*(.*?)\s(all-gather|all-reduce|reduce-scatter|all-to-all|"
                         r"collective-permute)(?:-start)?\(")


def hlo_collectives(hlo: str) -> list[tuple[str, str, tuple[int, ...]]]:
    """``(op, dtype, dims)`` of every array operand/result shape of every collective of a
    compiled (partitioned, per-device) HLO module's text: the traffic XLA emits."""
    out = []
    for line in hlo.splitlines():
        m = _COLLECTIVE.search(line)
        if m:
            for dtype, dims in re.findall(r"([a-z]+\d*)\[([\d,]*)\]", m.group(1)):
                out.append((m.group(2), dtype, tuple(int(d) for d in dims.split(",") if d)))
    return out


def _tie_cases():
    e, r = 8, 12
    rr = np.asarray(round_robin_placement(e, r)[0])  # 4 experts x 2 replicas: K = 8 slots, the bound
    hot = np.array([0, 0, 0, 1, 2, 3, 4, 5, 0, 6, 7, 1])  # expert 0 x4 (3 ranks), expert 1 x2
    return [(e, rr), (e, hot), (r, np.random.default_rng(3).permutation(r))]  # last: no replica


@pytest.mark.parametrize("case", range(3))
def test_sharded_tie_equals_global_bit_for_bit(case):
    """The sharded form (one psum of the replicated slots' rows over ep, dp=2 x ep=4) gives the
    global form's result on one device exactly: every buffer row is non-zero on one device only,
    and each expert sums its rows in slot order like the segment sum. (The global form jitted on
    SHARDED gradients sums per-shard partials first, so for an expert with 3+ replicas spread
    over ranks it may differ from both by float32 rounding; replicas are equal either way.)
    Singletons are untouched."""
    num_experts, phy = _tie_cases()[case]
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("dp", "ep"))
    rng = np.random.default_rng(case)
    g = {"a": jnp.asarray(rng.normal(size=(12, 3, 2)), jnp.float32),
         "b": jnp.asarray(rng.normal(size=(12, 4)), jnp.bfloat16)}
    phy2log = jnp.asarray(phy, jnp.int32)
    want = jax.jit(tie_replica_grads)(g, phy2log)
    g = jax.device_put(g, NamedSharding(mesh, P("ep")))
    f = jax.jit(jax.shard_map(
        lambda g, p: tie_replica_grads(g, p, axis_name="ep", num_experts=num_experts),
        mesh=mesh, in_specs=(P("ep"), P()), out_specs=P("ep")))
    got = f(g, phy2log)
    single = np.bincount(phy)[phy] == 1
    for k in g:
        np.testing.assert_array_equal(np.asarray(got[k], np.float32), np.asarray(want[k], np.float32))
        np.testing.assert_array_equal(np.asarray(got[k], np.float32)[single],
                                      np.asarray(g[k], np.float32)[single])
        assert got[k].dtype == g[k].dtype
    for e in np.unique(phy):  # replicas bit-identical, holding their expert's sum
        rows = np.asarray(got["a"])[phy == e]
        assert (rows == rows[0]).all()
        np.testing.assert_allclose(rows[0], np.asarray(g["a"])[phy == e].sum(0), rtol=1e-6, atol=1e-6)
    # Traffic: the global form reduces the whole [12, ...] gradient over the EP ranks; the sharded
    # one exchanges only the K = min(R, 2(R - E)) replicated slots' rows (none without replicas).
    k = min(12, 2 * (12 - num_experts))
    full = {x for x in hlo_collectives(jax.jit(tie_replica_grads).lower(g, phy2log).compile().as_text())
            if x[2][:1] == (12,)}
    if case == 0:
        assert ("all-reduce", "f32", (12, 3, 2)) in full  # the check can see the traffic
    shapes = {x[2] for x in hlo_collectives(f.lower(g, phy2log).compile().as_text())}
    assert not any(s[:1] == (12,) for s in shapes)
    assert ((k, 3, 2) in shapes) == (k > 0) and ((k, 4) in shapes) == (k > 0)


def test_sharded_tie_errors_and_bad_traced_placement():
    mesh = Mesh(np.array(jax.devices()[:4]), ("ep",))

    def run(phy, num_experts, rows=12):
        body = lambda g, p: tie_replica_grads(g, p, axis_name="ep", num_experts=num_experts)  # noqa: E731
        sm = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(P("ep"), P()), out_specs=P("ep")))
        return sm(jnp.ones((rows, 2), jnp.float32), jnp.asarray(phy, jnp.int32))

    rr = round_robin_placement(8, 12)[0]
    for bad_e in (None, 0, 13, 8.0):
        with pytest.raises(ValueError, match=r"num_experts must be an int in \[1, 12\] \(the logical "
                                             rf"experts of the 12 slots\) with axis_name, got {bad_e!r}"):
            run(rr, bad_e)
    with pytest.raises(ValueError, match=r"leading axis 3 \(= 12 slots / 4 shards\), got shape \(2, 2\)"):
        run(rr, 8, rows=8)
    # A placement leaving experts 2..7 without a slot has 12 > K = 8 replicated slots (it cannot
    # be refused: the placement is traced): all of them become NaN rather than partial sums.
    assert np.isnan(np.asarray(run(np.array([0] * 6 + [1] * 6), 8))).all()
    np.testing.assert_array_equal(np.asarray(run(rr, 8))[:, 0], np.where(np.arange(12) % 8 < 4, 2.0, 1.0))
