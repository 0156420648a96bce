"""MLA weight absorption: decoding with absorbed queries over the latent cache equals naive MLA
attention over K/V expanded per head (DeepSeek-V3's "naive" vs "absorb" attention)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsjax import backends
from dsjax.flash_mla import (PagedMLACache, absorb_output, absorb_query, deepseek_softmax_scale,
                             latent_rows, split_wkv_b)

H, NOPE, ROPE, VH, RANK = 4, 128, 64, 128, 512


def test_deepseek_softmax_scale():
    m = 0.1 * 1.0 * math.log(40.0) + 1.0
    assert deepseek_softmax_scale() == pytest.approx(192 ** -0.5 * m * m, rel=1e-12)
    assert deepseek_softmax_scale(192, max_seq_len=4096) == pytest.approx(192 ** -0.5)
    with pytest.raises(ValueError, match="qk_head_dim must be positive, got 0"):
        deepseek_softmax_scale(0)


@pytest.mark.parametrize("impl", ["reference", pytest.param("cpu", marks=pytest.mark.skipif(
    not backends()["cpu"], reason=backends()["reasons"].get("cpu", "")))])
def test_absorbed_decode_equals_naive_mla(impl):
    rng = np.random.default_rng(0)
    b, s_q, lens = 2, 2, np.array([37, 70])
    wkv_b = jnp.asarray(rng.standard_normal((H * (NOPE + VH), RANK)) / np.sqrt(RANK), jnp.float32)
    w_uk, w_uv = split_wkv_b(wkv_b, H, NOPE, VH)
    c_kv = rng.standard_normal((b, 70, RANK)).astype(np.float32)
    k_pe = rng.standard_normal((b, 70, ROPE)).astype(np.float32)
    q_nope = rng.standard_normal((b, s_q, H, NOPE)).astype(np.float32)
    q_pe = rng.standard_normal((b, s_q, H, ROPE)).astype(np.float32)
    # bf16 values everywhere the kernel sees bf16, so both paths start from the same numbers.
    bf = lambda x: np.asarray(jnp.asarray(x, jnp.bfloat16).astype(jnp.float32))
    c_kv, k_pe = bf(c_kv), bf(k_pe)
    scale = deepseek_softmax_scale()

    @jax.jit
    def absorbed_decode(q_nope, q_pe, c_kv, k_pe, lens):
        q_abs = absorb_query(q_nope, q_pe, w_uk).astype(jnp.bfloat16)
        cache = PagedMLACache.create(16, 16, b, 8)
        cache = cache.append(latent_rows(c_kv, k_pe)[:, :, None, :].astype(jnp.bfloat16), lens)
        o_lat, _ = cache.attend(q_abs, softmax_scale=scale, causal=True, num_sm_parts=3,
                                implementation=impl)
        return absorb_output(o_lat.astype(jnp.float32), w_uv)

    got = np.asarray(absorbed_decode(jnp.asarray(q_nope), jnp.asarray(q_pe), jnp.asarray(c_kv),
                                     jnp.asarray(k_pe), jnp.asarray(lens, jnp.int32)))

    # Naive MLA: expand per-head K and V from the latent, then ordinary attention in float64.
    w_uk64, w_uv64 = np.asarray(w_uk, np.float64), np.asarray(w_uv, np.float64)
    want = np.zeros((b, s_q, H, VH))
    for i in range(b):
        n = lens[i]
        k_nope = np.einsum("jc,hdc->jhd", c_kv[i, :n], w_uk64)
        v = np.einsum("jc,hdc->jhd", c_kv[i, :n], w_uv64)
        for t in range(s_q):
            vis = n - s_q + t + 1  # causal, bottom-right aligned
            for h in range(H):
                s = (k_nope[:vis, h] @ q_nope[i, t, h] + k_pe[i, :vis] @ q_pe[i, t, h]) * scale
                p = np.exp(s - s.max())
                want[i, t, h] = p @ v[:vis, h] / p.sum()
    # Error budget: the absorbed query is rounded to bf16 for the kernel (relative 2^-9 per
    # element; logits move by ~2^-9 * |q_abs||c| / sqrt(512) * scale ~ 1e-2), the latent output
    # is bf16 (2^-9 relative), then mapped by W_UV. Measured max error ~4e-3; outputs are O(1).
    err = np.abs(got - want).max()
    assert err < 2e-2, err
    assert np.abs(want).max() > 0.1
