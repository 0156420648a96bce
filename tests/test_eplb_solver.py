"""Tests of dsjax.eplb.rebalance_experts against a NumPy port of DeepSeek's EPLB greedy.

The port below follows https://github.com/deepseek-ai/EPLB (eplb.py) line by line with Python
loops, in float32 like the reference (``weight.float()``; torch divides float32 by an int64 count
in float32). Its sort is stable descending, which is what torch's CPU sort does at these sizes.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dsjax.eplb import balance_stats, max_replicas_bound, rebalance_experts

# --------------------------------------------------------------------------- NumPy port (oracle)


def np_balanced_packing(weight: np.ndarray, num_packs: int) -> tuple[np.ndarray, np.ndarray]:
    layers, n = weight.shape
    per_pack = n // num_packs
    if per_pack == 1:
        return np.tile(np.arange(n), (layers, 1)), np.zeros((layers, n), np.int64)
    pack_index = np.full((layers, n), -1, np.int64)
    rank_in_pack = np.full((layers, n), -1, np.int64)
    for i in range(layers):
        order = np.argsort(-weight[i], kind="stable")
        pack_w = [np.float32(0)] * num_packs
        pack_n = [0] * num_packs
        for item in order:
            pack = min((p for p in range(num_packs) if pack_n[p] < per_pack),
                       key=pack_w.__getitem__)
            pack_index[i, item] = pack
            rank_in_pack[i, item] = pack_n[pack]
            pack_w[pack] = np.float32(pack_w[pack] + weight[i, item])
            pack_n[pack] += 1
    return pack_index, rank_in_pack


def np_replicate_experts(weight: np.ndarray, num_phy: int):
    n, num_log = weight.shape
    phy2log = np.tile(np.arange(num_phy), (n, 1))
    rank = np.zeros((n, num_phy), np.int64)
    logcnt = np.ones((n, num_log), np.int64)
    rows = np.arange(n)
    for i in range(num_log, num_phy):
        best = np.argmax(weight / logcnt.astype(np.float32), axis=-1)
        phy2log[:, i] = best
        rank[:, i] = logcnt[rows, best]
        logcnt[rows, best] += 1
    return phy2log, rank, logcnt


def np_inverse(perm: np.ndarray) -> np.ndarray:
    inv = np.empty_like(perm)
    np.put_along_axis(inv, perm, np.tile(np.arange(perm.shape[1]), (perm.shape[0], 1)), axis=1)
    return inv


def np_hierarchical(weight, num_phy, num_groups, num_nodes, num_gpus):
    layers, num_log = weight.shape
    group_size = num_log // num_groups
    groups_per_node = num_groups // num_nodes
    phy_per_gpu = num_phy // num_gpus
    tokens_per_group = weight.reshape(layers, num_groups, group_size).sum(-1)
    gpack, grank = np_balanced_packing(tokens_per_group, num_nodes)
    log2mlog = (((gpack * groups_per_node + grank) * group_size)[..., None]
                + np.arange(group_size)).reshape(layers, -1)
    mlog2log = np_inverse(log2mlog)
    tokens_per_mlog = np.take_along_axis(weight, mlog2log, -1).reshape(-1, num_log // num_nodes)
    phy2mlog, phyrank, mlogcnt = np_replicate_experts(tokens_per_mlog, num_phy // num_nodes)
    tokens_per_phy = np.take_along_axis(tokens_per_mlog / mlogcnt.astype(np.float32), phy2mlog, -1)
    pack, rank = np_balanced_packing(tokens_per_phy, num_gpus // num_nodes)
    pphy2phy = np_inverse(pack * phy_per_gpu + rank)
    pphy2mlog = np.take_along_axis(phy2mlog, pphy2phy, -1)
    pphy2mlog = (pphy2mlog.reshape(layers, num_nodes, -1)
                 + np.arange(0, num_log, num_log // num_nodes)[None, :, None]).reshape(layers, -1)
    pphy2log = np.take_along_axis(mlog2log, pphy2mlog, -1)
    pphyrank = np.take_along_axis(phyrank, pphy2phy, -1).reshape(layers, -1)
    logcnt = np.take_along_axis(mlogcnt.reshape(layers, -1), log2mlog, -1)
    return pphy2log, pphyrank, logcnt


def np_rebalance_experts(weight, num_replicas, num_groups, num_nodes, num_gpus, max_replicas):
    weight = np.asarray(weight, np.float32)
    layers, num_log = weight.shape
    if num_groups % num_nodes == 0:
        phy2log, rank, logcnt = np_hierarchical(weight, num_replicas, num_groups, num_nodes,
                                                num_gpus)
    else:
        phy2log, rank, logcnt = np_hierarchical(weight, num_replicas, 1, 1, num_gpus)
    log2phy = np.full((layers, num_log * max_replicas), -1, np.int64)
    np.put_along_axis(log2phy, phy2log * max_replicas + rank,
                      np.tile(np.arange(num_replicas), (layers, 1)), axis=1)
    return phy2log, log2phy.reshape(layers, num_log, max_replicas), logcnt


# --------------------------------------------------------------------------- helpers

README_WEIGHT = np.array([[90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86],
                          [20, 107, 104, 64, 19, 197, 187, 157, 172, 86, 16, 27]])
README_PHY2LOG = np.array([[5, 6, 5, 7, 8, 4, 3, 4, 10, 9, 10, 2, 0, 1, 11, 1],
                           [7, 10, 6, 8, 6, 11, 8, 9, 2, 4, 5, 1, 5, 0, 3, 1]])

# (layers, experts, replicas, groups, nodes, gpus): hierarchical, global (groups % nodes != 0),
# one item per pack at either level, no redundancy, one GPU.
CONFIGS = [
    (3, 16, 24, 4, 2, 4),
    (2, 32, 48, 8, 4, 8),
    (2, 12, 16, 3, 2, 4),     # global policy
    (2, 16, 20, 4, 4, 4),     # one group per node
    (2, 16, 16, 4, 2, 16),    # one replica per GPU, no redundant experts
    (1, 8, 12, 1, 1, 1),      # everything on one GPU
    (2, 64, 80, 8, 2, 16),
]


def _random_loads(seed: int, layers: int, experts: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    # Heavy-tailed, distinct floats: ties have probability ~0.
    return (rng.pareto(1.2, (layers, experts)) * 100 + rng.random((layers, experts))).astype(
        np.float32)


def _default_x(experts: int, replicas: int) -> int:
    return replicas - experts + 1


# --------------------------------------------------------------------------- tests


def test_readme_example():
    phy2log, log2phy, logcnt = rebalance_experts(jnp.asarray(README_WEIGHT), 16, 4, 2, 8)
    np.testing.assert_array_equal(np.asarray(phy2log), README_PHY2LOG)
    want = np_rebalance_experts(README_WEIGHT, 16, 4, 2, 8, 5)
    np.testing.assert_array_equal(np.asarray(log2phy), want[1])
    np.testing.assert_array_equal(np.asarray(logcnt), want[2])
    assert phy2log.dtype == log2phy.dtype == logcnt.dtype == jnp.int32


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: "L{}-E{}-R{}-g{}-n{}-G{}".format(*c))
def test_matches_numpy_port(cfg):
    layers, experts, replicas, groups, nodes, gpus = cfg
    for seed in range(2):
        w = _random_loads(seed + 10 * experts, layers, experts)
        got = rebalance_experts(jnp.asarray(w), replicas, groups, nodes, gpus)
        want = np_rebalance_experts(w, replicas, groups, nodes, gpus,
                                    _default_x(experts, replicas))
        for name, g, x in zip(("phy2log", "log2phy", "logcnt"), got, want):
            np.testing.assert_array_equal(np.asarray(g), x, err_msg=f"{name} seed={seed}")


def test_integer_and_bf16_loads_match_port():
    w = np.random.default_rng(1).permutation(np.arange(1, 65)).reshape(2, 32) * 7  # no ties
    got = rebalance_experts(jnp.asarray(w, jnp.int32), 48, 8, 4, 8)
    want = np_rebalance_experts(w, 48, 8, 4, 8, 17)
    for g, x in zip(got, want):
        np.testing.assert_array_equal(np.asarray(g), x)
    wb = jnp.asarray(w, jnp.bfloat16)  # bf16 is cast to float32 first, like torch's .float()
    got = rebalance_experts(wb, 48, 8, 4, 8)
    want = np_rebalance_experts(np.asarray(wb.astype(jnp.float32)), 48, 8, 4, 8, 17)
    np.testing.assert_array_equal(np.asarray(got.phy2log), want[0])


def _check_properties(w, phy2log, log2phy, logcnt, replicas, groups, nodes, gpus):
    layers, experts = w.shape
    phy2log, log2phy, logcnt = map(np.asarray, (phy2log, log2phy, logcnt))
    assert phy2log.shape == (layers, replicas)
    assert ((phy2log >= 0) & (phy2log < experts)).all()
    assert (logcnt >= 1).all()
    np.testing.assert_array_equal(logcnt.sum(-1), np.full(layers, replicas))
    for l in range(layers):
        np.testing.assert_array_equal(np.bincount(phy2log[l], minlength=experts), logcnt[l])
        # log2phy inverts phy2log: the listed slots of e hold e, -1 padding after logcnt[e].
        for e in range(experts):
            slots = log2phy[l, e, :logcnt[l, e]]
            assert (slots >= 0).all() and (phy2log[l, slots] == e).all()
            assert len(set(slots.tolist())) == logcnt[l, e]
            assert (log2phy[l, e, logcnt[l, e]:] == -1).all()
    # Every GPU holds R / num_gpus slots by construction of the slot numbering; check that the
    # slot -> GPU map covers each GPU equally and, in hierarchical mode, that every replica of an
    # expert sits in the node its group was packed to.
    if groups % nodes == 0:
        slot_node = np.arange(replicas) // (replicas // nodes)
        group_size = experts // groups
        for l in range(layers):
            for e in range(experts):
                nodes_of_e = set(slot_node[log2phy[l, e, :logcnt[l, e]]].tolist())
                assert len(nodes_of_e) == 1
            # All experts of a group share a node, and every node has groups / nodes groups.
            node_of_expert = np.array([slot_node[log2phy[l, e, 0]] for e in range(experts)])
            per_group = node_of_expert.reshape(groups, group_size)
            assert (per_group == per_group[:, :1]).all()
            np.testing.assert_array_equal(np.bincount(per_group[:, 0], minlength=nodes),
                                          np.full(nodes, groups // nodes))


_PROP_CONFIGS = [(2, 16, 24, 4, 2, 4), (2, 12, 16, 3, 2, 4), (2, 16, 32, 4, 4, 8)]


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cfg=st.sampled_from(_PROP_CONFIGS), seed=st.integers(0, 2**31 - 1), ints=st.booleans())
def test_properties(cfg, seed, ints):
    # (Refined placements are checked against the same properties in the refine tests.)
    layers, experts, replicas, groups, nodes, gpus = cfg
    rng = np.random.default_rng(seed)
    # Integer loads (with ties and zeros) exercise the tie-breaking paths; floats the general one.
    w = (rng.integers(0, 5, (layers, experts)) if ints
         else rng.exponential(1.0, (layers, experts))).astype(np.float32)
    out = rebalance_experts(jnp.asarray(w), replicas, groups, nodes, gpus)
    _check_properties(w, *out, replicas, groups, nodes, gpus)


def test_jit_and_vmap():
    w = _random_loads(3, 2, 16)
    eager = rebalance_experts(jnp.asarray(w), 24, 4, 2, 4)
    jitted = jax.jit(functools.partial(rebalance_experts, num_replicas=24, num_groups=4,
                                       num_nodes=2, num_gpus=4))(jnp.asarray(w))
    for a, b in zip(eager, jitted):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # No host round trip: once compiled, solving a device-resident load moves nothing to the
    # host (the guard raises on any implicit transfer).
    wd = jax.device_put(jnp.asarray(w))
    with jax.transfer_guard("disallow"):
        on_device = rebalance_experts(wd, 24, 4, 2, 4, refine_steps=0)
        stats = balance_stats(wd, on_device.phy2log, 4)
    np.testing.assert_array_equal(np.asarray(on_device.phy2log), np.asarray(eager.phy2log))
    assert np.isfinite(np.asarray(stats.imbalance)).all()
    # vmap over an extra leading axis (e.g. several candidate load windows).
    stacked = np.stack([w, w[::-1]])
    batched = jax.vmap(lambda x: rebalance_experts(x, 24, 4, 2, 4))(jnp.asarray(stacked))
    for k in range(2):
        want = np_rebalance_experts(stacked[k], 24, 4, 2, 4, 9)
        for a, b in zip(batched, want):
            np.testing.assert_array_equal(np.asarray(a)[k], b)


def test_max_replicas_padding_and_bound():
    w = _random_loads(4, 2, 16)
    base = rebalance_experts(jnp.asarray(w), 24, 4, 2, 4)  # default X = 24 - 16 + 1 = 9
    assert base.log2phy.shape == (2, 16, 9)
    # Hierarchical: an expert competes only within its node, so (24 - 16) / 2 + 1 = 5 suffices.
    assert max_replicas_bound(16, 24, 4, 2) == 5
    assert max_replicas_bound(12, 16, 3, 2) == 5  # global policy: 16 - 12 + 1
    assert (np.asarray(base.log2phy)[..., 5:] == -1).all()
    tight = rebalance_experts(jnp.asarray(w), 24, 4, 2, 4, max_replicas=5)
    np.testing.assert_array_equal(np.asarray(tight.log2phy), np.asarray(base.log2phy)[..., :5])
    with pytest.raises(ValueError, match="max_replicas must be >= 5.*got 4"):
        rebalance_experts(jnp.asarray(w), 24, 4, 2, 4, max_replicas=4)


def test_one_hot_expert_gets_all_redundant_replicas_global():
    # Global policy: all R - E redundant slots go to the single loaded expert.
    w = np.zeros((1, 12), np.float32)
    w[0, 3] = 100.0
    out = rebalance_experts(jnp.asarray(w), 16, 3, 2, 4)  # 3 % 2 != 0 -> global
    assert int(out.logcnt[0, 3]) == 5
    want = np_rebalance_experts(w, 16, 3, 2, 4, 5)
    for a, b in zip(out, want):
        np.testing.assert_array_equal(np.asarray(a), b)


_REFINE_CONFIGS = [(4, 64, 80, 8, 2, 16), (4, 32, 48, 4, 4, 8), (3, 24, 36, 3, 2, 6)]


@pytest.mark.parametrize("cfg", _REFINE_CONFIGS)
def test_refine_never_increases_max_load(cfg):
    layers, experts, replicas, groups, nodes, gpus = cfg
    w = _random_loads(7, layers, experts)
    greedy = rebalance_experts(jnp.asarray(w), replicas, groups, nodes, gpus)
    refined = rebalance_experts(jnp.asarray(w), replicas, groups, nodes, gpus, refine_steps=16)
    _check_properties(w, *refined, replicas, groups, nodes, gpus)
    # Swaps and moves stay inside a node: every node holds the same set of experts as before.
    used_nodes = nodes if groups % nodes == 0 else 1
    node_of_slot = np.arange(replicas) // (replicas // used_nodes)
    for l in range(layers):
        for k in range(used_nodes):
            here = node_of_slot == k
            assert (set(np.asarray(greedy.phy2log)[l][here].tolist())
                    == set(np.asarray(refined.phy2log)[l][here].tolist()))
    s_greedy = balance_stats(jnp.asarray(w), greedy.phy2log, gpus)
    s_refined = balance_stats(jnp.asarray(w), refined.phy2log, gpus)
    g, r = np.asarray(s_greedy.max_load), np.asarray(s_refined.max_load)
    assert (r <= g).all(), (g, r)


def test_refine_finds_improvements_on_uniform_loads():
    # Uniform loads, 5 replicas per GPU: the greedy ends within a few percent of the mean and a
    # swap can almost always shave the heaviest GPU; over 4 layers it must in at least one.
    # (Same shapes as _REFINE_CONFIGS[0], so the compiled solvers are reused.)
    w = (np.random.default_rng(5).random((4, 64)) * 100).astype(np.float32)
    greedy = rebalance_experts(jnp.asarray(w), 80, 8, 2, 16)
    refined = rebalance_experts(jnp.asarray(w), 80, 8, 2, 16, refine_steps=16)
    g = np.asarray(balance_stats(jnp.asarray(w), greedy.phy2log, 16).max_load)
    r = np.asarray(balance_stats(jnp.asarray(w), refined.phy2log, 16).max_load)
    assert (r <= g).all() and (r < g).any(), (g, r)
    # The greedy itself is unchanged by refine_steps=0 (exactly the reference).
    want = np_rebalance_experts(w, 80, 8, 2, 16, 17)
    np.testing.assert_array_equal(np.asarray(greedy.phy2log), want[0])


def test_refine_moves_a_replica_between_experts():
    # One GPU pair, 2 slots each, loads [100, 1]. The greedy gives expert 0 three replicas
    # (33.3 each) and packs two of them together: GPUs {33.3, 33.3} and {33.3, 1}, max 66.7.
    # No swap helps; moving one replica of expert 0 to expert 1 gives {50, 0.5} twice.
    w = jnp.array([[100.0, 1.0]])
    greedy = rebalance_experts(w, 4, 1, 1, 2)
    np.testing.assert_array_equal(np.asarray(greedy.logcnt), [[3, 1]])
    np.testing.assert_allclose(np.asarray(balance_stats(w, greedy.phy2log, 2).max_load),
                               [200 / 3], rtol=1e-6)
    refined = rebalance_experts(w, 4, 1, 1, 2, refine_steps=4)
    np.testing.assert_array_equal(np.asarray(refined.logcnt), [[2, 2]])
    np.testing.assert_allclose(np.asarray(balance_stats(w, refined.phy2log, 2).max_load),
                               [50.5], rtol=1e-6)
    _check_properties(np.asarray(w), *refined, 4, 1, 1, 2)
    # Each GPU holds one replica of each expert.
    np.testing.assert_array_equal(np.sort(np.asarray(refined.phy2log).reshape(2, 2), -1),
                                  [[0, 1], [0, 1]])


def test_balance_stats_values():
    w = np.array([[4.0, 2.0, 1.0, 1.0]], np.float32)
    ident = balance_stats(jnp.asarray(w), None, 2)  # GPUs hold {0, 1} and {2, 3}
    np.testing.assert_allclose(np.asarray(ident.max_load), [6.0])
    np.testing.assert_allclose(np.asarray(ident.mean_load), [4.0])
    np.testing.assert_allclose(np.asarray(ident.imbalance), [1.5])
    # Experts 0 and 1 twice: replicas carry 2, 1, 1, 2, 1, 1; GPUs hold slots {0, 1, 2}, {3, 4, 5}.
    phy2log = np.array([[0, 1, 2, 0, 3, 1]], np.int32)
    st_ = balance_stats(jnp.asarray(w), jnp.asarray(phy2log), 2)
    np.testing.assert_allclose(np.asarray(st_.max_load), [4.0])
    np.testing.assert_allclose(np.asarray(st_.imbalance), [1.0])
    zero = balance_stats(jnp.zeros((1, 4)), None, 2)
    np.testing.assert_allclose(np.asarray(zero.imbalance), [1.0])


def test_greedy_lowers_imbalance_on_skewed_loads():
    w = _random_loads(11, 4, 64)
    out = rebalance_experts(jnp.asarray(w), 80, 8, 2, 16)
    before = np.asarray(balance_stats(jnp.asarray(w), None, 16).imbalance)
    after = np.asarray(balance_stats(jnp.asarray(w), out.phy2log, 16).imbalance)
    assert (after < before).all() and (after >= 1.0 - 1e-6).all()


@pytest.mark.parametrize("args, kwargs, exc, match", [
    ((np.ones((2, 10), np.float32), 12, 4, 2, 4), {}, ValueError, "multiple of num_groups"),
    ((np.ones((2, 16), np.float32), 24, 4, 2, 3), {}, ValueError, "num_gpus must be a multiple"),
    ((np.ones((2, 16), np.float32), 20, 4, 2, 8), {}, ValueError, "num_replicas must be a multip"),
    ((np.ones((2, 16), np.float32), 8, 4, 2, 4), {}, ValueError, "num_replicas must be >= the"),
    ((np.ones((16,), np.float32), 24, 4, 2, 4), {}, ValueError, "rank 2"),
    ((np.ones((2, 16), np.complex64), 24, 4, 2, 4), {}, TypeError, "float or integer"),
    ((np.ones((2, 16), np.float32), 24.0, 4, 2, 4), {}, TypeError, "num_replicas must be a Py"),
    ((np.ones((2, 16), np.float32), 24, 0, 2, 4), {}, ValueError, "num_groups must be >= 1"),
    ((np.ones((2, 16), np.float32), 24, 4, 2, 4), {"refine_steps": -1}, ValueError,
     "refine_steps must be >= 0"),
    ((np.ones((2, 0), np.float32), 24, 4, 2, 4), {}, ValueError, "at least one expert"),
])
def test_errors(args, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        rebalance_experts(*args, **kwargs)
