"""dsjax.nn with ``use_fp8``: DeepSeek-V3's FP8 recipe inside the model (MLA, MLP, shared and
routed experts), single device and under expert parallelism, training and decoding.

Tolerances come from E4M3 numerics. One FP8 GEMM of quantized operands lands at calc_diff
~6e-4 from the float32 product (3 mantissa bits: ~2.5% RMS relative rounding per operand);
DeepGEMM's tests bound it by 1e-3 (see tests/test_deep_gemm_recipe.py). calc_diff is about the
relative error variance, so independent errors add: a result that depends on a chain of n FP8
GEMMs is bounded by n x 1e-3. Where two computations quantize exactly the same values (the
contiguous layout vs a per-pair oracle, EP vs one device, decode vs the full forward), they
agree to float32 summation order, plus an occasional FP8 rounding flip of an intermediate (a
value within float32 rounding of a rounding boundary): bound 1e-5, 60x below one GEMM's FP8
error, so a misplaced, dropped or mis-weighted row cannot hide under it.
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

from dsjax import deep_gemm as dg
from dsjax._src.testing import calc_diff
from dsjax.nn import Fp8Linear, router
from dsjax.nn.config import DeepSeekV3Config
from dsjax.nn.ep import ep_routed_fn
from dsjax.nn.layers import linear_factory, shard_fp8_linears
from dsjax.nn.model import DeepSeekV3, lm_loss, update_expert_biases
from dsjax.nn.moe import contiguous_layout, routed_experts_dense, routed_experts_fp8

ONE_GEMM = 1e-3      # DeepGEMM's bound for one FP8 GEMM against the float32 product
SAME_QUANT = 1e-5    # same quantized values, different float32 summation order

T, K, E, D, I = 40, 3, 8, 128, 64
CFG = DeepSeekV3Config.tiny(n_layers=2)  # one dense block, one MoE block, the MTP block (MoE)


def _experts(seed: int):
    rng = np.random.default_rng(seed)
    n = lambda *s, scale=1.0: jnp.asarray(rng.standard_normal(s, dtype=np.float32) * scale)  # noqa: E731
    return n(E, D, I, scale=D ** -0.5), n(E, D, I, scale=D ** -0.5), n(E, I, D, scale=I ** -0.5), rng


def _qdq_rows(x):
    return dg.dequantize_per_token(*dg.per_token_cast_to_fp8(x))


def _qdq_blocks(w):
    return dg.dequantize_per_block(*dg.per_block_cast_to_fp8(w))


def test_contiguous_layout_covers_every_pair_once():
    rng = np.random.default_rng(0)
    idx = rng.integers(0, E, (T, K)).astype(np.int32)
    idx[::7, 1] = -1                                   # "no expert" entries
    idx[:, 2] = np.where(idx[:, 2] == 5, 3, idx[:, 2])  # expert 5 gets fewer rows, some none
    mi, tok, row = (np.asarray(a) for a in contiguous_layout(jnp.asarray(idx), E))
    assert mi.shape[0] % 128 == 0 and mi.shape == tok.shape and row.shape == (T * K,)
    for blk in mi.reshape(-1, 128):                    # every aligned block holds one expert
        assert len(set(blk[blk >= 0].tolist())) <= 1
    valid = idx.reshape(-1) >= 0
    assert (row[~valid] == mi.shape[0]).all()          # invalid pairs get no row
    assert len(set(row[valid].tolist())) == valid.sum()  # one distinct row per valid pair
    np.testing.assert_array_equal(mi[row[valid]], idx.reshape(-1)[valid])
    np.testing.assert_array_equal(tok[row[valid]], (np.arange(T * K) // K)[valid])
    assert (mi >= 0).sum() == valid.sum()              # nothing else is a real row
    # The static row count bounds the worst case: every pair on its own expert block.
    worst = np.repeat(np.arange(E, dtype=np.int32), -(-T * K // E))[:T * K].reshape(T, K)
    mi_w, _, row_w = contiguous_layout(jnp.asarray(worst), E)
    assert int(np.asarray(row_w).max()) < mi_w.shape[0]


def test_routed_experts_fp8_values_and_gradients():
    """Exact against the per-pair statement of the quantized computation; within FP8 error of
    the float32 dense experts, forward and gradients. Longest chain of FP8 GEMMs behind any
    output: dx = Dgrad(w1|w3) of (Dgrad(w2) of dy, times Fprop(w3|w1)) = 3, plus the Fprop
    error of h entering it: bound 5 x ONE_GEMM."""
    w1, w3, w2, rng = _experts(1)
    x = jnp.asarray(rng.standard_normal((T, D), dtype=np.float32))
    idx = jnp.asarray(np.stack([rng.permutation(E)[:K] for _ in range(T)]).astype(np.int32))
    idx = idx.at[3, 0].set(-1)
    w = jnp.asarray(rng.random((T, K), dtype=np.float32))
    probe = jnp.asarray(rng.standard_normal((T, D), dtype=np.float32))

    y = jax.jit(routed_experts_fp8)(x, w, idx, w1, w3, w2)
    # The statement: quantize each row of x (1x128), each expert's weights (128x128 blocks) and
    # each pair's hidden row, multiply in float32, weight and sum the pairs.
    xq = _qdq_rows(x)
    hi = jax.lax.Precision.HIGHEST
    h = jnp.stack([jax.nn.silu(jnp.einsum("td,tde->te", xq, _qdq_blocks(w1)[idx[:, k]], precision=hi))
                   * jnp.einsum("td,tde->te", xq, _qdq_blocks(w3)[idx[:, k]], precision=hi)
                   for k in range(K)], 1)                                       # [T, K, I]
    yk = jnp.einsum("tki,tkid->tkd", _qdq_rows(h), _qdq_blocks(w2)[idx], precision=hi)
    want = jnp.einsum("tkd,tk->td", yk, jnp.where(idx >= 0, w, 0.0))
    assert calc_diff(y, want) < SAME_QUANT

    def loss(fn):
        return jax.jit(jax.grad(lambda *a: jnp.sum(fn(*a) * probe), argnums=(0, 1, 3, 4, 5)))

    g8 = loss(routed_experts_fp8)(x, w, idx, w1, w3, w2)
    dense_idx = jnp.where(idx >= 0, idx, 0)
    g32 = loss(lambda x, w, i, *ws: routed_experts_dense(x, jnp.where(i >= 0, w, 0.0), dense_idx, *ws))(
        x, w, idx, w1, w3, w2)
    ref = routed_experts_dense(x, jnp.where(idx >= 0, w, 0.0), dense_idx, w1, w3, w2)
    assert calc_diff(y, ref) < 3 * ONE_GEMM
    for name, a, b in zip(("x", "weights", "w1", "w3", "w2"), g8, g32):
        assert np.isfinite(np.asarray(a)).all(), name
        assert calc_diff(a, b) < 5 * ONE_GEMM, name
    assert float(g8[1][3, 0]) == 0.0  # "no expert" entries get no gating gradient


def test_ep_fp8_experts_match_one_device():
    """Under EP (dp=2 x ep=4) each rank quantizes the same rows and weight blocks as one device:
    forward exact to float32 order. Gradients: Wgrad's 1x128 tiles run along the rows each rank
    holds, so they differ by FP8 rounding (bounded against float32 as above); a missing
    data-parallel reduction of the expert gradients would be off by 2x."""
    w1, w3, w2, rng = _experts(2)
    t = 64
    x = jnp.asarray(rng.standard_normal((t, D), dtype=np.float32))
    gate = jnp.asarray(rng.standard_normal((D, E), dtype=np.float32) * D ** -0.5)
    probe = jnp.asarray(rng.standard_normal((t, D), dtype=np.float32))
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("dp", "ep"))

    def run(fn):
        def loss(x, gate, w1, w3, w2):
            r = router.route(x @ gate, None, topk=2, n_groups=4, topk_groups=2, route_scale=2.5)
            y = fn(x, r.weights, r.indices, w1, w3, w2)
            return jnp.sum(y * probe), y
        return jax.jit(jax.value_and_grad(loss, argnums=range(5), has_aux=True))(x, gate, w1, w3, w2)

    (_, y_ep), g_ep = run(ep_routed_fn(mesh, implementation="cpu", fp8=True))
    (_, y_one), _ = run(routed_experts_fp8)
    (_, y32), g32 = run(routed_experts_dense)
    assert calc_diff(y_ep, y_one) < SAME_QUANT
    assert calc_diff(y_ep, y32) < 3 * ONE_GEMM
    for name, a, b in zip(("x", "gate", "w1", "w3", "w2"), g_ep, g32):
        assert calc_diff(a, b) < 5 * ONE_GEMM, name


def test_fp8_linears_run_data_parallel_under_shard_map():
    """After shard_fp8_linears each device quantizes and multiplies its own rows (the custom
    calls are not gathered onto every device): forward identical to the unsharded call, input
    gradient too (per-row Dgrad), weight gradient summed over the 8 devices (within FP8
    rounding of the unsharded one: Wgrad's 1x128 tiles run along each device's rows; a missing
    reduction would be 8x off)."""
    lin = linear_factory(dataclasses.replace(CFG, use_fp8=True), nnx.Rngs(0))(D, 96)
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("dp", "ep"))
    x = jax.random.normal(jax.random.PRNGKey(1), (16, 8, D))
    probe = jax.random.normal(jax.random.PRNGKey(2), (16, 8, 96))
    grad = nnx.jit(nnx.value_and_grad(lambda m, x: jnp.sum(m(x) * probe), argnums=(0, 1)))
    y1, (g1, gx1) = grad(lin, x)
    assert shard_fp8_linears(lin, mesh, ("dp", "ep")) == 1
    y8, (g8, gx8) = grad(lin, x)
    assert abs(float(y8) - float(y1)) < 1e-4 * abs(float(y1)) + 1e-3
    assert calc_diff(gx8, gx1) < SAME_QUANT
    assert calc_diff(g8["kernel"][...], g1["kernel"][...]) < 2 * ONE_GEMM
    w32 = jax.grad(lambda w: jnp.sum(jnp.einsum("bsd,dn->bsn", x, w, precision="highest") * probe))(
        lin.kernel[...])
    assert calc_diff(g8["kernel"][...], w32) < ONE_GEMM



@pytest.fixture(scope="module")
def models():
    """(fp8 model, float32 model) with the same weights (same seed, same parameter tree)."""
    return (DeepSeekV3(dataclasses.replace(CFG, use_fp8=True), rngs=nnx.Rngs(0)),
            DeepSeekV3(CFG, rngs=nnx.Rngs(0)))


def test_fp8_model_layout_and_forward_close_to_float32(models):
    """Same parameters as the float32 model (names, shapes, values: checkpoints carry over);
    FP8 only where DeepSeek-V3 uses it. Logits: every FP8 GEMM whose error reaches them adds at
    most ONE_GEMM (independent errors, unit gain through norms and residuals): the dense block
    has 5 (wq_a, wq_b, wkv_a, wkv_b, wo) + 3 (w1, w3, w2), the MoE block 5 + 3 routed + 3
    shared, so 19 x ONE_GEMM (measured ~8.5e-3); the MTP logits add the MTP projection and its
    MoE block: 31 x ONE_GEMM (measured ~7e-3)."""
    m8, m32 = models
    p8, p32 = nnx.to_pure_dict(nnx.state(m8, nnx.Param)), nnx.to_pure_dict(nnx.state(m32, nnx.Param))
    assert jax.tree.structure(p8) == jax.tree.structure(p32)
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), p8, p32))
    attn, dense, moe = m8.layers[0].attn, m8.layers[0].ffn, m8.layers[1].ffn
    fp8_linears = [attn.wq_a, attn.wq_b, attn.wkv_a, attn.wkv_b, attn.wo, dense.w1, dense.w2, dense.w3,
                   moe.shared.w1, moe.shared.w2, moe.shared.w3, m8.mtp.proj]
    assert all(isinstance(m, Fp8Linear) for m in fp8_linears)
    assert moe.routed_fn is routed_experts_fp8
    # High precision: embedding, head, router gate (a plain parameter), norms.
    assert type(m8.head) is nnx.Linear and type(m8.embed) is nnx.Embed
    assert m32.layers[1].ffn.routed_fn is routed_experts_dense

    tok = jax.random.randint(jax.random.PRNGKey(0), (2, 32), 0, CFG.vocab_size)
    fwd = nnx.jit(lambda m, t: m(t))
    o8, o32 = fwd(m8, tok), fwd(m32, tok)
    d, dm = calc_diff(o8.logits, o32.logits), calc_diff(o8.mtp_logits, o32.mtp_logits)
    assert d < 19 * ONE_GEMM and dm < 31 * ONE_GEMM
    assert d > SAME_QUANT  # and the FP8 model really rounds


def _step_fn():
    @nnx.jit
    def step(model, opt, tok):
        def f(m):
            parts = lm_loss(m, tok)
            return parts.total, parts
        (_, parts), grads = nnx.value_and_grad(f, has_aux=True)(model)
        opt.update(model, grads)
        update_expert_biases(model)
        return parts, grads
    return step


def test_fp8_model_trains_with_finite_gradients():
    """20 AdamW steps on one batch: the loss drops as clearly as in float32 (the criterion of
    test_nn_model's float32 training test; measured 6.05 -> 0.012, float32 6.05 -> 0.011) and
    every gradient (the FP8 custom_vjp backward of every linear and expert) is finite."""
    model = DeepSeekV3(dataclasses.replace(CFG, use_fp8=True), rngs=nnx.Rngs(0))
    opt = nnx.Optimizer(model, optax.adamw(3e-3), wrt=nnx.Param)
    tok = jax.random.randint(jax.random.PRNGKey(3), (4, 33), 0, CFG.vocab_size)
    step = _step_fn()
    first, grads = step(model, opt, tok)
    leaves = jax.tree.leaves(nnx.to_pure_dict(grads))
    assert len(leaves) == len(jax.tree.leaves(nnx.state(model, nnx.Param)))
    assert all(np.isfinite(np.asarray(g)).all() for g in leaves)
    assert all(float(jnp.abs(g).max()) > 0 for g in leaves)  # every parameter is trained
    for _ in range(19):
        last, _ = step(model, opt, tok)
    assert float(last.lm) < 0.7 * float(first.lm)
    assert np.isfinite([float(last.total), float(last.mtp), float(last.balance)]).all()


def test_fp8_decode_matches_full_forward(models):
    """Prefill 5 tokens then decode 4 one at a time (float32 cache, reference FlashMLA): the
    decode path caches the latent as wkv_b's FP8 GEMM sees it and absorbs the FP8 weight, so it
    computes the training path's function exactly; same tolerance as the float32 model's test
    (atol 2e-4: float32 summation order through the absorbed products)."""
    m8, _ = models
    tok = jax.random.randint(jax.random.PRNGKey(5), (3, 9), 0, CFG.vocab_size)
    full = np.asarray(nnx.jit(lambda m, t: m(t).logits)(m8, tok))
    caches = m8.init_caches(3, 16, page_block_size=4, dtype=jnp.float32)
    pos = jnp.broadcast_to(jnp.arange(9, dtype=jnp.int32), (3, 9))
    step = nnx.jit(lambda m, t, p, c: m.decode(t, p, c, implementation="reference"))
    logits, caches = step(m8, tok[:, :5], pos[:, :5], caches)
    outs = [np.asarray(logits)]
    for i in range(5, 9):
        logits, caches = step(m8, tok[:, i:i + 1], pos[:, i:i + 1], caches)
        outs.append(np.asarray(logits))
    np.testing.assert_allclose(np.concatenate(outs, axis=1), full, atol=2e-4, rtol=0)
