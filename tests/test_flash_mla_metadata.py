"""get_mla_metadata: FlashMLA's greedy tile scheduler, on device under jit.

Checked against a direct Python transcription of the scheduler in deepseek-ai/FlashMLA
(get_mla_metadata_kernel, 8-int rows) and against the invariants the kernels rely on: the parts
cover every request's keys exactly once, in order, and num_splits counts the pieces.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsjax.flash_mla import get_mla_metadata
from dsjax.flash_mla.metadata import default_num_sm_parts


def scheduler_py(seqlens, parts, bn=64, ov=5):
    b = len(seqlens)
    nbs = [-(-int(s) // bn) for s in seqlens]
    payload = max(-(-sum(n + ov for n in nbs) // parts) + ov, 2 * ov)
    idx = blk = ns = cum = 0
    splits = [0] * (b + 1)
    meta = []
    for _ in range(parts):
        row = [idx, blk * bn, 0, 0, ns, 0, 0, 0]
        rem = payload
        while idx < b:
            r = nbs[idx] - blk
            if rem >= r + ov:
                cum += ns + 1
                splits[idx + 1] = cum
                rem -= r + ov
                idx, blk, ns = idx + 1, 0, 0
            else:
                if rem - ov > 0:
                    blk += rem - ov
                    ns += 1
                break
        row[2] = idx if blk > 0 else idx - 1
        row[3] = blk * bn if blk > 0 else int(seqlens[idx - 1])
        meta.append(row)
    assert idx == b and blk == 0 and ns == 0
    return np.array(meta), np.array(splits)


def coverage(meta, splits, seqlens):
    """Per request, the (split index, key range) pieces the parts assign."""
    pieces = {r: [] for r in range(len(seqlens))}
    for br, bk, er, ek, bs, *_ in meta:
        for r in range(br, er + 1):
            k0 = bk if r == br else 0
            k1 = ek if r == er else int(seqlens[r])
            pieces[r].append((bs if r == br else 0, k0, k1))
    for r, ps in pieces.items():
        assert [p[0] for p in ps] == list(range(len(ps)))
        assert ps[0][1] == 0 and ps[-1][2] == seqlens[r]
        assert all(a[2] == b[1] for a, b in zip(ps, ps[1:]))  # contiguous, no overlap
        assert splits[r + 1] - splits[r] == len(ps)


@pytest.mark.parametrize("seed", range(6))
def test_matches_flashmla_scheduler(seed):
    rng = np.random.default_rng(seed)
    f = jax.jit(get_mla_metadata, static_argnums=(1, 2), static_argnames="num_sm_parts")
    for _ in range(4):
        b = int(rng.integers(1, 40))
        parts = int(rng.integers(1, 140))
        lens = rng.integers(0, 9000, size=b)
        lens[rng.random(b) < 0.2] = 0
        md, ns = f(jnp.asarray(lens, jnp.int32), 64, 1, num_sm_parts=parts)
        want_md, want_ns = scheduler_py(lens, parts)
        np.testing.assert_array_equal(np.asarray(md), want_md)
        np.testing.assert_array_equal(np.asarray(ns), want_ns)
        coverage(want_md, want_ns, lens)
        assert md.shape == (parts, 8) and md.dtype == jnp.int32 and ns.shape == (b + 1,)


def test_long_request_is_split_and_balanced():
    lens = jnp.array([8192, 64, 0], jnp.int32)
    md, ns = get_mla_metadata(lens, 128, 1, num_sm_parts=16)
    md, ns = np.asarray(md), np.asarray(ns)
    assert ns[1] > 8  # the long request is split over many parts
    assert ns[2] - ns[1] == 1 and ns[3] - ns[2] == 1
    # Every part's work (blocks + 5 per request touched) stays within the payload.
    work = [((r[3] - r[1]) if r[0] == r[2] else 0) for r in md]
    assert max(work) <= (-(-(128 + 1 + 0 + 15) // 16) + 5) * 64


def test_default_parts_formula():
    # On the CPU: 4 tasks per core, shared among the KV heads; at least 1.
    import os
    assert default_num_sm_parts(128, 1) == 4 * os.cpu_count()
    assert default_num_sm_parts(128, 2) == 2 * os.cpu_count()
    assert default_num_sm_parts(1, 10 ** 6) == 1
