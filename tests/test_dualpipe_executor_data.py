"""The executor's data-parallel features: rows split over mesh axes inside each stage (with
collectives in the stage), parameters split over those axes, loss parameters, input gradients,
auxiliary losses and statistics; all checked against a single-device reference."""

from __future__ import annotations

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
