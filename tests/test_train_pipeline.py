"""Pipeline-parallel training step (dsjax.train.pipeline) on 8 host devices, mesh pp=2 x ep=4:
DualPipe over the MoE layers, DeepEP expert parallelism inside each stage, the embedding and dense
layer before the pipeline, head + MTP after it. The step must compute the same loss, gradients and
expert loads as the whole model on the whole batch."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import Mesh

from dsjax._src.testing import calc_diff
from dsjax.nn.config import DeepSeekV3Config
from dsjax.nn.model import DeepSeekV3, lm_loss
from dsjax.train.pipeline import Pipeline

V, B, S = 64, 16, 16


def _mesh(dp: int = 1) -> Mesh:
    return Mesh(np.array(jax.devices()[:2 * dp * 4]).reshape(2, dp, 4), ("pp", "dp", "ep"))


def _reference(cfg, tokens):
    model = DeepSeekV3(cfg, rngs=nnx.Rngs(0))

    def f(m):
        parts = lm_loss(m, tokens)
        return parts.total, parts
    (_, parts), grads = nnx.value_and_grad(f, has_aux=True)(model)
    moes = [layer.ffn.load[...] for layer in list(model.layers)[cfg.n_dense_layers:]]
    return parts, grads, np.stack(moes + [model.mtp.block.ffn.load[...]])


def _pipelined(cfg, tokens, schedule, mesh):
    model = DeepSeekV3(cfg, rngs=nnx.Rngs(0))
    pipe = Pipeline(mesh, cfg, schedule=schedule, num_microbatches=4, implementation="cpu")
    pipe.prepare(model)
    return nnx.jit(lambda m, t: pipe.loss_and_grads(m, t))(model, tokens)


def _tokens():
    return jax.random.randint(jax.random.PRNGKey(1), (B, S + 1), 0, V)


def test_dualpipe_step_equals_whole_model():
    """float32: the same sums in another order (micro-batches, EP ranks): observed max relative
    error of any gradient leaf ~2e-6; bound 1e-4. Loads are integer counts: exact."""
    cfg = DeepSeekV3Config.tiny(n_layers=3, vocab_size=V)
    tokens = _tokens()
    ref_parts, ref_grads, ref_loads = _reference(cfg, tokens)
    parts, grads, stats = _pipelined(cfg, tokens, "dualpipe", _mesh())
    for name in ("total", "lm", "mtp"):
        np.testing.assert_allclose(float(getattr(parts, name)), float(getattr(ref_parts, name)), rtol=1e-5)
    # the balance losses are ~1e-4 of the total: compared on their own scale
    np.testing.assert_allclose(float(parts.balance), float(ref_parts.balance), rtol=1e-3)
    flat_ref = jax.tree_util.tree_leaves_with_path(ref_grads)
    flat = jax.tree.leaves(grads)
    assert len(flat) == len(flat_ref)
    for (path, r), g in zip(flat_ref, flat):
        err = float(jnp.linalg.norm(g - r) / jnp.maximum(jnp.linalg.norm(r), 1e-30))
        assert err < 1e-4, (jax.tree_util.keystr(path), err)
    np.testing.assert_array_equal(np.asarray(stats.loads), ref_loads)
    # The MTP block's routed-weight gradients come back split over ep like the stages' (the
    # executor's loss-parameter specs): each device holds its E/ep experts' rows only.
    for w in ("w1", "w3", "w2"):
        for path in (("layers", 1, "ffn", w), ("mtp", "block", "ffn", w)):
            g = grads
            for k in path:
                g = g[k]
            shard = (g[...] if isinstance(g, nnx.Variable) else g).addressable_shards[0].data
            assert shard.shape[0] == cfg.n_routed_experts // 4, (path, shard.shape)
    # every rank ran every tick of the schedule: forwards of all 2 stages x 4 micro-batches
    log = np.asarray(stats.op_log)
    assert log.shape[0] == 2 and ((log[..., 0] == 1) | (log[..., 0] == 5)).sum() == 2 * 4


def test_fp8_zero_bubble_step():
    """FP8 recipe with the zb1p schedule (split backward: BI then W). Activations are quantized per
    row, so the forward equals the whole-model FP8 forward up to f32 summation order (rtol 1e-5).
    The gradients are not bit-comparable: Wgrad's 1x128 quantization tiles run along each device's
    rows of each micro-batch instead of the whole batch. Both FP8 gradients carry independent FP8
    rounding of the same size, so their distance is bounded by twice the distance of the
    whole-model FP8 gradient from the float32 one (same weights, same batch)."""
    tokens = _tokens()
    cfg = DeepSeekV3Config.tiny(n_layers=3, vocab_size=V, use_fp8=True)
    ref_parts, ref_grads, ref_loads = _reference(cfg, tokens)
    _, f32_grads, _ = _reference(DeepSeekV3Config.tiny(n_layers=3, vocab_size=V), tokens)
    parts, grads, stats = _pipelined(cfg, tokens, "zb1p", _mesh())
    np.testing.assert_allclose(float(parts.total), float(ref_parts.total), rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(stats.loads), ref_loads)
    g, r, f = (jnp.concatenate([x.ravel() for x in jax.tree.leaves(t)]) for t in (grads, ref_grads, f32_grads))
    fp8_noise = float(calc_diff(r, f))
    assert 0 < fp8_noise < 0.05  # FP8 is in play, and sane
    assert float(calc_diff(g, r)) < 2 * fp8_noise


def test_bad_pipeline_shapes_raise():
    with pytest.raises(ValueError, match=r"the 1 MoE layers \(n_layers 2 - n_dense_layers 1\) must split evenly "
                                         r"into the 2 stages of dualpipe with pp=2"):
        Pipeline(_mesh(), DeepSeekV3Config.tiny(n_layers=2), schedule="dualpipe")
    with pytest.raises(ValueError, match="num_microbatches must be even and >= 2\\*pp = 4, got 2"):
        Pipeline(_mesh(), DeepSeekV3Config.tiny(n_layers=3), num_microbatches=2)
    cfg = DeepSeekV3Config.tiny(n_layers=3, vocab_size=V)
    pipe = Pipeline(_mesh(), cfg)
    model = DeepSeekV3(cfg, rngs=nnx.Rngs(0))
    pipe.prepare(model)
    with pytest.raises(ValueError, match=r"the batch \(12 rows\) must be a multiple of num_microbatches=4 x the 4"):
        pipe.loss_and_grads(model, _tokens()[:12])
