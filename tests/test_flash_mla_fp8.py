"""FlashMLA's FP8 latent cache: the 656-byte format, quantize/dequantize, and decoding on it.

Decoding the FP8 cache must equal decoding ``dequantize_kvcache(cache)`` (bf16) with the same
tolerance as the bf16 path; the kernels dequantize to bf16 exactly like the helper does.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from dsjax import backends
from dsjax.flash_mla import (dequantize_kvcache, flash_mla_with_kvcache, get_mla_metadata,
                             quantize_kvcache, reference)
from dsjax.flash_mla.testing import make_case

IMPLS = ["reference", pytest.param("cpu", marks=pytest.mark.skipif(
    not backends()["cpu"], reason=backends()["reasons"].get("cpu", "")))]


def test_layout_and_roundtrip():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 5, 576)).astype(np.float32) * np.array([1e-3, 1, 30])[:, None, None]
    x[0, 0, :128] = 0.0  # an all-zero tile keeps zeros (scale 1)
    q = np.asarray(quantize_kvcache(jnp.asarray(x, jnp.bfloat16)))
    assert q.shape == (3, 5, 656) and q.dtype == np.uint8
    # Decode the bytes by hand: codes, f32 scales, bf16 rope.
    codes = q[..., :512].view(ml_dtypes.float8_e4m3fn).astype(np.float32).reshape(3, 5, 4, 128)
    scales = q[..., 512:528].copy().view(np.float32)
    rope = q[..., 528:].copy().view(ml_dtypes.bfloat16).astype(np.float32)
    xb = np.asarray(jnp.asarray(x, jnp.bfloat16).astype(jnp.float32))
    amax = np.abs(xb[..., :512].reshape(3, 5, 4, 128)).max(-1)
    # XLA may turn the division by 448 into a multiply by 1/448: 1 f32 ulp (1.2e-7 relative).
    np.testing.assert_allclose(scales, np.where(amax == 0, np.float32(1), amax / np.float32(448)),
                               rtol=2.5e-7)
    assert scales[0, 0, 0] == 1.0 and (codes[0, 0, 0] == 0).all()
    np.testing.assert_array_equal(rope, xb[..., 512:])
    # e4m3 has 3 mantissa bits: relative error <= 2^-4 of the value (normals), and the largest
    # value of each tile maps to exactly +-448.
    deq = np.asarray(dequantize_kvcache(jnp.asarray(q), jnp.float32))
    nope = xb[..., :512].reshape(3, 5, 4, 128)
    tol = 2.0 ** -4 * np.abs(nope) + scales[..., None] * 2.0 ** -9  # subnormal step
    assert (np.abs(deq[..., :512].reshape(3, 5, 4, 128) - nope) <= tol).all()
    assert (np.abs(codes).max(-1)[amax > 0] == 448).all()
    # float8 view of the bytes is accepted too, and bf16 dequantization is the f32 one rounded.
    deq8 = dequantize_kvcache(jax.lax.bitcast_convert_type(jnp.asarray(q), jnp.float8_e4m3fn))
    np.testing.assert_array_equal(np.asarray(deq8.astype(jnp.float32)),
                                  np.asarray(jnp.asarray(deq, jnp.bfloat16).astype(jnp.float32)))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("b,s_q,s_k,h_q,h_kv,causal,page", [
    (3, 2, 140, 16, 1, True, 64),
    (2, 1, 300, 64, 2, False, 16),
])
def test_fp8_decode_equals_dequantized_bf16_decode(impl, b, s_q, s_k, h_q, h_kv, causal, page):
    case = make_case(b, s_q, s_k, h_q, h_kv, varlen=True, zero_len=True, page=page, seed=s_k,
                     nan_fill=False)
    cache8 = quantize_kvcache(case.k_cache)
    # NaN in the unused slots of the FP8 cache (scale bytes included) must not leak either.
    lens = np.asarray(case.cache_seqlens)
    bt = np.asarray(case.block_table)
    used = {int(bt[i, j]) for i in range(b) for j in range(-(-lens[i] // page))}
    nan_rows = np.ones(cache8.shape[:1], bool)
    nan_rows[list(used)] = False
    cache8 = jnp.where(jnp.asarray(nan_rows)[:, None, None, None], jnp.uint8(0xFF), cache8)
    md, ns = get_mla_metadata(case.cache_seqlens, s_q * h_q // h_kv, h_kv, num_sm_parts=4)

    @jax.jit
    def run(q, cache8, bt, lens, md, ns, bf_cache):
        out, lse = flash_mla_with_kvcache(q, cache8, bt, lens, 512, md, ns, causal=causal,
                                          is_fp8_kvcache=True, implementation=impl)
        deq = dequantize_kvcache(cache8).astype(jnp.float32)  # bf16 values, float32 carrier
        want = reference.flash_mla_with_kvcache(q.astype(jnp.float32), deq, bt, lens, 512,
                                                576 ** -0.5, causal)
        bf_out = reference.flash_mla_with_kvcache(q, bf_cache, bt, lens, 512, 576 ** -0.5,
                                                  causal)[0]
        return out, lse, want, bf_out

    out, lse, (want_out, want_lse), bf_out = run(case.q, cache8, case.block_table,
                                                 case.cache_seqlens, md, ns, case.k_cache)
    want_out = np.asarray(want_out)
    out = np.asarray(out, np.float32)
    assert np.isfinite(out).all()
    half_ulp = 2.0 ** (np.floor(np.log2(np.maximum(np.abs(want_out), 1e-30))) - 8)
    assert (np.abs(out - want_out) <= 8e-4 + half_ulp).all()
    want_lse, lse = np.asarray(want_lse), np.asarray(lse)
    np.testing.assert_array_equal(np.isinf(lse), np.isinf(want_lse))
    fin = np.isfinite(want_lse)
    np.testing.assert_allclose(lse[fin], want_lse[fin], atol=1e-5, rtol=0)
    # And FP8 decoding is close to decoding the original bf16 cache (quantization error only).
    bf_out = np.asarray(bf_out, np.float32)
    rel = np.linalg.norm(out - bf_out) / np.linalg.norm(bf_out)
    assert rel < 0.05, rel


def test_quantize_validation():
    with pytest.raises(ValueError, match=r"quantize_kvcache: k_cache's last dim must be 576, got"):
        quantize_kvcache(jnp.zeros((2, 512), jnp.bfloat16))
    with pytest.raises(TypeError, match=r"k_cache_fp8 must have dtype uint8 or float8_e4m3fn, got int32"):
        dequantize_kvcache(jnp.zeros((2, 656), jnp.int32))
