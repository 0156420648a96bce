"""Random decode problems shaped like FlashMLA's tests, for tests, benches and notebooks.

``make_case`` builds a paged cache with the adversarial details FlashMLA's kernels must survive:
a randomly permuted block table, NaN in every cache slot that no sequence uses (including the
tail of each sequence's last page), garbage (negative, huge) indices in the unused tail of the
block table, and optionally variable lengths with zeros among them.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass
class DecodeCase:
    q: jax.Array             # bf16 [b, s_q, h_q, 576]
    k_cache: jax.Array       # bf16 [num_blocks, page, h_kv, 576]
    block_table: jax.Array   # int32 [b, max_blocks]
    cache_seqlens: jax.Array  # int32 [b]
    keys: list[np.ndarray]   # float32 [s_k_i, h_kv, 576] per sequence: the true keys, in order


def make_case(b: int, s_q: int, s_k: int, h_q: int, h_kv: int, *, varlen: bool = False,
              page: int = 64, seed: int = 0, nan_fill: bool = True, garbage_tail: bool = True,
              zero_len: bool = False, dtype=jnp.bfloat16) -> DecodeCase:
    """A random decode problem with the given shapes.

    Args:
        b, s_q, s_k, h_q, h_kv: shapes; with ``varlen`` lengths are drawn from ``[1, 2 * s_k]``
            (like FlashMLA's tests) and with ``zero_len`` the second sequence (or the only one)
            has length 0.
        page: page_block_size.
        nan_fill: unused cache slots hold NaN (else zeros).
        garbage_tail: block-table entries past a sequence's used pages hold garbage indices.
    """
    rng = np.random.default_rng(seed)
    if varlen:
        lens = rng.integers(1, 2 * s_k + 1, size=b)
    else:
        lens = np.full(b, s_k)
    if zero_len:
        lens[min(1, b - 1)] = 0
    lens = lens.astype(np.int32)
    max_blocks = max(1, int(-(-lens.max() // page)))
    used = [int(-(-n // page)) for n in lens]
    num_blocks = sum(used) + 3  # a few pages no sequence owns
    perm = rng.permutation(num_blocks)
    cache = np.full((num_blocks, page, h_kv, 576), np.nan if nan_fill else 0.0, np.float32)
    table = np.zeros((b, max_blocks), np.int64)
    keys = []
    nxt = 0
    for i in range(b):
        k = rng.standard_normal((int(lens[i]), h_kv, 576)).astype(np.float32)
        k = np.asarray(jnp.asarray(k, dtype).astype(jnp.float32))
        keys.append(k)
        for j in range(max_blocks):
            if j < used[i]:
                blk = perm[nxt]
                nxt += 1
                table[i, j] = blk
                rows = k[j * page:(j + 1) * page]
                cache[blk, :rows.shape[0]] = rows
            elif garbage_tail:
                table[i, j] = rng.choice([-1, -(2 ** 31), 2 ** 31 - 1, num_blocks,
                                          int(rng.integers(-10 ** 6, 10 ** 6))])
            else:
                table[i, j] = 0
    q = jnp.asarray(rng.standard_normal((b, s_q, h_q, 576)).astype(np.float32), dtype)
    return DecodeCase(q=q, k_cache=jnp.asarray(cache, dtype),
                      block_table=jnp.asarray(table.astype(np.int32)),
                      cache_seqlens=jnp.asarray(lens), keys=keys)


def numpy_oracle(q: np.ndarray, keys: list[np.ndarray], head_dim_v: int, scale: float,
                 causal: bool) -> tuple[np.ndarray, np.ndarray]:
    """Float64 per-sequence MLA attention straight from the definition (no paging, no masks
    beyond causal). Returns ``(out [b, s_q, h_q, dv], lse [b, h_q, s_q])``."""
    q = np.asarray(q, np.float64)
    b, s_q, h_q, _ = q.shape
    out = np.zeros((b, s_q, h_q, head_dim_v))
    lse = np.full((b, h_q, s_q), np.inf)
    for i in range(b):
        k = np.asarray(keys[i], np.float64)
        s_k, h_kv = k.shape[0], k.shape[1]
        g = h_q // h_kv
        for t in range(s_q):
            n = s_k if not causal else max(0, min(s_k, s_k - s_q + t + 1))
            if n == 0:
                continue
            for h in range(h_q):
                kk = k[:n, h // g]
                s = kk @ q[i, t, h] * scale
                mx = s.max()
                p = np.exp(s - mx)
                out[i, t, h] = p @ kk[:, :head_dim_v] / p.sum()
                lse[i, h, t] = mx + np.log(p.sum())
    return out, lse
