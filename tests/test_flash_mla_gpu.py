"""The CUDA FlashMLA kernel (sm_90a) against the float32 reference: BF16 and FP8 caches, splits,
causal MTP, NaN-filled slots and garbage block-table tails. Skipped without a Hopper GPU and the
CUDA module. Same tolerances as the CPU twin (see test_flash_mla_decode.py)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsjax.flash_mla import (dequantize_kvcache, flash_mla_with_kvcache, get_mla_metadata,
                             quantize_kvcache, reference)
from dsjax.flash_mla.testing import make_case

pytestmark = pytest.mark.gpu


def _check(out, lse, want_out, want_lse):
    out, want_out = np.asarray(out, np.float32), np.asarray(want_out, np.float64)
    lse, want_lse = np.asarray(lse), np.asarray(want_lse)
    assert np.isfinite(out).all()
    half_ulp = 2.0 ** (np.floor(np.log2(np.maximum(np.abs(want_out), 1e-30))) - 8)
    assert (np.abs(out - want_out) - 8e-4 - half_ulp).max() <= 0
    np.testing.assert_array_equal(np.isinf(lse), np.isinf(want_lse))
    fin = np.isfinite(want_lse)
    np.testing.assert_allclose(lse[fin], want_lse[fin], atol=1e-5, rtol=0)


@pytest.mark.parametrize("b,s_q,s_k,h_q,h_kv,varlen,causal,page,parts", [
    (2, 1, 140, 16, 1, True, False, 64, None),
    (6, 2, 1030, 128, 1, True, True, 64, 20),
    (17, 4, 140, 64, 2, True, True, 64, 7),
    (1, 1, 20, 3, 1, False, False, 16, 2),
    (2, 4, 3, 16, 1, False, True, 64, 3),
])
@pytest.mark.parametrize("fp8", [False, True])
def test_cuda_matches_reference(b, s_q, s_k, h_q, h_kv, varlen, causal, page, parts, fp8):
    case = make_case(b, s_q, s_k, h_q, h_kv, varlen=varlen, zero_len=varlen, page=page,
                     seed=s_k + b)
    kc = quantize_kvcache(case.k_cache) if fp8 else case.k_cache
    md, ns = get_mla_metadata(case.cache_seqlens, s_q * h_q // h_kv, h_kv, num_sm_parts=parts)
    out, lse = jax.jit(lambda *a: flash_mla_with_kvcache(
        *a[:4], 512, *a[4:], causal=causal, is_fp8_kvcache=fp8, implementation="cuda"))(
            case.q, kc, case.block_table, case.cache_seqlens, md, ns)
    ref_cache = dequantize_kvcache(kc).astype(jnp.float32) if fp8 else case.k_cache.astype(jnp.float32)
    want = reference.flash_mla_with_kvcache(case.q.astype(jnp.float32), ref_cache, case.block_table,
                                            case.cache_seqlens, 512, 576 ** -0.5, causal)
    _check(out, lse, *want)
