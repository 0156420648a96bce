"""Redundant experts in DeepSeekMoE and EPLB rebalancing with expert-weight relayout
(dsjax.train.rebalance), on 8 host devices (dp=2 x ep=4) with DeepEP dispatch/combine.

Tolerances. Replicas hold bit-identical weights, so a token's expert outputs are the same
products whichever replica computes them; what changes with the placement is where they are
computed (another EP rank, another receive-buffer row, another slot of the grouped einsum), hence
the order of float32 sums: the combine of K=2 expert outputs and XLA's blocking of the per-slot
contractions. Logits therefore agree to float32 rounding of O(100)-term sums through 2 blocks:
rtol 1e-5 of the largest magnitude (observed ~1e-7). The loss after one more AdamW step agrees to
1e-5 relative as well (the gradients differ by the same rounding, AdamW normalizes them).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import Mesh

from dsjax.nn.config import DeepSeekV3Config
from dsjax.nn.ep import use_expert_parallelism
from dsjax.nn.model import DeepSeekV3
from dsjax.nn.moe import DeepSeekMoE, expert_global_norm, moe_layers, tie_expert_replica_grads
from dsjax.train.loop import _optimizer_for, _place, _train_step, clip_grads
from dsjax.train.rebalance import placement, rebalance_model
from test_eplb_online import hlo_collectives

E, EP, RED = 8, 4, 4          # 8 logical experts, 12 slots, 3 per EP rank

CLIP = 1e-3  # binding: the gradients' global norms here are ~1e-1 and more


def _mesh() -> Mesh:
    return Mesh(np.array(jax.devices()[:8]).reshape(2, EP), ("dp", "ep"))


def _step(model, opt, batch):
    """The training loop's pp=1 step (replica-tied gradients, clipped counting each expert once);
    returns (loss, load [L, E])."""
    parts, loads = _train_step(1.0)(model, opt, batch)
    return parts.total, loads


@nnx.jit
def _eval(model, batch):
    """(logits, MTP logits, next-token loss) on batch [B, S + 1]: one forward."""
    out = model(batch[:, :-1])
    lm = optax.softmax_cross_entropy_with_integer_labels(out.logits, batch[:, 1:]).mean()
    return out.logits, out.mtp_logits, lm


def _close(got, want, what, rtol=1e-5):
    got, want = np.asarray(got), np.asarray(want)
    scale = float(np.abs(want).max())
    assert scale > 0, what
    np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * scale, err_msg=what)


def _routed(obj_state, path):
    """The (param or moment) arrays w1/w3/w2 of the MoE layer at ``path`` in a pure dict."""
    node = obj_state
    for k in path:
        node = node[k]
    return [np.asarray(node[w]) for w in ("w1", "w3", "w2")]


def _adam(opt_pure, moment):
    """AdamW's ``mu`` / ``nu`` tree in the optimizer's pure dict: the loop's optimizer is
    AdamW, whose first state is ScaleByAdamState (the step clips the gradients itself)."""
    return opt_pure["opt_state"][0][moment]


def _assert_replicas_equal(arrays, phy2log, what):
    for e in np.unique(phy2log):
        slots = np.flatnonzero(phy2log == e)
        for a in arrays:
            for s in slots[1:]:
                np.testing.assert_array_equal(a[s], a[slots[0]], err_msg=f"{what}: expert {e}")


def _build(mesh, redundant):
    # One MoE block (no dense one) keeps compilation short; the MTP head adds a second MoE layer.
    cfg = DeepSeekV3Config.tiny(n_layers=1, n_dense_layers=0, n_redundant_experts=redundant)
    model = DeepSeekV3(cfg, rngs=nnx.Rngs(0))
    if mesh is not None:
        use_expert_parallelism(model, mesh, implementation="cpu")
    opt = nnx.Optimizer(model, _optimizer_for(1e-2, 1, 0.01), wrt=nnx.Param)
    if mesh is not None:
        nnx.update(model, _place(nnx.state(model), mesh, model))
        nnx.update(opt, _place(nnx.state(opt), mesh, model))
    return model, opt


def _batches(n, mesh):
    toks = jax.random.randint(jax.random.PRNGKey(7), (n, 16, 17), 0, 256)
    sh = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("dp", "ep")))
    return [jax.device_put(t, sh) for t in toks]


def test_rebalance_with_relayout_keeps_outputs_and_training_on_8_devices():
    mesh = _mesh()
    batches = _batches(4, mesh)
    a, opt_a = _build(mesh, RED)
    load = 0
    for batch in batches[:2]:
        _, load_a = _step(a, opt_a, batch)
        load = load + np.asarray(load_a, np.float32)
    paths = [p for p, _ in moe_layers(a)]
    old = np.asarray(placement(a))
    state_old = (nnx.to_pure_dict(nnx.state(a)), nnx.to_pure_dict(nnx.state(opt_a)))
    # Replicas stayed identical through two AdamW steps (weights and both moments).
    for i, p in enumerate(paths):
        _assert_replicas_equal(_routed(state_old[0], p), old[i], "weights after 2 steps")
        for moment in ("mu", "nu"):
            _assert_replicas_equal(_routed(_adam(state_old[1], moment), p), old[i],
                                   f"{moment} after 2 steps")
    logits0, mtp0, loss0 = _eval(a, batches[2])
    # The step that follows without a rebalance, then back to the saved state.
    loss_next, _ = _step(a, opt_a, batches[3])
    for obj, pure in zip((a, opt_a), state_old):
        state = nnx.state(obj)
        nnx.replace_by_pure_dict(state, pure)
        nnx.update(obj, state)

    # Make the load clearly skewed so the new placement differs from the round-robin start.
    skew = load * np.array([8, 1, 1, 1, 1, 1, 1, 3], np.float32)
    rec = rebalance_model(a, opt_a, skew, ep_size=EP, step=2, window=2)
    new = np.asarray(placement(a))
    assert rec["moved_slots"] == int((new != old).sum()) > 0
    assert rec["imbalance_after"] < rec["imbalance_before"]
    assert rec["replicas"] == E + RED and rec["layers"] == ["layer 0", "MTP block"]
    assert np.asarray(rec["rank_load_after"]).shape == (2, EP)
    np.testing.assert_allclose(np.sum(rec["rank_load_after"], 1), skew.sum(1), rtol=1e-6)
    for i, (_, m) in enumerate(moe_layers(a)):
        lc, l2p = np.asarray(m.logcnt[...]), np.asarray(m.log2phy[...])
        np.testing.assert_array_equal(lc, np.bincount(new[i], minlength=E))
        for e in range(E):
            np.testing.assert_array_equal(np.sort(l2p[e, :lc[e]]), np.flatnonzero(new[i] == e))
        assert m.w1[...].sharding.spec == jax.sharding.PartitionSpec("ep")

    # Every new slot holds an exact copy of its expert's old weights and AdamW moments.
    state_new = (nnx.to_pure_dict(nnx.state(a)), nnx.to_pure_dict(nnx.state(opt_a)))
    for i, p in enumerate(paths):
        src = np.array([np.flatnonzero(old[i] == e)[0] for e in new[i]])
        pairs = [(_routed(state_new[0], p), _routed(state_old[0], p))]
        pairs += [(_routed(_adam(state_new[1], k), p),
                   _routed(_adam(state_old[1], k), p)) for k in ("mu", "nu")]
        for got, want in pairs:
            for g, w in zip(got, want):
                np.testing.assert_array_equal(g, w[src])

    # Same function: logits, MTP logits and loss before and after the rebalance.
    logits1, mtp1, loss1 = _eval(a, batches[2])
    _close(logits1, logits0, "logits after rebalance")
    _close(mtp1, mtp0, "MTP logits after rebalance")
    _close(loss1, loss0, "loss after rebalance")
    # Training continues: the next step's loss equals the one without the rebalance.
    la, _ = _step(a, opt_a, batches[3])
    assert np.isfinite(float(la))
    _close(la, loss_next, "loss of the step after the rebalance")
    _assert_replicas_equal(_routed(nnx.to_pure_dict(nnx.state(a)), paths[0]), new[0],
                           "weights after the step following the rebalance")
    assert_step_collectives(_train_step(1.0).lower(a, opt_a, batches[3]).compile().as_text(),
                            slots=E + RED, experts=E, dim=a.cfg.dim, inter=a.cfg.moe_inter_dim,
                            layers=2)


def assert_step_collectives(hlo: str, *, slots: int, experts: int, dim: int, inter: int,
                            layers: int, replicated_weights: int = 0) -> None:
    """The compiled training step ties replica gradients by the sharded form only: one all-reduce
    of the ``K = min(P, 2(P - E))`` replicated slots' rows per routed weight of the ``layers`` MoE
    layers whose slots are split over ep, and no all-reduce of a whole ``[P, D, I]`` expert
    gradient (the global segment sum reduced every routed-weight gradient whole over the EP
    ranks), except for the ``replicated_weights`` routed weights a step keeps whole on every
    device on purpose (one all-gather in, one gradient all-reduce out, each; none in the steps
    tested now). Also no integer all-gather: replica routing runs per device, on its own
    tokens."""
    colls = hlo_collectives(hlo)
    k = min(slots, 2 * (slots - experts))
    full = {(slots, dim, inter), (slots, inter, dim)}
    reduced = [c for c in colls if c[0] in ("all-reduce", "reduce-scatter") and c[2] in full]
    assert len(reduced) == replicated_weights, reduced
    gathered = [c for c in colls if c[0] == "all-gather" and c[2] in full]
    assert len(gathered) == replicated_weights, gathered
    ties = [c for c in colls if c[0] == "all-reduce" and c[2] in {(k, dim, inter), (k, inter, dim)}]
    assert len(ties) == 3 * layers, ties
    assert not [c for c in colls if c[0] == "all-gather" and c[1].startswith("s")], "global routing"


def test_redundant_experts_train_like_plain_experts():
    """Tied replica gradients are the logical experts' gradients: a DeepSeekMoE with redundant
    slots computes the plain layer's function, every replica gets the gradient of its logical
    expert, and AdamW keeps the two layers equal step after step, with gradient clipping that
    binds: the loop's clip counts each logical expert once (a plain global norm would count the
    replicated experts twice and scale the two layers' steps differently)."""
    cfg = DeepSeekV3Config.tiny(n_layers=1, n_dense_layers=0)
    x = jax.random.normal(jax.random.PRNGKey(3), (3, 16, cfg.dim))
    probe = jax.random.normal(jax.random.PRNGKey(4), (3, 16, cfg.dim))
    layers = []
    for red in (0, RED):
        moe = DeepSeekMoE(dataclasses.replace(cfg, n_redundant_experts=red), rngs=nnx.Rngs(0))
        layers.append((moe, nnx.Optimizer(moe, _optimizer_for(1e-2, 1, 0.01), wrt=nnx.Param)))
    phy = np.asarray(layers[1][0].phy2log[...])
    assert layers[1][0].w1.shape[0] == E + RED and layers[0][0].phy2log is None
    assert sorted(np.bincount(phy)) == [1] * (E - RED) + [2] * RED

    @nnx.jit
    def step(moe, opt):
        def loss_fn(m):
            y = m(x)
            return (y * probe).sum(), y
        (_, y), grads = nnx.value_and_grad(loss_fn, has_aux=True)(moe)
        norm = expert_global_norm(moe, tie_expert_replica_grads(moe, grads))
        grads = clip_grads(moe, grads, CLIP)
        opt.update(moe, grads)
        return y, moe.load[...], grads, norm

    for i in range(3):
        (yp, load_p, gp, norm_p), (yr, load_r, gr, norm_r) = (step(m, o) for m, o in layers)
        assert float(norm_p) > 10 * CLIP  # the clip binds
        _close(norm_r, norm_p, f"expert-counted global norm at step {i}")
        np.testing.assert_array_equal(load_r, load_p)     # routing is logical
        _close(yr, yp, f"output at step {i}")
        for w in ("w1", "w3", "w2"):
            _close(gr[w][...], np.asarray(gp[w][...])[phy], f"tied gradient of {w} at step {i}")
    _assert_replicas_equal([np.asarray(getattr(layers[1][0], w)[...]) for w in ("w1", "w3", "w2")],
                           phy, "weights after 3 steps")


def test_redundant_fp8_experts_compute_the_plain_layer():
    """FP8 grouped GEMMs over the P slots: the same per-row / per-block quantized products as
    over the E experts, so the layer's output is unchanged (observed bit-identical; asserted to
    float32 rounding of the K-term combine)."""
    cfg = DeepSeekV3Config.tiny(n_layers=1, n_dense_layers=0, use_fp8=True)
    x = jax.random.normal(jax.random.PRNGKey(3), (2, 32, cfg.dim))
    run = nnx.jit(lambda m, x: m(x))
    ys = [run(DeepSeekMoE(dataclasses.replace(cfg, n_redundant_experts=red), rngs=nnx.Rngs(0)), x)
          for red in (0, RED)]
    _close(ys[1], ys[0], "FP8 MoE output with redundant experts")


def test_rebalance_errors():
    cfg = DeepSeekV3Config.tiny(n_layers=2)
    plain = DeepSeekV3(cfg, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"n_redundant_experts > 0.*layers \['layers.1.ffn', "
                                         r"'mtp.block.ffn'\] have none"):
        rebalance_model(plain, None, jnp.ones((2, E)), ep_size=EP)
    red = DeepSeekV3(DeepSeekV3Config.tiny(n_layers=2, n_redundant_experts=RED), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"load must have shape \[MoE layers, experts\] = "
                                         r"\(2, 8\), got \(1, 8\)"):
        rebalance_model(red, None, jnp.ones((1, E)), ep_size=EP)
    with pytest.raises(ValueError, match=r"ep_size must be a positive int dividing the 8 experts "
                                         r"and the 12 slots, got 3"):
        rebalance_model(red, None, jnp.ones((2, E)), ep_size=3)
    with pytest.raises(ValueError, match=r"n_redundant_experts must be an int >= 0, got -1"):
        DeepSeekV3Config.tiny(n_redundant_experts=-1)
    # Without an optimizer (serving) the model is re-placed all the same.
    old = np.asarray(placement(red))
    rec = rebalance_model(red, None, jnp.asarray([[50, 1, 1, 1, 1, 1, 1, 1]] * 2, jnp.float32),
                          ep_size=EP)
    assert rec["moved_slots"] > 0 and (np.asarray(placement(red)) != old).any()
    # The hot expert 0 got the redundant slots.
    assert int(red.layers[1].ffn.logcnt[...][0]) == 1 + RED
    assert rec["applied"] == [True, True] and rec["imbalance_after"] < rec["imbalance_before"]
    # The same load again: nothing to gain, nothing moves (only_if_better), unless forced.
    hot = jnp.asarray([[50, 1, 1, 1, 1, 1, 1, 1]] * 2, jnp.float32)
    again = rebalance_model(red, None, hot, ep_size=EP)
    assert again["applied"] == [False, False] and again["moved_slots"] == 0
    assert again["imbalance_after"] == again["imbalance_before"] == rec["imbalance_after"]
    forced = rebalance_model(red, None, hot, ep_size=EP, only_if_better=False)
    assert forced["imbalance_after"] == rec["imbalance_after"]
    with pytest.raises(ValueError, match=r"tie_replica_grads: every gradient must have leading "
                                         r"axis 12 \(slots\), got shape \(8, 3\)"):
        from dsjax.eplb import tie_replica_grads
        tie_replica_grads({"w": jnp.zeros((8, 3))}, placement(red)[0])


def test_tying_refuses_gradients_it_cannot_match():
    """Gradients of a sub-module (paths without the model's prefix) cannot be tied: an error,
    not replicas that silently drift apart."""
    model = DeepSeekV3(DeepSeekV3Config.tiny(n_layers=1, n_dense_layers=0, n_redundant_experts=RED),
                       rngs=nnx.Rngs(0))
    sub = jax.tree.map(jnp.zeros_like, nnx.state(model.layers[0], nnx.Param))
    with pytest.raises(ValueError, match=r"found 0 of the 6 routed-weight gradients"):
        tie_expert_replica_grads(model, sub)
    full = jax.tree.map(jnp.zeros_like, nnx.state(model, nnx.Param))
    assert jax.tree.structure(tie_expert_replica_grads(model, full)) == jax.tree.structure(full)
