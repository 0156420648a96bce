"""PagedMLACache: jit-able allocate / append / free, and decoding over it.

Appending tokens step by step (prefill, single-token decode steps, a multi-token MTP step) and then
decoding must equal decoding over a cache built with one append, and the float64 oracle.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsjax import backends
from dsjax.flash_mla import PagedMLACache
from dsjax.flash_mla.testing import numpy_oracle

B, PAGE, NBLK, MAXB = 3, 16, 24, 6


def rows(rng, b, t, h_kv=1):
    return jnp.asarray(rng.standard_normal((b, t, h_kv, 576)), jnp.bfloat16)


def pages_in_use(c: PagedMLACache) -> list[int]:
    bt, lens = np.asarray(c.block_table), np.asarray(c.seqlens)
    return [int(bt[i, j]) for i in range(bt.shape[0]) for j in range(-(-lens[i] // PAGE))]


@pytest.mark.parametrize("fp8", [False, True])
def test_incremental_append_equals_built_at_once(fp8):
    rng = np.random.default_rng(0)
    steps = [(rows(rng, B, 20), jnp.array([5, 0, 20], jnp.int32)),  # ragged prefill
             (rows(rng, B, 1), None), (rows(rng, B, 1), None),      # decode steps
             (rows(rng, B, 2), jnp.array([2, 1, 2], jnp.int32))]    # an MTP step
    append = jax.jit(lambda c, r, n: c.append(r, n))
    c = PagedMLACache.create(NBLK, PAGE, B, MAXB, fp8=fp8)
    per_seq = [[] for _ in range(B)]
    for r, n in steps:
        n_ = jnp.full((B,), r.shape[1], jnp.int32) if n is None else n
        c = append(c, r, n_)
        for i in range(B):
            per_seq[i].append(np.asarray(r[i, :int(n_[i])], np.float32))
    keys = [np.concatenate(k) for k in per_seq]
    lens = np.array([k.shape[0] for k in keys])
    np.testing.assert_array_equal(np.asarray(c.seqlens), lens)
    assert not bool(c.overflow)
    used = pages_in_use(c)
    assert len(set(used)) == len(used) and int(c.num_free) == NBLK - len(used)

    at_once = PagedMLACache.create(NBLK, PAGE, B, MAXB, fp8=fp8)
    t = int(lens.max())
    full = np.zeros((B, t, 1, 576), np.float32)
    for i in range(B):
        full[i, :lens[i]] = keys[i]
    at_once = append(at_once, jnp.asarray(full, jnp.bfloat16), jnp.asarray(lens, jnp.int32))

    q = rows(rng, B, 2, h_kv=8)  # s_q = 2, h_q = 8
    for impl in ("reference", "cpu") if backends()["cpu"] else ("reference",):
        attend = jax.jit(lambda c, q: c.attend(q, causal=True, num_sm_parts=3,
                                               implementation=impl))
        out1, lse1 = attend(c, q)
        out2, lse2 = attend(at_once, q)  # same shapes: one compile per implementation
        np.testing.assert_array_equal(np.asarray(out1, np.float32), np.asarray(out2, np.float32))
        np.testing.assert_array_equal(np.asarray(lse1), np.asarray(lse2))
    if not fp8:  # against the definition (bf16 rows are stored exactly)
        want_out, want_lse = numpy_oracle(np.asarray(q, np.float32), [k[:, :, :] for k in keys],
                                          512, 576 ** -0.5, True)
        half_ulp = 2.0 ** (np.floor(np.log2(np.maximum(np.abs(want_out), 1e-30))) - 8)
        assert (np.abs(np.asarray(out1, np.float32) - want_out) <= 8e-4 + half_ulp).all()
        np.testing.assert_allclose(np.asarray(lse1), want_lse, atol=1e-5, rtol=0)


def test_free_reuses_pages_and_overflow_is_sticky():
    rng = np.random.default_rng(1)
    c = PagedMLACache.create(8, PAGE, 2, 4)
    c = c.append(rows(rng, 2, 40))  # 3 pages each -> 6 of 8 used
    assert int(c.num_free) == 2
    before = pages_in_use(c)
    c = jax.jit(lambda c, w: c.free(w))(c, jnp.array([True, False]))
    assert int(c.num_free) == 5 and int(c.seqlens[0]) == 0
    assert (np.asarray(c.block_table[0]) == -1).all()
    c = c.append(rows(rng, 2, 33), jnp.array([33, 0], jnp.int32))  # 3 pages again for seq 0
    now = pages_in_use(c)
    assert len(set(now)) == len(now) == 6 and set(now) <= set(range(8))
    assert set(now[3:]) == set(before[3:])  # seq 1 untouched
    # 16 more tokens for seq 1 would need a 5th block (max_blocks_per_seq = 4): no change + flag.
    snap = (np.asarray(c.block_table), np.asarray(c.seqlens), int(c.num_free))
    c2 = c.append(rows(rng, 2, 16), jnp.array([0, 16], jnp.int32))
    c2 = c2.append(rows(rng, 2, 16), jnp.array([0, 16], jnp.int32))
    assert bool(c2.overflow)
    assert int(c2.seqlens[1]) == 56  # the first append fitted (4 pages), the second did not
    c3 = c.allocate(jnp.array([200, 0], jnp.int32))  # more pages than exist
    assert bool(c3.overflow)
    np.testing.assert_array_equal(np.asarray(c3.block_table), snap[0])
    assert int(c3.num_free) == snap[2]
    c4 = c3.append(rows(rng, 2, 1))  # still fits, still flagged
    assert bool(c4.overflow) and list(np.asarray(c4.seqlens)) == [34, 41]


def test_create_validation():
    with pytest.raises(ValueError, match=r"page_block_size must be a positive int, got 0"):
        PagedMLACache.create(4, 0, 1, 1)
    c = PagedMLACache.create(4, 16, 2, 2)
    with pytest.raises(ValueError, match=r"rows must have shape \(2, t, 1, 576\)"):
        c.append(jnp.zeros((2, 1, 1, 512), jnp.bfloat16))
