"""dsjax.nn: DeepSeek-V3 routing, MLA, MoE and the model, against independent statements."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from dsjax.nn import router
from dsjax.nn.config import DeepSeekV3Config
from dsjax.nn.layers import apply_rope, rope_frequencies
from dsjax.nn.mla import MLA
from dsjax.nn.model import DeepSeekV3, lm_loss, update_expert_biases


def _np_gate(logits, bias, topk, n_groups, topk_groups, scale):
    """NumPy statement of DeepSeek-V3's Gate.forward (sigmoid, bias for selection only)."""
    scores = 1 / (1 + np.exp(-logits.astype(np.float64)))
    sel = scores + bias
    t, e = scores.shape
    g = sel.reshape(t, n_groups, -1)
    gs = np.sort(g, axis=-1)[..., -2:].sum(-1)
    keep_groups = np.argsort(-gs, axis=-1, kind="stable")[:, :topk_groups]
    mask = np.ones((t, n_groups), bool)
    np.put_along_axis(mask, keep_groups, False, axis=1)
    sel = np.where(mask[:, :, None], -np.inf, g).reshape(t, e)
    idx = np.argsort(-sel, axis=-1, kind="stable")[:, :topk]
    w = np.take_along_axis(scores, idx, -1)
    return w / w.sum(-1, keepdims=True) * scale, idx


def test_route_matches_deepseek_gate():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((64, 32)).astype(np.float32)
    bias = (rng.standard_normal(32) * 0.3).astype(np.float32)
    r = router.route(jnp.asarray(logits), jnp.asarray(bias), topk=4, n_groups=8, topk_groups=3, route_scale=2.5)
    w_np, idx_np = _np_gate(logits, bias, 4, 8, 3, 2.5)
    np.testing.assert_array_equal(np.sort(np.asarray(r.indices), -1), np.sort(idx_np, -1))
    order = np.argsort(np.asarray(r.indices), -1)
    np.testing.assert_allclose(np.take_along_axis(np.asarray(r.weights), order, -1),
                               np.take_along_axis(w_np, np.argsort(idx_np, -1), -1), rtol=1e-5)
    # Only topk_groups groups are used per token.
    groups = np.asarray(r.indices) // 4
    assert max(len(set(row)) for row in groups) <= 3


def test_bias_changes_selection_not_weights():
    logits = jnp.zeros((1, 8)).at[0, 0].set(3.0).at[0, 1].set(2.0)
    r0 = router.route(logits, jnp.zeros(8), topk=1, n_groups=1, topk_groups=1, route_scale=1.0)
    r1 = router.route(logits, jnp.zeros(8).at[1].set(5.0), topk=1, n_groups=1, topk_groups=1, route_scale=1.0)
    assert int(r0.indices[0, 0]) == 0 and int(r1.indices[0, 0]) == 1
    r2 = router.route(logits, jnp.zeros(8).at[1].set(5.0), topk=2, n_groups=1, topk_groups=1, route_scale=1.0)
    s = jax.nn.sigmoid(logits[0])
    # weights are the unbiased scores of the chosen experts, normalized
    np.testing.assert_allclose(np.sort(np.asarray(r2.weights[0])),
                               np.sort(np.asarray(s[jnp.array([0, 1])] / s[jnp.array([0, 1])].sum())), rtol=1e-6)


def test_sequence_balance_loss_formula():
    e, k, s = 8, 2, 16
    idx = jnp.asarray(np.arange(s * k).reshape(1, s, k) % e)  # perfectly uniform routing
    scores = jnp.ones((1, s, e))
    assert float(router.sequence_balance_loss(scores, idx, alpha=0.01)) == pytest.approx(0.01)
    skew = jnp.zeros((1, s, k), jnp.int32).at[..., 1].set(1)   # everything on experts 0 and 1
    sc = jnp.ones((1, s, e)).at[..., :2].set(10.0)
    p = np.array([10, 10, 1, 1, 1, 1, 1, 1]) / 26.0
    f = np.array([s, s, 0, 0, 0, 0, 0, 0]) * e / (k * s)
    assert float(router.sequence_balance_loss(sc, skew, alpha=1.0)) == pytest.approx(float((f * p).sum()), rel=1e-6)


def test_bias_update_direction():
    b = router.update_bias(jnp.zeros(4), jnp.array([10, 0, 5, 5]), 0.1)
    np.testing.assert_allclose(np.asarray(b), [-0.1, 0.1, 0.0, 0.0])


def test_rope_depends_on_relative_position():
    cfg = DeepSeekV3Config.tiny()
    f = rope_frequencies(cfg)
    q = jax.random.normal(jax.random.PRNGKey(0), (1, cfg.qk_rope_head_dim))
    k = jax.random.normal(jax.random.PRNGKey(1), (1, cfg.qk_rope_head_dim))
    dot = lambda m, n: float(jnp.sum(apply_rope(q, jnp.array([m]), f) * apply_rope(k, jnp.array([n]), f)))  # noqa: E731
    assert dot(7, 3) == pytest.approx(dot(104, 100), rel=1e-4, abs=1e-5)
    assert dot(7, 3) != pytest.approx(dot(7, 5), rel=1e-3)


def test_yarn_frequencies_for_extended_context():
    cfg = DeepSeekV3Config.deepseek_v3_671b()
    f = np.asarray(rope_frequencies(cfg))
    base = 1.0 / (cfg.rope_theta ** (np.arange(0, 64, 2) / 64))
    # High frequencies (first pairs) are kept; the lowest are divided by the factor 40.
    assert f[0] == pytest.approx(base[0]) and f[-1] == pytest.approx(base[-1] / 40, rel=1e-5)
    assert cfg.softmax_scale == pytest.approx(192 ** -0.5 * (0.1 * np.log(40) + 1) ** 2)


def test_absorbed_latent_attention_equals_naive_mla():
    cfg = DeepSeekV3Config.tiny()
    mla = MLA(cfg, rngs=nnx.Rngs(1))
    b, s = 2, 9
    x = jax.random.normal(jax.random.PRNGKey(2), (b, s, cfg.dim))
    pos = jnp.broadcast_to(jnp.arange(s), (b, s))
    naive = mla(x, pos)
    q_nope, q_pe = mla.queries(x, pos)
    lat = mla.latent(x, pos)  # [B, S, C + R]
    q = mla.absorbed_query(q_nope, q_pe)  # [B, S, H, C + R]: the FlashMLA query
    # the latent part and the RoPE part of the query against the cache row's two parts
    scores = jnp.einsum("bshc,btc->bhst", q, lat) * cfg.softmax_scale
    c = lat[..., :cfg.kv_lora_rank]
    scores = jnp.where(jnp.tril(jnp.ones((s, s), bool)), scores, -jnp.inf)
    o_lat = jnp.einsum("bhst,btc->bshc", jax.nn.softmax(scores, -1), c)
    np.testing.assert_allclose(np.asarray(mla.output_from_latent(o_lat)), np.asarray(naive), rtol=2e-4, atol=2e-5)


@pytest.fixture(scope="module")
def tiny_model():
    return DeepSeekV3(DeepSeekV3Config.tiny(), rngs=nnx.Rngs(0))


def test_model_is_causal(tiny_model):
    tok = jax.random.randint(jax.random.PRNGKey(0), (2, 12), 0, 256)
    a = tiny_model(tok)
    b = tiny_model(tok.at[:, 8:].set((tok[:, 8:] + 1) % 256))
    np.testing.assert_allclose(np.asarray(a.logits[:, :8]), np.asarray(b.logits[:, :8]), atol=1e-5)
    assert not np.allclose(np.asarray(a.logits[:, 8:]), np.asarray(b.logits[:, 8:]))
    assert a.logits.shape == (2, 12, 256) and a.mtp_logits.shape == (2, 11, 256)


def test_training_reduces_loss_and_balances_bias():
    model = DeepSeekV3(DeepSeekV3Config.tiny(n_layers=2), rngs=nnx.Rngs(0))
    opt = nnx.Optimizer(model, optax.adamw(3e-3), wrt=nnx.Param)
    tok = jax.random.randint(jax.random.PRNGKey(3), (4, 33), 0, 256)

    @nnx.jit
    def step(model, opt, tok):
        def f(m):
            parts = lm_loss(m, tok)
            return parts.total, parts
        (_, parts), grads = nnx.value_and_grad(f, has_aux=True)(model)
        opt.update(model, grads)
        update_expert_biases(model)
        return parts

    first = step(model, opt, tok)
    for _ in range(15):
        last = step(model, opt, tok)
    assert float(last.lm) < 0.7 * float(first.lm)
    assert np.all(np.isfinite([float(last.total), float(last.mtp), float(last.balance)]))
    moe = model.layers[1].ffn
    assert np.abs(np.asarray(moe.bias[...])).max() > 0  # the bias moved, outside the gradient


def test_config_validation():
    with pytest.raises(ValueError, match=r"n_routed_experts \(10\) must be a multiple of n_expert_groups \(4\)"):
        DeepSeekV3Config.tiny(n_routed_experts=10)
    with pytest.raises(ValueError, match="n_limited_groups must be in"):
        DeepSeekV3Config.tiny(n_limited_groups=9)
    full = DeepSeekV3Config.deepseek_v3_671b()
    assert (full.dim, full.n_layers, full.n_routed_experts, full.kv_lora_rank + full.qk_rope_head_dim) == (7168, 61, 256, 576)
    assert dataclasses.replace(full, n_layers=4).n_layers == 4
    with pytest.raises(ValueError, match=r"n_dense_layers must be in \[0, n_layers=2\], got 3"):
        dataclasses.replace(full, n_layers=2)


@pytest.mark.parametrize("impl,dtype,tol", [("reference", jnp.float32, 2e-4), ("cpu", jnp.bfloat16, 0.15)])
def test_step_by_step_decode_matches_full_forward(tiny_model, impl, dtype, tol):
    """Prefill 5 tokens, then decode 4 one at a time through the paged cache and FlashMLA:
    the logits equal the full-sequence forward. bf16 cache: errors of bf16 rounding of the
    latent rows and queries (~3 significant digits) accumulated over 4 layers."""
    tok = jax.random.randint(jax.random.PRNGKey(5), (3, 9), 0, 256)
    full = np.asarray(tiny_model(tok).logits)
    caches = tiny_model.init_caches(3, 16, page_block_size=4, dtype=dtype)
    pos = jnp.broadcast_to(jnp.arange(9, dtype=jnp.int32), (3, 9))
    step = nnx.jit(lambda m, t, p, c: m.decode(t, p, c, implementation=impl))
    logits, caches = step(tiny_model, tok[:, :5], pos[:, :5], caches)
    outs = [np.asarray(logits)]
    for i in range(5, 9):
        logits, caches = step(tiny_model, tok[:, i:i + 1], pos[:, i:i + 1], caches)
        outs.append(np.asarray(logits))
    got = np.concatenate(outs, axis=1)
    np.testing.assert_allclose(got, full, atol=tol, rtol=0)
    assert int(caches[0].seqlens[0]) == 9 and not bool(caches[0].overflow)
