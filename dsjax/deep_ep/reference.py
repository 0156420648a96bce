"""Pure-JAX specification of DeepEP's local (per-rank) kernels, and the dense MoE oracle.

Semantics follow deepseek-ai/DeepEP (``get_dispatch_layout``, ``Buffer.dispatch`` / ``combine``,
``low_latency_dispatch`` / ``low_latency_combine``): a token goes once to every rank that holds at
least one of its top-k experts; on the receiving rank its top-k ids are rewritten to local expert
ids, -1 where the expert lives elsewhere, and the weights of those entries are zeroed; combine sums
each token's returned rows over the ranks it visited.

dsjax splits each DeepEP kernel into local work (this module: the specification; the CPU and CUDA
FFI twins compute the same integers and the same rows) and XLA collectives (``all_to_all`` with a
static capacity), which live in :mod:`dsjax.deep_ep._plan`. Every function here works on one rank's
arrays and has the same signature as its twin in :mod:`dsjax.deep_ep._ffi`.

Index conventions shared by all implementations:

* expert ids are int32; any negative id means "no expert" (DeepEP uses -1). Ids at or above the
  expert count are invalid input: the native kernels report an error, the reference ignores them.
* ``route`` assigns the k-th token (in token order) that goes to destination ``d`` the send slot
  ``d * capacity + k`` when ``k < capacity``; later ones are dropped and counted.
* ``reduce_idx[t, d]`` is the flat slot of token ``t`` in destination ``d``'s block, -1 if none.
* ``send_src[slot]`` is the source token of a send slot, -1 for padding.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

I32 = jnp.int32
F32 = jnp.float32


def dispatch_layout(topk_idx: jax.Array, *, num_experts: int, num_ranks: int,
                    ranks_per_node: int | None) -> tuple[jax.Array, jax.Array | None, jax.Array, jax.Array]:
    """Counts of one rank's tokens per destination rank, node and expert (DeepEP's layout kernel).

    Args:
        topk_idx: int32 ``[T, K]`` global expert ids, negative = no expert.
        num_experts: E, a multiple of ``num_ranks``; rank r holds experts ``[r·E/R, (r+1)·E/R)``.
        num_ranks: R.
        ranks_per_node: ranks per node (a divisor of R), or None for no node counts.

    Returns:
        ``(num_tokens_per_rank [R] int32, num_tokens_per_node [R/ranks_per_node] int32 or None,
        num_tokens_per_expert [E] int32, is_token_in_rank [T, R] bool)``. A token listing one expert
        twice counts once for it.
    """
    per_rank_experts = num_experts // num_ranks
    valid = (topk_idx >= 0) & (topk_idx < num_experts)
    rank_of = jnp.where(valid, topk_idx // per_rank_experts, -1)
    in_rank = (rank_of[:, :, None] == jnp.arange(num_ranks, dtype=I32)).any(axis=1)
    in_expert = (jnp.where(valid, topk_idx, -1)[:, :, None]
                 == jnp.arange(num_experts, dtype=I32)).any(axis=1)
    per_node = None
    if ranks_per_node is not None:
        nodes = num_ranks // ranks_per_node
        in_node = in_rank.reshape(-1, nodes, ranks_per_node).any(axis=2)
        per_node = in_node.sum(axis=0, dtype=I32)
    return in_rank.sum(axis=0, dtype=I32), per_node, in_expert.sum(axis=0, dtype=I32), in_rank


def route(topk_idx: jax.Array, topk_weights: jax.Array, *, experts_per_dest: int, num_dests: int,
          capacity: int, local_ids: bool) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array, jax.Array]:
    """Assigns each (token, destination) pair a send slot and builds the send-side metadata.

    Destination of expert ``e`` is ``e // experts_per_dest``; a token goes once to each destination
    holding at least one of its experts (one copy per destination, not per expert).

    Args:
        topk_idx: int32 ``[T, K]``, negative = no expert; ids ``>= experts_per_dest·num_dests``
            are ignored (native kernels: error).
        topk_weights: float32 ``[T, K]``.
        experts_per_dest: experts held by one destination.
        num_dests: D.
        capacity: C, send rows per destination.
        local_ids: True: the sent ids are destination-local (``e - d·experts_per_dest``, -1 for
            experts of other destinations) and the weights of other destinations' experts are 0.
            False: ids and weights are sent unchanged (the first hop of the two-hop path).

    Returns:
        ``(reduce_idx [T, D] int32, send_src [D·C] int32, send_idx [D·C, K] int32,
        send_w [D·C, K] float32, num_dropped int32 [])``; padding slots have src -1, ids -1,
        weights 0; ``num_dropped`` counts (token, destination) pairs beyond the capacity.
    """
    t, k = topk_idx.shape
    d_count, c = num_dests, capacity
    valid = (topk_idx >= 0) & (topk_idx < experts_per_dest * num_dests)
    dest = jnp.where(valid, topk_idx // experts_per_dest, -1)
    dests = jnp.arange(d_count, dtype=I32)
    in_dest = (dest[:, :, None] == dests).any(axis=1)  # [T, D]
    pos = jnp.cumsum(in_dest, axis=0, dtype=I32) - in_dest.astype(I32)
    keep = in_dest & (pos < c)
    num_dropped = (in_dest & ~keep).sum(dtype=I32)
    reduce_idx = jnp.where(keep, dests * c + pos, -1)
    flat = jnp.where(keep, reduce_idx, d_count * c)  # out of bounds: dropped by the scatter
    tokens = jnp.broadcast_to(jnp.arange(t, dtype=I32)[:, None], (t, d_count))
    send_src = jnp.full((d_count * c,), -1, I32).at[flat.ravel()].set(tokens.ravel(), mode="drop")
    has = send_src >= 0
    src = jnp.maximum(send_src, 0)
    if t == 0:  # nothing to index: every slot is padding
        rows_idx = jnp.full((d_count * c, k), -1, I32)
        rows_w = jnp.zeros((d_count * c, k), F32)
        dest_rows = jnp.full((d_count * c, k), -1, I32)
    else:
        rows_idx, rows_w, dest_rows = topk_idx[src], topk_weights[src].astype(F32), dest[src]
    if local_ids:
        slot_dest = (jnp.arange(d_count * c, dtype=I32) // c)[:, None]
        mine = has[:, None] & (dest_rows == slot_dest)
        send_idx = jnp.where(mine, rows_idx - slot_dest * experts_per_dest, -1)
        send_w = jnp.where(mine, rows_w, 0.0)
    else:
        send_idx = jnp.where(has[:, None] & (dest_rows >= 0), rows_idx, -1)
        send_w = jnp.where(has[:, None], rows_w, 0.0)
    return reduce_idx, send_src, send_idx.astype(I32), send_w, num_dropped


def gather_rows(x: jax.Array, idx: jax.Array) -> jax.Array:
    """``out[n] = x[idx[n]]`` (any dtype, trailing dims kept), zeros where ``idx[n] < 0``.

    Args:
        x: ``[M, ...]``.
        idx: int32 ``[N]``, entries in ``[-1, M)``.
    """
    has = idx >= 0
    rows = x[jnp.maximum(idx, 0)] if x.shape[0] > 0 else jnp.zeros((idx.shape[0], *x.shape[1:]), x.dtype)
    return jnp.where(has.reshape(-1, *([1] * (x.ndim - 1))), rows, jnp.zeros((), x.dtype))


def gather_reduce(x: jax.Array, idx: jax.Array, weights: jax.Array | None, out_dtype) -> jax.Array:
    """``out[n] = Σ_j w[n, j] · x[idx[n, j]]`` over ``idx[n, j] >= 0``, accumulated in float32.

    Args:
        x: float ``[M, H]``.
        idx: int32 ``[N, J]``, entries in ``[-1, M)``.
        weights: float32 ``[N, J]`` or None (all ones).
        out_dtype: dtype of the result ``[N, H]``.
    """
    has = idx >= 0
    rows = x[jnp.maximum(idx, 0)].astype(F32)  # [N, J, H]
    w = jnp.ones(idx.shape, F32) if weights is None else weights.astype(F32)
    # where(), not a multiply by 0: a skipped entry reads row 0, which may hold inf/NaN. Both the
    # rows and the weights are masked *before* the product too, so that under autodiff the
    # product's transpose never forms 0·NaN (the two-where rule).
    rows = jnp.where(has[..., None], rows, 0.0)
    w = jnp.where(has, w, 0.0)
    terms = jnp.where(has[..., None], rows * w[..., None], 0.0)
    out = terms[:, 0] if idx.shape[1] > 0 else jnp.zeros((idx.shape[0], x.shape[1]), F32)
    for j in range(1, idx.shape[1]):  # sequential order, as the native twins sum
        out = out + terms[:, j]
    return out.astype(out_dtype)


def ll_layout(recv_idx: jax.Array, *, num_local_experts: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Low-latency receive layout: packs the received rows of each local expert to the front.

    Args:
        recv_idx: int32 ``[M, K]`` local expert ids of the received rows (-1 = not here), rows in
            (source rank, slot) order.
        num_local_experts: L.

    Returns:
        ``(src_row [L·M] int32, count [L] int32, pos [M, K] int32)``: ``src_row[e·M + p]`` is the
        received row that is expert ``e``'s p-th token (-1 past ``count[e]``); ``pos[m, k]`` is the
        flat position ``e·M + p`` of row m's k-th expert (-1 where none).
    """
    m, _ = recv_idx.shape
    nl = num_local_experts
    valid = (recv_idx >= 0) & (recv_idx < nl)
    e = jnp.where(valid, recv_idx, -1)
    mask = (e[:, :, None] == jnp.arange(nl, dtype=I32)).any(axis=1)  # [M, L]
    p = jnp.cumsum(mask, axis=0, dtype=I32) - mask.astype(I32)
    count = mask.sum(axis=0, dtype=I32)
    flat = jnp.where(mask, jnp.arange(nl, dtype=I32) * m + p, nl * m)
    rows = jnp.broadcast_to(jnp.arange(m, dtype=I32)[:, None], (m, nl))
    src_row = jnp.full((nl * m,), -1, I32).at[flat.ravel()].set(rows.ravel(), mode="drop")
    ec = jnp.maximum(e, 0)
    pos = jnp.where(valid, ec * m + jnp.take_along_axis(p, ec, axis=1), -1)
    return src_row, count, pos.astype(I32)


def reference_moe(x: jax.Array, topk_idx: jax.Array, topk_weights: jax.Array, expert_fn) -> jax.Array:
    """Dense single-device MoE: ``out[t] = Σ_k w[t, k] · expert_fn(topk_idx[t, k], x[t])``.

    The oracle for expert-parallel layers built on dispatch/combine: no communication, no capacity.

    Args:
        x: float ``[T, H]``.
        topk_idx: int32 ``[T, K]`` global expert ids, negative = no expert (contributes nothing).
        topk_weights: float ``[T, K]``.
        expert_fn: ``(expert_ids int32 [N], rows [N, H]) -> [N, H]``, row-wise.

    Returns:
        float32 ``[T, H]`` (accumulated in float32).
    """
    t, k = topk_idx.shape
    ids = jnp.maximum(topk_idx, 0).reshape(-1)
    rows = jnp.repeat(x, k, axis=0)
    y = expert_fn(ids, rows).astype(F32).reshape(t, k, -1)
    w = jnp.where(topk_idx >= 0, topk_weights.astype(F32), 0.0)
    return jnp.where((topk_idx >= 0)[..., None], y * w[..., None], 0.0).sum(axis=1)
