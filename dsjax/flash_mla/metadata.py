"""FlashMLA's tile-scheduler metadata (``get_mla_metadata``), computed on device inside jit.

Semantics of deepseek-ai/FlashMLA's dense ``get_mla_metadata_kernel`` (csrc/kernels/
get_mla_metadata.cu, the 8-int layout): every request costs ``ceil(s_k / 64)`` key blocks plus a
fixed overhead of 5 blocks; the total is spread over ``num_sm_parts`` parts with a payload of
``max(ceil(total / parts) + 5, 10)`` blocks each, greedily in request order. A part that cannot
take the rest of a request (plus the overhead) takes ``payload - 5`` of its blocks and stops: the
request is split there. Each part's row is

    [begin_req, begin_key, end_req, end_key, begin_split, 0, 0, 0]

(keys, not blocks; the end request is inclusive, end_key exclusive; ``begin_split`` is the split
index of begin_req's first piece). ``num_splits`` is the prefix sum ``[0, n_0, n_0 + n_1, ...]`` of
pieces per request; partial results of request r live at rows ``num_splits[r] + split`` of the
accumulators, which therefore need ``b + num_sm_parts`` rows at most.

The scheduler is a sequential greedy scan; here it is one ``lax.while_loop`` of ``b + parts``
scalar steps, so the result is a device array with static shape, usable inside jit and identical on
every backend (the CPU kernel uses the same metadata to split its work over threads).
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp

BLOCK_N = 64
FIXED_OVERHEAD_NUM_BLOCKS = 5
BLOCK_M = 64
METADATA_SIZE = 8


def default_num_sm_parts(num_heads_per_head_k: int, num_heads_k: int) -> int:
    """FlashMLA's ``sm_count / h_kv / ceil(num_heads_per_head_k / 64)``, at least 1.

    On a GPU the SM count is the device's. On the CPU a part is one task per KV head for the
    thread pool and takes all query rows at once (no 64-row tiles), so the default is
    ``4 * os.cpu_count() / h_kv``: enough tasks to balance uneven requests and busy cores.
    """
    try:
        on_gpu = jax.default_backend() == "gpu"
    except RuntimeError:
        on_gpu = False
    if on_gpu:
        units = int(getattr(jax.devices()[0], "core_count", 0) or 132)
        m_blocks = -(-int(num_heads_per_head_k) // BLOCK_M)
        return max(1, units // int(num_heads_k) // m_blocks)
    return max(1, 4 * (os.cpu_count() or 1) // int(num_heads_k))


def compute_metadata(cache_seqlens: jax.Array, num_sm_parts: int) -> tuple[jax.Array, jax.Array]:
    """The scheduler itself (arguments validated by the caller).

    Args:
        cache_seqlens: int32 ``[b]``, b >= 1; negative lengths count as 0.
        num_sm_parts: static number of parts, >= 1.

    Returns:
        ``(tile_scheduler_metadata int32 [num_sm_parts, 8], num_splits int32 [b + 1])``.
    """
    seqlens = jnp.maximum(cache_seqlens.astype(jnp.int32), 0)
    b = seqlens.shape[0]
    ov = FIXED_OVERHEAD_NUM_BLOCKS
    num_blocks = (seqlens + BLOCK_N - 1) // BLOCK_N
    total = jnp.sum(num_blocks + ov)
    payload = jnp.maximum((total + num_sm_parts - 1) // num_sm_parts + ov, 2 * ov)

    # state: part, req, block, n_split, cum, remain, begin(req, block, split) of this part, meta, splits
    def cond(st):
        return st[0] < num_sm_parts

    def body(st):
        part, req, blk, nsplit, cum, remain, b_req, b_blk, b_split, meta, splits = st
        active = req < b
        nb = num_blocks[jnp.minimum(req, b - 1)]
        rem_blocks = nb - blk
        take_all = active & (remain >= rem_blocks + ov)
        # Consume the whole rest of the request and move on to the next one.
        cum_all = cum + nsplit + 1
        splits_all = splits.at[jnp.minimum(req + 1, b)].set(cum_all)
        # Otherwise the part ends here, taking a piece of the request if the payload allows it.
        take_part = active & ~take_all & (remain - ov > 0)
        blk_part = jnp.where(take_part, blk + remain - ov, blk)
        nsplit_part = jnp.where(take_part, nsplit + 1, nsplit)
        n_req = jnp.where(take_all, req + 1, req)
        n_blk = jnp.where(take_all, 0, blk_part)
        n_nsplit = jnp.where(take_all, 0, nsplit_part)
        end_req = jnp.where(n_blk > 0, n_req, n_req - 1)
        end_key = jnp.where(n_blk > 0, n_blk * BLOCK_N, seqlens[jnp.clip(n_req - 1, 0, b - 1)])
        row = jnp.stack([b_req, b_blk * BLOCK_N, end_req, end_key, b_split, 0, 0, 0]).astype(jnp.int32)
        finish = ~take_all
        meta = jnp.where(finish, meta.at[part].set(row), meta)
        splits = jnp.where(take_all, splits_all, splits)
        n_cum = jnp.where(take_all, cum_all, cum)
        n_remain = jnp.where(take_all, remain - rem_blocks - ov, payload)
        n_part = jnp.where(finish, part + 1, part)
        n_b_req = jnp.where(finish, n_req, b_req)
        n_b_blk = jnp.where(finish, n_blk, b_blk)
        n_b_split = jnp.where(finish, n_nsplit, b_split)
        return (n_part, n_req, n_blk, n_nsplit, n_cum, n_remain, n_b_req, n_b_blk, n_b_split,
                meta, splits)

    # Derived from seqlens so that, under shard_map, the carry has the same (varying) type as the
    # values the loop body computes.
    z = seqlens[0] * 0
    init = (z, z, z, z, z, payload.astype(jnp.int32), z, z, z,
            jnp.zeros((num_sm_parts, METADATA_SIZE), jnp.int32) + z,
            jnp.zeros((b + 1,), jnp.int32) + z)
    out = jax.lax.while_loop(cond, body, init)
    return out[9], out[10]
