"""EPLB bench: the jit-compiled solver against a NumPy port of DeepSeek's greedy, same run.

Configs from DeepSeek-V3 deployment (https://github.com/deepseek-ai/EPLB, V3 report §3.4):
prefill-like (L=58, E=256, R=288, 8 groups, 4 nodes, 32 GPUs) and decode-like (L=58, E=256,
R=320, 8 groups, 8 nodes, 64 GPUs), Zipf-like loads. The "reference" row is the NumPy port of
``eplb.py`` (Python loops, as the original); the jit rows are timed after compilation. Extra
columns: mean over layers of the imbalance (max GPU load / mean GPU load) before balancing, after
the greedy and after ``REFINE_STEPS`` local-search steps (swaps / moves), the mean cut of the max
GPU load by refinement, and whether the jit greedy equals the port exactly.
"""

from __future__ import annotations

import time

import jax.numpy as jnp
import numpy as np

from dsjax.bench._harness import Record, record, time_fn
from dsjax.eplb import balance_stats, rebalance_experts

REFINE_STEPS = 16
CONFIGS = {
    # name: (layers, experts, replicas, groups, nodes, gpus)
    "prefill": (58, 256, 288, 8, 4, 32),
    "decode": (58, 256, 320, 8, 8, 64),
}


# --- NumPy port of DeepSeek's eplb.py (kept apart from the tests' copy on purpose) -------------

def _np_packing(weight: np.ndarray, num_packs: int) -> tuple[np.ndarray, np.ndarray]:
    layers, n = weight.shape
    per = n // num_packs
    if per == 1:
        return np.tile(np.arange(n), (layers, 1)), np.zeros((layers, n), np.int64)
    pack = np.full((layers, n), -1, np.int64)
    rank = np.full((layers, n), -1, np.int64)
    for i in range(layers):
        pw = [np.float32(0)] * num_packs
        pn = [0] * num_packs
        for item in np.argsort(-weight[i], kind="stable"):
            p = min((k for k in range(num_packs) if pn[k] < per), key=pw.__getitem__)
            pack[i, item], rank[i, item] = p, pn[p]
            pw[p] = np.float32(pw[p] + weight[i, item])
            pn[p] += 1
    return pack, rank


def _np_replicate(weight: np.ndarray, num_phy: int):
    n, num_log = weight.shape
    phy2log = np.tile(np.arange(num_phy), (n, 1))
    rank = np.zeros((n, num_phy), np.int64)
    cnt = np.ones((n, num_log), np.int64)
    rows = np.arange(n)
    for i in range(num_log, num_phy):
        best = np.argmax(weight / cnt.astype(np.float32), axis=-1)
        phy2log[:, i], rank[:, i] = best, cnt[rows, best]
        cnt[rows, best] += 1
    return phy2log, rank, cnt


def _np_inverse(perm: np.ndarray) -> np.ndarray:
    inv = np.empty_like(perm)
    np.put_along_axis(inv, perm, np.tile(np.arange(perm.shape[1]), (perm.shape[0], 1)), axis=1)
    return inv


def numpy_rebalance(weight: np.ndarray, num_phy: int, num_groups: int, num_nodes: int,
                    num_gpus: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """NumPy port of ``eplb.rebalance_experts``; returns (phy2log, log2phy, logcnt)."""
    weight = np.asarray(weight, np.float32)
    if num_groups % num_nodes:
        num_groups = num_nodes = 1
    layers, num_log = weight.shape
    gsize = num_log // num_groups
    gpn = num_groups // num_nodes
    ppg = num_phy // num_gpus
    gpack, grank = _np_packing(weight.reshape(layers, num_groups, gsize).sum(-1), num_nodes)
    log2mlog = (((gpack * gpn + grank) * gsize)[..., None] + np.arange(gsize)).reshape(layers, -1)
    mlog2log = _np_inverse(log2mlog)
    tpm = np.take_along_axis(weight, mlog2log, -1).reshape(-1, num_log // num_nodes)
    phy2mlog, phyrank, mlogcnt = _np_replicate(tpm, num_phy // num_nodes)
    tpp = np.take_along_axis(tpm / mlogcnt.astype(np.float32), phy2mlog, -1)
    pack, rank = _np_packing(tpp, num_gpus // num_nodes)
    pphy2phy = _np_inverse(pack * ppg + rank)
    pphy2mlog = np.take_along_axis(phy2mlog, pphy2phy, -1)
    pphy2mlog = (pphy2mlog.reshape(layers, num_nodes, -1)
                 + np.arange(0, num_log, num_log // num_nodes)[None, :, None]).reshape(layers, -1)
    phy2log = np.take_along_axis(mlog2log, pphy2mlog, -1)
    phyrank = np.take_along_axis(phyrank, pphy2phy, -1).reshape(layers, -1)
    logcnt = np.take_along_axis(mlogcnt.reshape(layers, -1), log2mlog, -1)
    x = int(logcnt.max())  # data-dependent, as in the original
    log2phy = np.full((layers, num_log * x), -1, np.int64)
    np.put_along_axis(log2phy, phy2log * x + phyrank, np.tile(np.arange(num_phy), (layers, 1)), 1)
    return phy2log, log2phy.reshape(layers, num_log, x), logcnt


def zipf_loads(layers: int, experts: int, *, seed: int = 0, s: float = 1.0) -> np.ndarray:
    """Zipf-like token counts: every layer ranks its experts randomly, load ~ rank**-s."""
    rng = np.random.default_rng(seed)
    ranks = np.argsort(rng.random((layers, experts)), axis=-1) + 1
    base = 1e5 * ranks.astype(np.float64) ** -s
    return (base * rng.uniform(0.9, 1.1, base.shape)).astype(np.float32)


def _time_host(fn, *args, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def run(quick: bool) -> list[Record]:
    records: list[Record] = []
    for name, (layers, experts, replicas, groups, nodes, gpus) in CONFIGS.items():
        w = zipf_loads(layers, experts)
        wj = jnp.asarray(w)
        shape = f"{name} L{layers} E{experts} R{replicas} g{groups} n{nodes} G{gpus}"

        want = numpy_rebalance(w, replicas, groups, nodes, gpus)
        t_np = _time_host(numpy_rebalance, w, replicas, groups, nodes, gpus,
                          repeats=1 if quick else 3)

        def greedy(x):
            return rebalance_experts(x, replicas, groups, nodes, gpus)

        def refined(x):
            return rebalance_experts(x, replicas, groups, nodes, gpus, refine_steps=REFINE_STEPS)

        got = greedy(wj)
        x = want[1].shape[-1]  # the port's data-dependent width; ours is padded with -1
        l2p = np.asarray(got.log2phy)
        exact = bool(np.array_equal(np.asarray(got.phy2log), want[0])
                     and np.array_equal(l2p[..., :x], want[1]) and (l2p[..., x:] == -1).all()
                     and np.array_equal(np.asarray(got.logcnt), want[2]))
        ref_out = refined(wj)
        t_greedy = time_fn(greedy, wj, repeats=5 if quick else 20)
        t_refine = time_fn(refined, wj, repeats=5 if quick else 20)

        before = float(jnp.mean(balance_stats(wj, None, gpus).imbalance))
        s_greedy = balance_stats(wj, got.phy2log, gpus)
        s_refine = balance_stats(wj, ref_out.phy2log, gpus)
        after_g = float(jnp.mean(s_greedy.imbalance))
        after_r = float(jnp.mean(s_refine.imbalance))
        lowered = float(jnp.mean(1.0 - s_refine.max_load / s_greedy.max_load))
        common = dict(imb_before=before, imb_greedy=after_g, imb_refine=after_r)
        records.append(record("eplb", shape, "reference", t_np, note="numpy port", **common))
        records.append(record("eplb", shape, "jit", t_greedy, exact_vs_port=exact, **common))
        records.append(record("eplb", shape, f"jit+refine{REFINE_STEPS}", t_refine,
                              max_load_cut_pct=100.0 * lowered, **common))
    return records


BENCHES = {"eplb": run}
