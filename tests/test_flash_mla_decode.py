"""flash_mla_with_kvcache: every implementation against the float32 reference on FlashMLA's
correctness grid (sampled to fit CPU time), plus the reference against a float64 numpy oracle,
jit / vmap / shard_map, gradients and argument validation.

Tolerances (the issue's): out abs 8e-4 for bf16 out, lse abs 1e-5, both against float32 results.
The out bound gets half a bf16 ulp of the expected value on top: a bf16 output cannot be closer to
the float32 value than its own rounding (|out| reaches ~3 here, where half an ulp is 7.8e-3).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsjax import backends
from dsjax.flash_mla import flash_mla_with_kvcache, get_mla_metadata, reference
from dsjax.flash_mla.testing import make_case, numpy_oracle

SCALE = 576 ** -0.5
IMPLS = ["reference", pytest.param("cpu", marks=pytest.mark.skipif(
    not backends()["cpu"], reason=backends()["reasons"].get("cpu", "")))]


def half_ulp_bf16(x: np.ndarray) -> np.ndarray:
    a = np.maximum(np.abs(x), np.finfo(np.float32).tiny)
    return 2.0 ** (np.floor(np.log2(a)) - 8)


def assert_close(out, lse, want_out, want_lse):
    out = np.asarray(out, np.float32)
    want_out = np.asarray(want_out, np.float64)
    lse, want_lse = np.asarray(lse), np.asarray(want_lse)
    assert out.shape == want_out.shape and lse.shape == want_lse.shape
    assert np.isfinite(out).all(), "NaN/Inf leaked into out"
    err = np.abs(out - want_out) - (8e-4 + half_ulp_bf16(want_out))
    assert err.max() <= 0, f"out off by {err.max():.3g} beyond tolerance"
    inf = np.isinf(want_lse)
    np.testing.assert_array_equal(np.isinf(lse), inf)
    assert (lse[inf] > 0).all(), "empty rows must have lse = +inf"
    np.testing.assert_array_equal(out[np.broadcast_to(np.transpose(inf, (0, 2, 1))[..., None], out.shape)], 0)
    if (~inf).any():
        np.testing.assert_allclose(lse[~inf], want_lse[~inf], rtol=0, atol=1e-5)


def f32_reference(case, causal):
    """The reference with float32 operands (same values), so its out is not rounded to bf16."""
    return reference.flash_mla_with_kvcache(
        case.q.astype(jnp.float32), case.k_cache.astype(jnp.float32), case.block_table,
        case.cache_seqlens, 512, SCALE, causal)


# (b, s_q, s_k, h_q, h_kv, varlen, causal, page, num_sm_parts): every axis value of FlashMLA's grid
# appears at least once; h_q = 128 with s_k = 1030 only once (the expensive reference case).
GRID = [
    (1, 1, 20, 1, 1, False, False, 64, None),
    (2, 2, 140, 16, 1, True, True, 16, 5),
    (6, 4, 140, 3, 1, True, True, 64, 7),
    (17, 1, 20, 16, 2, True, False, 16, 3),
    (2, 2, 1030, 128, 1, False, True, 64, 6),
    (6, 1, 1030, 64, 2, True, False, 64, 11),
    (17, 4, 140, 64, 1, False, False, 16, 4),
    (1, 4, 20, 128, 2, True, True, 16, 2),
    (2, 4, 3, 16, 1, False, True, 64, 3),  # s_k < s_q: causal rows that see no key
]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("b,s_q,s_k,h_q,h_kv,varlen,causal,page,parts", GRID)
def test_matches_reference(impl, b, s_q, s_k, h_q, h_kv, varlen, causal, page, parts):
    case = make_case(b, s_q, s_k, h_q, h_kv, varlen=varlen, page=page, zero_len=varlen,
                     seed=b * 1000 + s_k)
    md, ns = get_mla_metadata(case.cache_seqlens, s_q * h_q // h_kv, h_kv, num_sm_parts=parts)
    out, lse = jax.jit(lambda *a: flash_mla_with_kvcache(
        *a[:4], 512, *a[4:], causal=causal, implementation=impl))(
            case.q, case.k_cache, case.block_table, case.cache_seqlens, md, ns)
    assert out.dtype == jnp.bfloat16 and lse.dtype == jnp.float32
    if impl == "reference":
        want = numpy_oracle(np.asarray(case.q, np.float32), case.keys, 512, SCALE, causal)
    else:
        want = f32_reference(case, causal)
    assert_close(out, lse, *want)


def test_splits_are_exercised():
    """The grid's metadata really splits requests (so the combine path is tested)."""
    case = make_case(2, 2, 1030, 128, 1, page=64)
    _, ns = get_mla_metadata(case.cache_seqlens, 256, 1, num_sm_parts=6)
    assert int(ns[-1]) > 2


@pytest.mark.parametrize("impl", IMPLS)
def test_empty_sequences_and_default_scale(impl):
    """Two empty sequences next to a real one; softmax_scale=None means 576 ** -0.5."""
    case = make_case(3, 2, 40, 4, 1, seed=3)
    lens = jnp.array([0, 0, 37], jnp.int32)
    md, ns = get_mla_metadata(lens, 8, 1)
    out, lse = flash_mla_with_kvcache(case.q, case.k_cache, case.block_table, lens, 512, md, ns,
                                      implementation=impl)
    keys = [case.keys[0][:0], case.keys[1][:0], case.keys[2][:37]]
    assert_close(out, lse, *numpy_oracle(np.asarray(case.q, np.float32), keys, 512, SCALE, False))


@pytest.mark.parametrize("impl", IMPLS)
def test_lengths_past_capacity_and_negative_are_clamped(impl):
    """cache_seqlens beyond max_blocks * page count as the capacity, negative ones as 0."""
    case = make_case(2, 2, 48, 4, 1, page=16, seed=6)  # capacity 48 keys per sequence
    lens = jnp.array([1000, -5], jnp.int32)
    md, ns = get_mla_metadata(lens, 8, 1, num_sm_parts=3)
    out, lse = flash_mla_with_kvcache(case.q, case.k_cache, case.block_table, lens, 512, md, ns,
                                      causal=True, implementation=impl)
    keys = [case.keys[0], case.keys[1][:0]]
    assert_close(out, lse, *numpy_oracle(np.asarray(case.q, np.float32), keys, 512, SCALE, True))


@pytest.mark.skipif(not backends()["cpu"], reason="CPU FFI not built")
def test_generic_cpu_kernel(monkeypatch):
    """The portable float32 kernel (used where AVX512-BF16 is missing) on one split, causal case."""
    monkeypatch.setenv("DSJAX_FLASH_MLA_CPU_KERNEL", "generic")
    case = make_case(3, 2, 140, 16, 2, varlen=True, zero_len=True, page=16, seed=9)
    md, ns = get_mla_metadata(case.cache_seqlens, 16, 2, num_sm_parts=5)
    out, lse = flash_mla_with_kvcache(case.q, case.k_cache, case.block_table, case.cache_seqlens,
                                      512, md, ns, causal=True, implementation="cpu")
    assert_close(out, lse, *f32_reference(case, True))


@pytest.mark.skipif(not backends()["cpu"], reason="CPU FFI not built")
def test_vmap_and_shard_map():
    case = make_case(4, 1, 60, 8, 1, varlen=True, seed=5)
    md, ns = get_mla_metadata(case.cache_seqlens, 8, 1, num_sm_parts=3)

    def f(q, kc, bt, sl, md, ns):
        return flash_mla_with_kvcache(q, kc, bt, sl, 512, md, ns, implementation="cpu")

    want_out, want_lse = f(case.q, case.k_cache, case.block_table, case.cache_seqlens, md, ns)
    # vmap over a leading axis of two stacked problems (the second with q negated).
    qs = jnp.stack([case.q, -case.q])
    out, lse = jax.vmap(f, in_axes=(0, None, None, None, None, None))(
        qs, case.k_cache, case.block_table, case.cache_seqlens, md, ns)
    np.testing.assert_array_equal(np.asarray(out[0], np.float32), np.asarray(want_out, np.float32))
    np.testing.assert_array_equal(np.asarray(lse[0]), np.asarray(want_lse))
    neg_out, neg_lse = f(-case.q, case.k_cache, case.block_table, case.cache_seqlens, md, ns)
    np.testing.assert_array_equal(np.asarray(out[1], np.float32), np.asarray(neg_out, np.float32))

    # shard_map: the batch split over 4 devices, metadata computed per shard inside.
    shard_map = getattr(jax, "shard_map", None)
    if shard_map is None:
        from jax.experimental.shard_map import shard_map
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:4]), ("x",))
    P = jax.sharding.PartitionSpec

    def local(q, bt, sl, kc):
        md, ns = get_mla_metadata(sl, 8, 1, num_sm_parts=2)
        return flash_mla_with_kvcache(q, kc, bt, sl, 512, md, ns, implementation="cpu")

    put = lambda x, spec: jax.device_put(x, jax.sharding.NamedSharding(mesh, spec))
    sm = jax.jit(shard_map(local, mesh=mesh, in_specs=(P("x"), P("x"), P("x"), P()),
                           out_specs=(P("x"), P("x"))))
    out, lse = sm(put(case.q, P("x")), put(case.block_table, P("x")),
                  put(case.cache_seqlens, P("x")), put(case.k_cache, P()))
    assert_close(out, lse, *f32_reference(case, False))


def test_gradient_raises():
    case = make_case(1, 1, 20, 2, 1, seed=1)
    md, ns = get_mla_metadata(case.cache_seqlens, 2, 1)

    def loss(q):
        return flash_mla_with_kvcache(q, case.k_cache, case.block_table, case.cache_seqlens, 512,
                                      md, ns, implementation="reference")[0].astype(jnp.float32).sum()

    with pytest.raises(TypeError, match="decode-only"):
        jax.grad(loss)(case.q)


def test_validation_messages():
    case = make_case(2, 1, 20, 2, 1, seed=2)
    md, ns = get_mla_metadata(case.cache_seqlens, 2, 1, num_sm_parts=2)
    args = (case.q, case.k_cache, case.block_table, case.cache_seqlens, 512, md, ns)
    call = lambda *a, **k: flash_mla_with_kvcache(*a, **k)
    with pytest.raises(ValueError, match=r"h_q must be a multiple of h_kv"):
        call(case.q[:, :, :1].repeat(3, axis=2), jnp.concatenate([case.k_cache] * 2, axis=2),
             *args[2:])
    with pytest.raises(TypeError, match=r"block_table must have dtype int32, got float32"):
        call(case.q, case.k_cache, case.block_table.astype(jnp.float32), *args[3:])
    with pytest.raises(ValueError, match=r"num_splits must have shape \(3,\)"):
        call(*args[:6], ns[:2])
    with pytest.raises(ValueError, match=r"tile_scheduler_metadata must have shape"):
        call(*args[:5], md[:, :5], ns)
    with pytest.raises(ValueError, match=r"head_dim_v must be an int in \[1, 576\], got 600"):
        call(*args[:4], 600, md, ns)
    with pytest.raises(TypeError, match=r"k_cache must have q's dtype bfloat16, got float32"):
        call(case.q, case.k_cache.astype(jnp.float32), *args[2:])
    with pytest.raises(ValueError, match=r"FP8 k_cache must have last dim 656"):
        call(case.q, case.k_cache.astype(jnp.uint8), *args[2:], is_fp8_kvcache=True)
    with pytest.raises(ValueError, match=r"implementation='cpu' cannot run these operands: the "
                                         r"kernels take bfloat16 q \(got float32\)"):
        call(case.q.astype(jnp.float32), case.k_cache.astype(jnp.float32), *args[2:],
             implementation="cpu")
    with pytest.raises(ValueError, match=r"implementation must be one of"):
        call(*args, implementation="tpu")
    with pytest.raises(TypeError, match=r"causal must be a bool, got int"):
        call(*args, causal=1)
    with pytest.raises(ValueError, match=r"cache_seqlens must hold at least one request"):
        get_mla_metadata(jnp.zeros((0,), jnp.int32), 2, 1)
    with pytest.raises(ValueError, match=r"num_sm_parts must be a positive int or None, got 0"):
        get_mla_metadata(case.cache_seqlens, 2, 1, num_sm_parts=0)


@pytest.mark.skipif(not backends()["cpu"], reason="CPU FFI not built")
def test_inconsistent_metadata_is_an_error():
    """Metadata naming requests outside the batch comes back as an error, not a wild read."""
    case = make_case(2, 1, 100, 2, 1, seed=4)
    md, ns = get_mla_metadata(case.cache_seqlens, 2, 1, num_sm_parts=2)
    bad = md.at[0, 2].set(7)  # end request 7 of a batch of 2
    with pytest.raises(Exception, match="do not match cache_seqlens"):
        jax.block_until_ready(flash_mla_with_kvcache(
            case.q, case.k_cache, case.block_table, case.cache_seqlens, 512, bad, ns,
            implementation="cpu"))
