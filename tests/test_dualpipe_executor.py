"""The shard_map executor matches a sequential reference for every schedule (f32, rel err < 1e-5)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

from dsjax.dualpipe import DualPipe, make_schedule, ops_from_log, simulate

D, MB = 8, 2  # hidden size, rows per micro-batch: tiny, the schedule logic is what is tested
# f32 sums of a few dozen products per entry: observed errors are ~5e-7; 1e-5 is the bound
RTOL = 1e-5


def stage_fn(p, x):
    return jnp.tanh(x @ p["w"] + p["b"])


def loss_fn(y, lbl):
    return jnp.mean((y - lbl) ** 2)


def make_case(num_stages: int, n: int, seed: int = 0):
    keys = jax.random.split(jax.random.PRNGKey(seed), 2 * num_stages + 2)
    params = [{"w": jax.random.normal(keys[s], (D, D)) * 0.6,
               "b": jax.random.normal(keys[num_stages + s], (D,)) * 0.1} for s in range(num_stages)]
    x = jax.random.normal(keys[-1], (n, MB, D))
    lbl = jax.random.normal(keys[-2], (n, MB, D))
    return params, x, lbl


def reference(params, x, lbl):
    """Sequential, non-pipelined: every micro-batch through every stage; grads of the summed loss."""
    def outputs(params):
        ys = []
        for m in range(x.shape[0]):
            y = x[m]
            for p in params:
                y = stage_fn(p, y)
            ys.append(y)
        return jnp.stack(ys)

    def losses(params):
        return jax.vmap(loss_fn)(outputs(params), lbl)

    return losses(params), jax.grad(lambda p: losses(p).sum())(params), outputs(params)


def rel(a, b):
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


# 1f1b with n < pp: warm-up shorter than the pipeline
CASES = [("gpipe", 4, 4), ("1f1b", 4, 3), ("zb1p", 4, 6), ("dualpipe", 4, 8), ("dualpipev", 4, 8),
         ("dualpipe", 8, 16), ("dualpipev", 8, 17)]


@pytest.fixture(scope="module", params=CASES, ids=[f"{c[0]}-pp{c[1]}-n{c[2]}" for c in CASES])
def run(request):
    name, pp, n = request.param
    sched = make_schedule(name, pp, n)
    mesh = Mesh(np.array(jax.devices()[:pp]), ("pp",))
    ex = DualPipe(stage_fn, loss_fn, schedule=sched, mesh=mesh)
    params, x, lbl = make_case(sched.num_stages, n)
    out = ex.step_detailed(params, x, lbl)
    return sched, ex, (params, x, lbl), out, reference(params, x, lbl)


def test_losses_and_grads_match_reference(run):
    sched, _, _, out, (ref_losses, ref_grads, _) = run
    assert out.losses.shape == (sched.num_microbatches,)
    assert rel(out.losses, ref_losses) < RTOL
    assert len(out.grads) == sched.num_stages
    for s in range(sched.num_stages):
        for k in ("w", "b"):
            assert rel(out.grads[s][k], ref_grads[s][k]) < RTOL, (s, k)


def test_op_order_per_rank_equals_schedule(run):
    sched, _, _, out, _ = run
    executed = ops_from_log(out.op_log)
    for r in range(sched.pp):
        assert executed[r] == list(sched.ranks[r]), f"rank {r}"


def test_stage_copies_hold_identical_grads(run):
    sched, _, _, out, _ = run
    dev = jax.tree.map(np.asarray, out.device_grads)
    seen: dict[int, list] = {}
    for r, stages in enumerate(sched.rank_stages):
        for j, s in enumerate(stages):
            seen.setdefault(s, []).append(jax.tree.map(lambda a: a[r, j], dev))
    for s, copies in seen.items():
        assert len(copies) == (2 if sched.name == "dualpipe" else 1)
        for c in copies[1:]:  # bitwise: both copies add the same two partial sums
            for k in ("w", "b"):
                np.testing.assert_array_equal(c[k], copies[0][k])


def test_activation_buffers_match_simulator_peak(run):
    sched, ex, _, _, _ = run
    assert ex.plan(True).num_res == max(simulate(sched).peak_activations)
    # the residuals kept per (stage, micro-batch) do not include a copy of the [D, D] weight
    assert ex.residual_shapes and all(shape != (D, D) for shape, _ in ex.residual_shapes)


def test_forward_only_outputs(run):
    _, ex, (params, x, _), _, (_, _, ref_out) = run
    out = ex.forward(params, x)
    assert out.shape == ref_out.shape
    assert rel(out, ref_out) < RTOL


def test_overlap_hook_is_used_and_may_reorder():
    sched = make_schedule("dualpipe", 4, 8)
    mesh = Mesh(np.array(jax.devices()[:4]), ("pp",))
    calls = []

    def backward_first(forward, backward):
        calls.append(1)
        b = backward()
        return forward(), b

    ex = DualPipe(stage_fn, loss_fn, schedule=sched, mesh=mesh, overlapped_forward_backward=backward_first)
    params, x, lbl = make_case(4, 8, seed=1)
    losses, grads = ex.step(params, x, lbl)
    ref_losses, ref_grads, _ = reference(params, x, lbl)
    assert calls  # traced once, inside the FB branch
    assert rel(losses, ref_losses) < RTOL
    assert all(rel(grads[s]["w"], ref_grads[s]["w"]) < RTOL for s in range(4))


def test_pytree_labels_and_nontrivial_loss():
    sched = make_schedule("zb1p", 4, 5)
    mesh = Mesh(np.array(jax.devices()[:4]), ("pp",))

    def ce(y, lbl):
        logp = jax.nn.log_softmax(y * lbl["scale"])
        return -jnp.mean(jnp.take_along_axis(logp, lbl["cls"][:, None], axis=-1))

    params, x, _ = make_case(4, 5, seed=2)
    lbl = {"cls": jnp.arange(5 * MB).reshape(5, MB) % D, "scale": jnp.full((5, MB, 1), 2.0)}
    losses, grads = DualPipe(stage_fn, ce, schedule=sched, mesh=mesh).step(params, x, lbl)

    def total(params):
        out = []
        for m in range(5):
            y = x[m]
            for p in params:
                y = stage_fn(p, y)
            out.append(ce(y, jax.tree.map(lambda a: a[m], lbl)))
        return jnp.stack(out)

    assert rel(losses, jax.jit(total)(params)) < RTOL
    ref = jax.jit(jax.grad(lambda p: total(p).sum()))(params)
    assert all(rel(grads[s]["w"], ref[s]["w"]) < RTOL for s in range(4))


def test_bad_arguments_raise():
    sched = make_schedule("1f1b", 4, 4)
    mesh4 = Mesh(np.array(jax.devices()[:4]), ("pp",))
    with pytest.raises(ValueError, match="must have size schedule.pp=4, got 2"):
        DualPipe(stage_fn, loss_fn, schedule=sched, mesh=Mesh(np.array(jax.devices()[:2]), ("pp",)))
    with pytest.raises(ValueError, match="must have an axis 'pp'"):
        DualPipe(stage_fn, loss_fn, schedule=sched, mesh=Mesh(np.array(jax.devices()[:4]), ("x",)))
    with pytest.raises(TypeError, match="schedule must be a Schedule"):
        DualPipe(stage_fn, loss_fn, schedule="1f1b", mesh=mesh4)
    ex = DualPipe(stage_fn, loss_fn, schedule=sched, mesh=mesh4)
    params, x, lbl = make_case(4, 4)
    with pytest.raises(ValueError, match="params must be a list of 4 per-stage pytrees"):
        ex.step(params[:3], x, lbl)
    bad = list(params)
    bad[2] = {"w": jnp.zeros((D, D + 1)), "b": jnp.zeros(D)}
    with pytest.raises(ValueError, match="stage 2 differs from stage 0"):
        ex.step(bad, x, lbl)
    with pytest.raises(ValueError, match=r"inputs must have shape \[num_microbatches=4, ...\], got \(3, 2, 8\)"):
        ex.step(params, x[:3], lbl)
    with pytest.raises(ValueError, match="labels leaves must have leading dimension num_microbatches=4"):
        ex.step(params, x, lbl[:2])
    with pytest.raises(ValueError, match="stage_fn must map an activation to the same shape"):
        DualPipe(lambda p, x: x[:, :4], loss_fn, schedule=sched, mesh=mesh4).forward(params, x)
    with pytest.raises(ValueError, match="loss_fn must return a scalar"):
        DualPipe(stage_fn, lambda y, l: y - l, schedule=sched, mesh=mesh4).step(params, x, lbl)
