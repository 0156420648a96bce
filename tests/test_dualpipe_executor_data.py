"""The executor's data-parallel features: rows split over mesh axes inside each stage (with
collectives in the stage), parameters split over those axes, loss parameters, input gradients,
auxiliary losses and statistics; all checked against a single-device reference."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec as P

from dsjax.dualpipe import DualPipe, make_schedule

D, R, ROWS = 8, 4, 8  # hidden, data shards ("ep"), rows per micro-batch (2 per shard)
# f32 sums of a few dozen products: observed errors ~1e-7; same bound as the plain executor tests
RTOL = 1e-5
AUX = 0.01


def stage_fn(p, x):
    """x: this shard's rows. Each shard holds one "expert" matrix of ``e``; every shard's expert
    sees every row (all_gather) and the partial products come back summed to the rows' owners
    (psum_scatter), as an expert-parallel layer moves tokens."""
    h = jnp.tanh(x @ p["w"])
    everyone = jax.lax.all_gather(h, "ep", tiled=True)
    y = h + jax.lax.psum_scatter(everyone @ p["e"][0], "ep", tiled=True)
    return y, AUX * jnp.mean(h ** 2), {"pos": jnp.sum(h > 0).astype(jnp.int32), "step": p["count"]}


def loss_fn(lp, y, lbl):
    loss = jnp.mean((y @ lp["head"] - lbl) ** 2)
    return loss, {"loss_sum": loss}


def ref_stage(p, x):
    h = jnp.tanh(x @ p["w"])
    return h + h @ p["e"].sum(0), AUX * jnp.mean(h ** 2), jnp.sum(h > 0)


def reference(params, lp, x, lbl):
    def total(params, lp, x):
        tot, losses, auxes, pos = 0.0, [], [], [0] * len(params)
        for m in range(x.shape[0]):
            y, aux_m = x[m], 0.0
            for s, p in enumerate(params):
                y, aux, c = ref_stage(p, y)
                aux_m, pos[s] = aux_m + aux, pos[s] + c
            loss = jnp.mean((y @ lp["head"] - lbl[m]) ** 2)
            losses.append(loss)
            auxes.append(aux_m)
            tot = tot + loss + aux_m
        return tot, (jnp.stack(losses), jnp.stack(auxes), pos)
    (_, aux), g = jax.value_and_grad(total, argnums=(0, 1, 2), has_aux=True, allow_int=True)(params, lp, x)
    return aux, g


def rel(a, b):
    return float(jnp.linalg.norm(jnp.asarray(a, jnp.float32) - b) / jnp.linalg.norm(b))


CASES = [("dualpipe", 2, 4), ("zb1p", 2, 3)]  # two copies per stage; split backward (BI then W)


@pytest.mark.parametrize("name,pp,n", CASES, ids=[c[0] for c in CASES])
def test_data_parallel_stages_match_reference(name, pp, n):
    sched = make_schedule(name, pp, n)
    mesh = Mesh(np.array(jax.devices()[:pp * R]).reshape(pp, R), ("pp", "ep"))
    keys = jax.random.split(jax.random.PRNGKey(1), 3 * sched.num_stages + 3)
    params = [{"w": jax.random.normal(keys[3 * s], (D, D)) * 0.5,
               "e": jax.random.normal(keys[3 * s + 1], (R, D, D)) * 0.2,
               "count": jnp.int32(7 + s)} for s in range(sched.num_stages)]
    lp = {"head": jax.random.normal(keys[-3], (D, D)) * 0.5}
    x = jax.random.normal(keys[-2], (n, ROWS, D))
    lbl = jax.random.normal(keys[-1], (n, ROWS, D))
    specs = lambda path, leaf: P("ep") if jax.tree_util.keystr(path) == "['e']" else None  # noqa: E731
    ex = DualPipe(stage_fn, loss_fn, schedule=sched, mesh=mesh, data_axes=("ep",), param_specs=specs,
                  with_stats=True)
    out = ex.step_detailed(params, x, lbl, loss_params=lp)
    (ref_losses, ref_aux, ref_pos), (g_p, g_lp, g_x) = reference(params, lp, x, lbl)
    assert rel(out.losses, ref_losses) < RTOL
    assert rel(out.aux_losses, ref_aux) < RTOL
    for s in range(sched.num_stages):
        assert rel(out.grads[s]["w"], g_p[s]["w"]) < RTOL, s
        assert rel(out.grads[s]["e"], g_p[s]["e"]) < RTOL, s
        assert out.grads[s]["count"].dtype == jnp.int32 and int(out.grads[s]["count"]) == 0
        assert int(out.stats[s]["pos"]) == int(ref_pos[s])
        # an integer parameter passes through untouched: every (micro-batch, shard) saw it
        assert int(out.stats[s]["step"]) == (7 + s) * n * R
    assert rel(out.loss_param_grads["head"], g_lp["head"]) < RTOL
    assert rel(out.input_grads, g_x) < RTOL
    np.testing.assert_allclose(float(out.loss_stats["loss_sum"]), float(ref_losses.sum()) * R, rtol=RTOL)


def test_data_axes_errors():
    sched = make_schedule("1f1b", 2, 2)
    mesh = Mesh(np.array(jax.devices()[:2 * R]).reshape(2, R), ("pp", "ep"))
    with pytest.raises(ValueError, match=r"data_axes must be distinct mesh axes other than 'pp', got \('dp',\)"):
        DualPipe(stage_fn, loss_fn, schedule=sched, mesh=mesh, data_axes=("dp",))
    ex = DualPipe(stage_fn, loss_fn, schedule=sched, mesh=mesh, data_axes=("ep",), with_stats=True)
    params = [{"w": jnp.zeros((D, D)), "e": jnp.zeros((R, D, D)), "count": jnp.int32(0)}] * 2
    with pytest.raises(ValueError, match=r"inputs must have a second \(row\) dimension divisible by the 4 devices"):
        ex.step_detailed(params, jnp.zeros((2, 6, D)), jnp.zeros((2, 6, D)), loss_params={"head": jnp.eye(D)})
    bad = DualPipe(stage_fn, loss_fn, schedule=sched, mesh=mesh, data_axes=("ep",), with_stats=True,
                   param_specs=lambda path, leaf: P("pp"))
    with pytest.raises(ValueError, match="param_specs gave .* naming non-pipeline mesh axes"):
        bad.step_detailed(params, jnp.zeros((2, 8, D)), jnp.zeros((2, 8, D)), loss_params={"head": jnp.eye(D)})


def loss_fn_ep(lp, y, lbl):
    """The loss with an expert-parallel block of its own: ``lp["e"]`` is ``[R, D, D]`` whole
    (replicated loss parameters: this shard picks its expert) or this shard's ``[1, D, D]`` (split
    by ``loss_param_specs``); either way the same function, ``z = h + h @ Σ_r e[r]``."""
    e = lp["e"]
    if e.shape[0] == R:
        e = jax.lax.dynamic_index_in_dim(e, jax.lax.axis_index("ep"), keepdims=True)
    h = y @ lp["head"]
    z = h + jax.lax.psum_scatter(jax.lax.all_gather(h, "ep", tiled=True) @ e[0], "ep", tiled=True)
    loss = jnp.mean((z - lbl) ** 2)
    return loss, {"loss_sum": loss}


def _ep_case(sched):
    keys = jax.random.split(jax.random.PRNGKey(2), 2 * sched.num_stages + 4)
    params = [{"w": jax.random.normal(keys[2 * s], (D, D)) * 0.5,
               "e": jax.random.normal(keys[2 * s + 1], (R, D, D)) * 0.2,
               "count": jnp.int32(s)} for s in range(sched.num_stages)]
    lp = {"head": jax.random.normal(keys[-4], (D, D)) * 0.5, "e": jax.random.normal(keys[-3], (R, D, D)) * 0.2,
          "steps": jnp.int32(3)}
    x = jax.random.normal(keys[-2], (sched.num_microbatches, ROWS, D))
    lbl = jax.random.normal(keys[-1], (sched.num_microbatches, ROWS, D))
    return params, lp, x, lbl


def _ep_reference(params, lp, x, lbl):
    def total(params, lp):
        tot = 0.0
        for m in range(x.shape[0]):
            y = x[m]
            for p in params:
                y, aux, _ = ref_stage(p, y)
                tot = tot + aux
            h = y @ lp["head"]
            tot = tot + jnp.mean((h + h @ lp["e"].sum(0) - lbl[m]) ** 2)
        return tot
    return jax.grad(total, argnums=(0, 1), allow_int=True)(params, {"head": lp["head"], "e": lp["e"]})


def _whole_collectives(ex, params, lp, x, lbl, shape):
    from test_eplb_online import hlo_collectives
    hlo = ex._program(True, True).lower(list(params), x, lbl, lp).compile().as_text()
    return [c for c in hlo_collectives(hlo) if c[0] in ("all-reduce", "all-gather", "reduce-scatter")
            and c[2] == shape]


def test_loss_param_specs_split_loss_parameters():
    """``loss_param_specs``: ``loss_fn`` gets its shard of a split loss parameter, the gradient
    comes back split the same way (no whole ``[R, D, D]`` gradient is all-reduced, nor the
    parameter all-gathered, as they are when the loss parameters are replicated), and both forms
    equal the single-device reference (f32, RTOL as above). A spec function that splits nothing
    gives the replicated program bit for bit (the default's behaviour)."""
    sched = make_schedule("dualpipe", 2, 4)
    mesh = Mesh(np.array(jax.devices()[:2 * R]).reshape(2, R), ("pp", "ep"))
    params, lp, x, lbl = _ep_case(sched)
    specs = lambda path, leaf: P("ep") if jax.tree_util.keystr(path) == "['e']" else None  # noqa: E731
    kw = dict(schedule=sched, mesh=mesh, data_axes=("ep",), param_specs=specs, with_stats=True)
    g_p, g_lp = _ep_reference(params, lp, x, lbl)
    split = DualPipe(stage_fn, loss_fn_ep, loss_param_specs=specs, **kw)
    whole = DualPipe(stage_fn, loss_fn_ep, **kw)
    nothing = DualPipe(stage_fn, loss_fn_ep, loss_param_specs=lambda path, leaf: None, **kw)
    outs = [ex.step_detailed(params, x, lbl, loss_params=lp) for ex in (split, whole, nothing)]
    for out in outs:
        for k in ("head", "e"):
            assert rel(out.loss_param_grads[k], g_lp[k]) < RTOL, k
        assert out.loss_param_grads["steps"].dtype == jnp.int32 and int(out.loss_param_grads["steps"]) == 0
        for s in range(sched.num_stages):
            assert rel(out.grads[s]["w"], g_p[s]["w"]) < RTOL, s
    ge = outs[0].loss_param_grads["e"]
    assert ge.sharding.spec == P("ep") and ge.addressable_shards[0].data.shape == (1, D, D)
    assert outs[1].loss_param_grads["e"].sharding.is_fully_replicated
    fields = [f.name for f in dataclasses.fields(outs[1])]
    for a, b in zip(*(jax.tree.leaves([getattr(o, f) for f in fields]) for o in outs[1:])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    shape = (R, D, D)
    assert _whole_collectives(split, params, lp, x, lbl, shape) == []
    assert len(_whole_collectives(whole, params, lp, x, lbl, shape)) >= 1  # the check can fail


def test_loss_param_specs_errors():
    sched = make_schedule("1f1b", 2, 2)
    mesh = Mesh(np.array(jax.devices()[:2 * R]).reshape(2, R), ("pp", "ep"))
    params = [{"w": jnp.zeros((D, D)), "e": jnp.zeros((R, D, D)), "count": jnp.int32(0)}] * 2
    lp = {"head": jnp.eye(D), "e": jnp.zeros((R, D, D)), "steps": jnp.int32(0)}
    for bad, msg in [(P("pp"), r"loss_param_specs gave \('pp',\) for the leaf at \['e'\] of shape \(4, 8, 8\); "
                                r"expected at most 3 entries naming non-pipeline mesh axes"),
                     (P(None, None, None, "ep"),
                      r"loss_param_specs gave \(None, None, None, 'ep'\) .* expected at most 3"),
                     (P("ep", "ep"), "each at most once")]:
        ex = DualPipe(stage_fn, loss_fn_ep, schedule=sched, mesh=mesh, data_axes=("ep",), with_stats=True,
                      loss_param_specs=lambda path, leaf, sp=bad: sp if jax.tree_util.keystr(path) == "['e']" else None)
        with pytest.raises(ValueError, match=msg):
            ex.step_detailed(params, jnp.zeros((2, 8, D)), jnp.zeros((2, 8, D)), loss_params=lp)
    # a dimension the axes do not divide: [3, ...] over ep (4)
    ex = DualPipe(stage_fn, loss_fn_ep, schedule=sched, mesh=mesh, data_axes=("ep",), with_stats=True,
                  loss_param_specs=lambda path, leaf: P("ep") if jax.tree_util.keystr(path) == "['e']" else None)
    with pytest.raises(ValueError, match=r"expected dimensions divisible by the mesh axes that split them, "
                                         r"got 3 over ep of size 4"):
        ex.step_detailed(params, jnp.zeros((2, 8, D)), jnp.zeros((2, 8, D)),
                         loss_params={**lp, "e": jnp.zeros((3, D, D))})
