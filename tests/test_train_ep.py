"""dsjax.nn.ep: routed experts with expert parallelism (DeepEP dispatch/combine under shard_map)
against the dense ``routed_experts_dense``, forward and gradients, on 8 host devices (dp=2 x ep=4).

Tolerances: EP moves rows exactly and computes the same per-expert products; only the order of
the float32 sums differs (per-rank partial sums, then the combine), so results agree to float32
rounding of sums of O(10) terms: rtol 1e-4 relative to each array's largest magnitude.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import Mesh

from dsjax.nn import router
from dsjax.nn.config import DeepSeekV3Config
from dsjax.nn.ep import ep_routed_fn, use_expert_parallelism
from dsjax.nn.model import DeepSeekV3
from dsjax.nn.moe import routed_experts_dense

T, D, I, E, K = 64, 48, 16, 8, 2


def _mesh() -> Mesh:
    return Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("dp", "ep"))


def _close(got, want, what):
    got, want = np.asarray(got), np.asarray(want)
    scale = float(np.abs(want).max())
    assert scale > 0, what
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * scale, err_msg=what)


@pytest.mark.parametrize("impl", ["reference", "cpu"])
def test_ep_routed_fn_matches_dense_forward_and_grads(impl):
    ks = jax.random.split(jax.random.PRNGKey(0), 6)
    x = jax.random.normal(ks[0], (T, D))
    gate = jax.random.normal(ks[1], (D, E))
    w1, w3 = (jax.random.normal(k, (E, D, I)) * 0.2 for k in ks[2:4])
    w2 = jax.random.normal(ks[4], (E, I, D)) * 0.2
    probe = jax.random.normal(ks[5], (T, D))

    def loss(fn, x, gate, w1, w3, w2):
        # Grouped sigmoid routing as in DeepSeekMoE, so the router's gradient goes through the
        # gating weights that dispatch carries.
        r = router.route(x @ gate, None, topk=K, n_groups=4, topk_groups=2, route_scale=2.5)
        y = fn(x, r.weights, r.indices, w1, w3, w2)
        return (y * probe).sum(), y

    grad = lambda fn: jax.jit(jax.value_and_grad(lambda *a: loss(fn, *a), argnums=range(5), has_aux=True))  # noqa: E731
    (_, y_ep), g_ep = grad(ep_routed_fn(_mesh(), implementation=impl))(x, gate, w1, w3, w2)
    (_, y_ref), g_ref = grad(routed_experts_dense)(x, gate, w1, w3, w2)
    _close(y_ep, y_ref, "forward")
    for name, a, b in zip(("x", "gate", "w1", "w3", "w2"), g_ep, g_ref):
        _close(a, b, f"gradient of {name}")


def test_model_with_ep_equals_dense_model():
    cfg = DeepSeekV3Config.tiny(n_layers=2, mtp_depth=0)
    dense = DeepSeekV3(cfg, rngs=nnx.Rngs(0))
    ep = DeepSeekV3(cfg, rngs=nnx.Rngs(0))
    assert use_expert_parallelism(ep, _mesh(), implementation="cpu") == 1
    tok = jax.random.randint(jax.random.PRNGKey(1), (8, 16), 0, cfg.vocab_size)
    _close(nnx.jit(lambda m, t: m(t).logits)(ep, tok), nnx.jit(lambda m, t: m(t).logits)(dense, tok), "logits")


def test_ep_routes_replicas_per_device_with_rotating_salt():
    """With the placement given, the EP function takes LOGICAL ids and each device routes its own
    tokens to replicas (salt = its index over dp x ep), the same code for the flat step and the
    pipeline stages. Replicas get DIFFERENT weights here, so the output shows which replica every
    token reached: it must equal the dense computation on exactly that per-device routing, and
    differ from the routing with salt 0 on every device and from one global routing."""
    from dsjax.eplb import replica_route, round_robin_placement

    slots, devices = 12, 8
    phy2log, log2phy, logcnt = round_robin_placement(E, slots)  # experts 0..3 hold 2 slots
    ks = jax.random.split(jax.random.PRNGKey(5), 5)
    x = jax.random.normal(ks[0], (T, D))
    wts = jax.random.uniform(ks[1], (T, K), minval=0.5, maxval=1.5)
    ids = jnp.argsort(jax.random.uniform(ks[2], (T, E)), axis=1)[:, :K].astype(jnp.int32)
    w1, w3 = (jax.random.normal(k, (slots, D, I)) * 0.2 for k in ks[3:5])
    w2 = jax.random.normal(ks[4], (slots, I, D)) * 0.2
    y = jax.jit(lambda *a: ep_routed_fn(_mesh(), implementation="cpu")(
        *a, placement=(log2phy, logcnt)))(x, wts, ids, w1, w3, w2)

    def dense_with(salts):
        rows = T // devices
        route = [replica_route(ids[d * rows:(d + 1) * rows], log2phy, logcnt, salt=s)
                 for d, s in enumerate(salts)]
        return routed_experts_dense(x, wts, jnp.concatenate(route), w1, w3, w2)

    _close(y, dense_with(range(devices)), "per-device replica routing")
    for other, what in ((dense_with([0] * devices), "salt 0 on every device"),
                        (routed_experts_dense(x, wts, replica_route(ids, log2phy, logcnt), w1, w3, w2),
                         "one global routing")):
        assert not np.allclose(np.asarray(y), np.asarray(other), rtol=1e-3, atol=1e-3), what


def test_ep_routed_fn_rejects_bad_shapes():
    with pytest.raises(ValueError, match=r"ep_axis 'expert' is not an axis of the mesh \(axes \('dp', 'ep'\)\)"):
        ep_routed_fn(_mesh(), ep_axis="expert")
    fn = ep_routed_fn(_mesh())
    z = jnp.zeros
    with pytest.raises(ValueError, match=r"token count \(12\) must be a multiple of the 8 devices"):
        fn(z((12, D)), z((12, K)), z((12, K), jnp.int32), z((E, D, I)), z((E, D, I)), z((E, I, D)))
    with pytest.raises(ValueError, match=r"expert count \(6\) must be a multiple of the EP size 4"):
        fn(z((16, D)), z((16, K)), z((16, K), jnp.int32), z((6, D, I)), z((6, D, I)), z((6, I, D)))


def test_training_state_places_routed_experts_on_their_ep_rank():
    from dsjax.train.loop import _optimizer_for, _place

    cfg = DeepSeekV3Config.tiny(n_layers=2)
    model = DeepSeekV3(cfg, rngs=nnx.Rngs(0))
    opt = nnx.Optimizer(model, _optimizer_for(1e-3, 10, 0.0), wrt=nnx.Param)
    mesh = _mesh()
    placed = _place((nnx.state(model), nnx.state(opt)), mesh, model)
    specs = {jax.tree_util.keystr(p): x.sharding.spec for p, x in jax.tree_util.tree_leaves_with_path(placed)}
    routed = [k for k in specs if k.endswith(("['w1'].value", "['w2'].value", "['w3'].value")) and "ffn" in k
              and "layers'][0]" not in k]  # layer 0 is the dense MLP
    # 2 MoE layers (layer 1 and the MTP block) x 3 weights, for the params and both AdamW moments.
    assert len(routed) == 2 * 3 * 3 and all(specs[k] == jax.sharding.PartitionSpec("ep") for k in routed)
    assert all(specs[k] == jax.sharding.PartitionSpec() for k in specs if k not in routed)
    w1 = model.layers[1].ffn.w1[...]
    local = placed[0]["layers"][1]["ffn"]["w1"][...].addressable_shards
    # Device (dp, ep=r) holds experts [2r, 2r + 2).
    for shard in local:
        r = list(mesh.devices.flat).index(shard.device) % 4
        np.testing.assert_array_equal(np.asarray(shard.data), np.asarray(w1[2 * r:2 * r + 2]))
