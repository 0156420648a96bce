"""Expert-parallel load balancer (EPLB) as a jit-compiled, layer-vmapped JAX function.

This follows DeepSeek's EPLB (https://github.com/deepseek-ai/EPLB, ``eplb.py``) step by step and
returns the same three maps for the same float32 loads:

1. *Hierarchical policy* (``num_groups % num_nodes == 0``): sum the load of each group of
   ``E / num_groups`` consecutive experts and pack the groups onto nodes by balanced packing.
2. Inside each node, give every expert one replica, then hand each extra slot to the expert with
   the largest ``load / replica count`` (lowest index on ties).
3. Pack the node's replicas (load = expert load / its count) onto the node's GPUs by balanced
   packing; physical slot = ``gpu * (R / num_gpus) + rank inside the pack``.

Otherwise the *global policy* runs the same steps with one group and one node.

Balanced packing sorts items by descending load and puts each item into the least-loaded pack
that is not yet full (lowest pack index on ties); each pack gets the same number of items, and
when every pack gets exactly one item the identity assignment is used, as in the reference.
Equal loads are sorted lower index first (a stable sort). The reference uses torch's default
(unstable) CPU sort, which gives the same order up to 16 items (insertion sort) but may order
ties differently on longer rows; replicas of one expert always tie, which can permute replica
ranks in ``log2phy`` but not ``phy2log``. Distinct float loads (the usual case: averaged token
counts) give exactly the reference's outputs.

Beyond the reference, ``refine_steps`` runs a local search inside each node after step 3. Each
step takes the node's most loaded GPU and evaluates, exactly, every *swap* of one of its replicas
with a replica on another GPU of the node, and every *move* that re-points one of its slots from an
expert with several replicas to another expert of the node (the greedy replication ignores how the
replicas will pack; e.g. a hot expert with 9 replicas on 8 GPUs puts two on one GPU). The
candidate with the lowest resulting maximum is applied if it lowers the node's maximum by more
than a relative ``1e-5`` (far above float32 rounding of a GPU's sum), so the maximum GPU load of
every node, hence of every layer, never increases; node locality, the slots per GPU and "every
expert has a replica" are kept. With refinement, replica ranks follow slot order.

Everything is ``lax`` loops over static sizes, vmapped over layers (and nodes): no host round
trips, deterministic.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from dsjax._src import checks

_OP = "rebalance_experts"

# A refinement step must lower the node's maximum GPU load by this fraction of it. A
# GPU holds a few dozen replicas at most, so float32 sums of the same items in another order
# differ by far less (~1e-6 relative); the maximum recomputed from the new placement is therefore
# strictly lower, never higher.
_REFINE_MIN_GAIN = 1e-5


class EplbResult(NamedTuple):
    """Outputs of :func:`rebalance_experts` (a tuple, so ``phy2log, log2phy, logcnt = ...`` works).

    Attributes:
        phy2log: int32 [L, R], the logical expert held by each physical slot.
        log2phy: int32 [L, E, X], the physical slots of each expert by replica rank, -1 padded.
        logcnt: int32 [L, E], number of replicas of each expert (>= 1, sums to R per layer).
    """

    phy2log: jax.Array
    log2phy: jax.Array
    logcnt: jax.Array


def _inverse(perm: jax.Array) -> jax.Array:
    """Inverse of a permutation along the last axis (int32)."""
    n = perm.shape[-1]
    return jnp.zeros_like(perm).at[perm].set(jnp.arange(n, dtype=perm.dtype))


def _first(mask: jax.Array) -> jax.Array:
    """Index of the first True of a 1-D mask (len(mask) when none); a plain min reduction, which
    XLA:CPU runs faster than the variadic argmax reduction."""
    n = mask.shape[0]
    return jnp.min(jnp.where(mask, jnp.arange(n, dtype=jnp.int32), n))


def _sort_descending(weight: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Stable descending sort of one row: (order int32 [n], weight[order]).

    Ranks come from an n x n comparison (ties: lower index first; NaN counts as +inf, which is
    where torch puts it): on XLA:CPU this is several times faster than ``argsort``, whose
    comparator-driven sort dominates the whole solver for the row sizes EPLB uses.
    """
    n = weight.shape[0]
    key = jnp.where(jnp.isnan(weight), jnp.inf, weight)
    idx = jnp.arange(n, dtype=jnp.int32)
    before = (key[None, :] > key[:, None]) | ((key[None, :] == key[:, None])
                                              & (idx[None, :] < idx[:, None]))
    rank = jnp.sum(before, axis=1, dtype=jnp.int32)  # position of item i in the sorted order
    order = jnp.zeros((n,), jnp.int32).at[rank].set(idx)
    return order, jnp.zeros_like(weight).at[rank].set(weight)


# The loops below index their carried arrays only with the loop counter (the same for every
# vmapped row, so a dynamic-update-slice) and one-hot masks (elementwise), never with a
# data-dependent index: batched scatters and gathers inside a while loop dominate on XLA:CPU.


def _balanced_packing(weight: jax.Array, num_packs: int) -> tuple[jax.Array, jax.Array]:
    """Greedy balanced packing of one row.

    Args:
        weight: float32 [n], load of each item; n % num_packs == 0.
        num_packs: number of packs (static).

    Returns:
        (pack_index, rank_in_pack), int32 [n] each: the pack of every item and its position
        inside the pack (order of insertion).
    """
    n = weight.shape[0]
    per_pack = n // num_packs
    if per_pack == 1:
        # The reference skips the greedy here: item i goes to pack i.
        return jnp.arange(n, dtype=jnp.int32), jnp.zeros((n,), jnp.int32)
    order, sorted_w = _sort_descending(weight)

    def body(t, carry):
        pack_w, pack_n, pack_sorted, rank_sorted = carry
        w = lax.dynamic_index_in_dim(sorted_w, t, keepdims=False)
        full = pack_n >= per_pack
        best = jnp.min(jnp.where(full, jnp.inf, pack_w))
        # First non-full pack at the minimum (also right when that minimum is +inf).
        p = _first(~full & (pack_w == best))
        hot = jnp.arange(num_packs, dtype=jnp.int32) == p
        r = jnp.sum(jnp.where(hot, pack_n, 0))
        pack_sorted = lax.dynamic_update_index_in_dim(pack_sorted, p, t, 0)
        rank_sorted = lax.dynamic_update_index_in_dim(rank_sorted, r, t, 0)
        # Adding 0.0 to the other packs leaves them bit-identical.
        pack_w = pack_w + jnp.where(hot, w, jnp.float32(0))
        pack_n = pack_n + hot.astype(jnp.int32)
        return pack_w, pack_n, pack_sorted, rank_sorted

    init = (jnp.zeros((num_packs,), jnp.float32), jnp.zeros((num_packs,), jnp.int32),
            jnp.zeros((n,), jnp.int32), jnp.zeros((n,), jnp.int32))
    _, _, pack_sorted, rank_sorted = lax.fori_loop(0, n, body, init, unroll=2)
    pack_idx = jnp.zeros((n,), jnp.int32).at[order].set(pack_sorted)
    rank = jnp.zeros((n,), jnp.int32).at[order].set(rank_sorted)
    return pack_idx, rank


def _replicate_experts(weight: jax.Array, num_phy: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Greedy replication of one row: every extra slot goes to the max of load / count.

    Args:
        weight: float32 [n_log].
        num_phy: number of physical slots (static, >= n_log).

    Returns:
        phy2log int32 [num_phy], rank int32 [num_phy] (replica rank of each slot),
        logcnt int32 [n_log].
    """
    n_log = weight.shape[0]
    n_extra = num_phy - n_log
    iota = jnp.arange(n_log, dtype=jnp.int32)
    if n_extra == 0:
        return iota, jnp.zeros((n_log,), jnp.int32), jnp.ones((n_log,), jnp.int32)

    def body(i, carry):
        extra_log, extra_rank, logcnt = carry
        # float32 / float32(count) as in the reference (torch promotes the int64 count to f32);
        # the first maximum on ties, like torch's max(dim).indices.
        ratio = weight / logcnt.astype(jnp.float32)
        e = _first(ratio == jnp.max(ratio))
        hot = iota == e
        extra_log = lax.dynamic_update_index_in_dim(extra_log, e, i, 0)
        extra_rank = lax.dynamic_update_index_in_dim(extra_rank, jnp.sum(jnp.where(hot, logcnt, 0)),
                                                     i, 0)
        return extra_log, extra_rank, logcnt + hot.astype(jnp.int32)

    init = (jnp.zeros((n_extra,), jnp.int32), jnp.zeros((n_extra,), jnp.int32),
            jnp.ones((n_log,), jnp.int32))
    extra_log, extra_rank, logcnt = lax.fori_loop(0, n_extra, body, init)
    phy2log = jnp.concatenate([iota, extra_log])
    rank = jnp.concatenate([jnp.zeros((n_log,), jnp.int32), extra_rank])
    return phy2log, rank, logcnt


def _refine(weight: jax.Array, slot_expert: jax.Array, steps: int) -> jax.Array:
    """Local search on one node's GPUs; never increases the node's maximum GPU load.

    Each step looks at the most loaded GPU ``h`` and evaluates two neighbourhoods exactly (the
    resulting load of every GPU of the node):

    - *swap*: exchange a replica on ``h`` with a replica on another GPU;
    - *move*: re-point a slot on ``h`` from expert A (which has >= 2 replicas) to any expert B of
      the node: A's other replicas each take a larger share, B's a smaller one.

    The candidate with the lowest resulting maximum is applied (first in swap-then-move order on
    ties) if it lowers the maximum by more than ``_REFINE_MIN_GAIN`` relative; else nothing
    changes.

    Args:
        weight: float32 [n_log], load of each expert of the node (node-local ids).
        slot_expert: int32 [G, n_phy / G], the expert in every slot of every GPU of the node.
        steps: number of steps (static).

    Returns:
        The improved slot_expert, same shape; every expert keeps at least one replica.
    """
    gpus, per = slot_expert.shape
    n_log = weight.shape[0]
    g_iota = jnp.arange(gpus, dtype=jnp.int32)
    r_iota = jnp.arange(per, dtype=jnp.int32)
    e_iota = jnp.arange(n_log, dtype=jnp.int32)
    n_swap = per * gpus * per

    def body(_, carry):
        # per_gpu: float32 [G, E], replicas of each expert on each GPU. GPUs lead every tensor
        # below so reductions over GPUs are elementwise across slabs (vectorized on CPU).
        se, per_gpu = carry
        cnt = jnp.sum(per_gpu, axis=0)  # [E], >= 1 for every expert (small exact integers)
        share = weight / cnt  # load of one replica of each expert
        ws = share[se]  # [G, per]
        loads = ws.sum(-1)
        top = jnp.max(loads)
        heavy = _first(loads == top)
        is_h = g_iota == heavy  # [G]
        se_h = jnp.sum(jnp.where(is_h[:, None], se, 0), axis=0)  # [per], experts on the heavy GPU
        ws_h = share[se_h]

        # Swaps (a on heavy, b on g): only the two GPUs change.
        others = jnp.where(is_h[None, :] | (g_iota[:, None] == g_iota[None, :]), -jnp.inf,
                           loads[None, :]).max(-1)  # [G], max over GPUs other than heavy and g
        d = ws_h[:, None, None] - ws[None, :, :]  # [per, G, per]
        swap = jnp.maximum(jnp.maximum(top - d, loads[None, :, None] + d), others[None, :, None])
        swap = jnp.where(is_h[None, :, None], jnp.inf, swap).reshape(-1)

        # Moves (slot a on heavy from expert A to expert B): every GPU holding A or B changes.
        c_a = cnt[se_h]  # [per]
        w_a = weight[se_h]
        grow_a = w_a / jnp.maximum(c_a - 1.0, 1.0) - ws_h  # per remaining replica of A
        shrink_b = weight / (cnt + 1.0) - share  # [E], per existing replica of B (<= 0)
        n_a = per_gpu[:, se_h] - is_h[:, None].astype(jnp.float32)  # [G, per] after removal
        # new[g, a, B] = loads[g] + n_a[g, a] grow_a[a] + per_gpu[g, B] shrink_b[B]
        #                + [g = heavy] (share of B after the move - share of A before).
        new = ((loads[:, None] + n_a * grow_a[None, :])[:, :, None]
               + (per_gpu * shrink_b[None, :])[:, None, :]
               + jnp.where(is_h, 1.0, 0.0)[:, None, None]
               * ((weight / (cnt + 1.0))[None, :] - ws_h[:, None])[None])
        move = new.max(0)  # [per, E]
        move_ok = (c_a[:, None] >= 2.0) & (se_h[:, None] != e_iota[None, :])
        move = jnp.where(move_ok, move, jnp.inf).reshape(-1)

        score = jnp.concatenate([swap, move])
        best = jnp.min(score)
        k = _first(score == best)
        found = best < top - _REFINE_MIN_GAIN * top
        is_swap = k < n_swap
        ks, km = jnp.minimum(k, n_swap - 1), jnp.maximum(k - n_swap, 0)
        a = jnp.where(is_swap, ks // (gpus * per), km // n_log)
        g, b = (ks // per) % gpus, ks % per
        new_b = km % n_log
        at_a = (is_h[:, None] & (r_iota[None, :] == a)) & found
        at_b = ((g_iota[:, None] == g) & (r_iota[None, :] == b)) & found & is_swap
        exp_a = jnp.sum(jnp.where(at_a, se, 0))
        exp_b = jnp.sum(jnp.where(at_b, se, 0))
        into_a = jnp.where(is_swap, exp_b, new_b)
        se = jnp.where(at_a, into_a, jnp.where(at_b, exp_a, se))
        # The count table changes at (exp_a, heavy), (into_a, heavy) and, for a swap, at
        # (exp_b, g), (exp_a, g); every term is zero when nothing was applied.
        f_a = found.astype(jnp.float32)
        f_b = (found & is_swap).astype(jnp.float32)
        on_h = jnp.where(is_h, 1.0, 0.0)[:, None]
        on_g = jnp.where(g_iota == g, 1.0, 0.0)[:, None]
        oh = lambda e: jnp.where(e_iota == e, 1.0, 0.0)[None, :]  # noqa: E731
        per_gpu = (per_gpu + f_a * (oh(into_a) - oh(exp_a)) * on_h
                   + f_b * (oh(exp_a) - oh(exp_b)) * on_g)
        return se, per_gpu

    per_gpu = jnp.sum(slot_expert[:, :, None] == e_iota, axis=1).astype(jnp.float32)
    return lax.fori_loop(0, steps, body, (slot_expert, per_gpu))[0]


def _solve_layer(weight: jax.Array, num_replicas: int, num_groups: int, num_nodes: int,
                 num_gpus: int, refine_steps: int, max_replicas: int) -> EplbResult:
    """The hierarchical solver for one layer; ``weight`` float32 [E]."""
    num_experts = weight.shape[0]
    group_size = num_experts // num_groups
    groups_per_node = num_groups // num_nodes
    log_per_node = num_experts // num_nodes
    phy_per_node = num_replicas // num_nodes
    gpus_per_node = num_gpus // num_nodes
    phy_per_gpu = num_replicas // num_gpus

    # Step 1: groups to nodes. "mlog" numbers experts node by node (node-major logical order).
    tokens_per_group = weight.reshape(num_groups, group_size).sum(-1)
    group_pack, group_rank = _balanced_packing(tokens_per_group, num_nodes)
    log2mlog = (((group_pack * groups_per_node + group_rank) * group_size)[:, None]
                + jnp.arange(group_size, dtype=jnp.int32)[None, :]).reshape(-1)
    mlog2log = _inverse(log2mlog)

    # Step 2: replicas inside each node.
    tokens_per_mlog = weight[mlog2log].reshape(num_nodes, log_per_node)
    phy2mlog, phyrank, mlogcnt = jax.vmap(_replicate_experts, in_axes=(0, None))(
        tokens_per_mlog, phy_per_node)

    # Step 3: replicas to the node's GPUs.
    tokens_per_phy = jnp.take_along_axis(tokens_per_mlog / mlogcnt.astype(jnp.float32), phy2mlog,
                                         axis=-1)
    pack, rank = jax.vmap(_balanced_packing, in_axes=(0, None))(tokens_per_phy, gpus_per_node)
    pphy2phy = jax.vmap(_inverse)(pack * phy_per_gpu + rank)
    pphy2mlog = jnp.take_along_axis(phy2mlog, pphy2phy, axis=-1)  # node-local expert ids
    if refine_steps > 0 and gpus_per_node > 1:
        slots = pphy2mlog.reshape(num_nodes, gpus_per_node, phy_per_gpu)
        slots = jax.vmap(_refine, in_axes=(0, 0, None))(tokens_per_mlog, slots, refine_steps)
        pphy2mlog = slots.reshape(num_nodes, phy_per_node)
        # Moves change replica counts: replica ranks become the order of the slots.
        onehot = (pphy2mlog[:, :, None] == jnp.arange(log_per_node, dtype=jnp.int32)).astype(
            jnp.int32)
        mlogcnt = onehot.sum(1)
        pphyrank = (jnp.sum(jnp.cumsum(onehot, axis=1) * onehot, axis=-1) - 1).reshape(-1)
    else:
        pphyrank = jnp.take_along_axis(phyrank, pphy2phy, axis=-1).reshape(-1)

    pphy2mlog = pphy2mlog + (jnp.arange(num_nodes, dtype=jnp.int32) * log_per_node)[:, None]
    phy2log = mlog2log[pphy2mlog.reshape(-1)]
    logcnt = mlogcnt.reshape(-1)[log2mlog]

    log2phy = jnp.full((num_experts * max_replicas,), -1, jnp.int32)
    log2phy = log2phy.at[phy2log * max_replicas + pphyrank].set(
        jnp.arange(num_replicas, dtype=jnp.int32))
    return EplbResult(phy2log, log2phy.reshape(num_experts, max_replicas), logcnt)


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4, 5, 6))
def _solve(weight: jax.Array, num_replicas: int, num_groups: int, num_nodes: int, num_gpus: int,
           refine_steps: int, max_replicas: int) -> EplbResult:
    return jax.vmap(_solve_layer, in_axes=(0,) + (None,) * 6)(
        weight, num_replicas, num_groups, num_nodes, num_gpus, refine_steps, max_replicas)


def _check_int(name: str, value: object, *, minimum: int = 1) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{_OP}: {name} must be a Python int (static), got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{_OP}: {name} must be >= {minimum}, got {value}")
    return int(value)


def max_replicas_bound(num_experts: int, num_replicas: int, num_groups: int,
                       num_nodes: int) -> int:
    """Largest replica count one expert can get, i.e. the smallest valid ``max_replicas``.

    In hierarchical mode an expert only competes inside its node, so the bound is
    ``(R - E) / num_nodes + 1``; in global mode it is ``R - E + 1``.
    """
    nodes = num_nodes if num_groups % num_nodes == 0 else 1
    return (num_replicas - num_experts) // nodes + 1


def rebalance_experts(weight: jax.Array, num_replicas: int, num_groups: int, num_nodes: int,
                      num_gpus: int, *, max_replicas: int | None = None,
                      refine_steps: int = 0) -> EplbResult:
    """Places ``num_replicas`` expert replicas on GPUs so that GPU loads are balanced.

    Same algorithm and outputs as DeepSeek's ``eplb.rebalance_experts`` (see the module
    docstring), except that ``log2phy`` has a static last dimension ``X``. Jit-compatible:
    ``weight`` may be traced, the integers are static.

    Args:
        weight: [L, E] float or integer array, the load (e.g. token count) of every logical
            expert in every layer; computed in float32 like the reference. NaN loads give an
            unspecified (but valid-shaped) placement.
        num_replicas: R, number of physical expert slots; a multiple of ``num_gpus``, >= E.
        num_groups: number of expert groups (E % num_groups == 0). Hierarchical placement is used
            when ``num_groups % num_nodes == 0``, the global policy otherwise.
        num_nodes: number of nodes; ``num_gpus % num_nodes == 0``.
        num_gpus: number of GPUs; slot ``s`` lives on GPU ``s // (R / num_gpus)``.
        max_replicas: X, the padded last dimension of ``log2phy``. Default ``R - E + 1``; it
            must be at least :func:`max_replicas_bound` so no replica is ever left out.
        refine_steps: local-search steps per node after the greedy (0 = exactly the reference);
            they may change ``logcnt``, and replica ranks then follow slot order.

    Returns:
        ``EplbResult(phy2log int32 [L, R], log2phy int32 [L, E, X], logcnt int32 [L, E])``;
        ``log2phy[l, e, j]`` is the slot of the j-th replica of expert e, -1 past ``logcnt``.

    Raises:
        TypeError / ValueError: wrong array rank or dtype, non-int or inconsistent sizes.
    """
    checks.check_rank("weight", weight, op=_OP, exact=2, layout="[layers, experts]")
    dt = np.dtype(weight.dtype)
    if not (np.issubdtype(dt, np.floating) or np.issubdtype(dt, np.integer)
            or dt == jnp.bfloat16):
        raise TypeError(f"{_OP}: weight must have a float or integer dtype, got {dt.name}")
    num_experts = int(weight.shape[1])
    num_replicas = _check_int("num_replicas", num_replicas)
    num_groups = _check_int("num_groups", num_groups)
    num_nodes = _check_int("num_nodes", num_nodes)
    num_gpus = _check_int("num_gpus", num_gpus)
    refine_steps = _check_int("refine_steps", refine_steps, minimum=0)
    if num_experts == 0:
        raise ValueError(f"{_OP}: weight must have at least one expert, got shape "
                         f"{tuple(weight.shape)}")
    if num_experts % num_groups:
        raise ValueError(f"{_OP}: the number of experts ({num_experts}) must be a multiple of "
                         f"num_groups, got num_groups={num_groups}")
    if num_gpus % num_nodes:
        raise ValueError(f"{_OP}: num_gpus must be a multiple of num_nodes={num_nodes}, "
                         f"got num_gpus={num_gpus}")
    if num_replicas % num_gpus:
        raise ValueError(f"{_OP}: num_replicas must be a multiple of num_gpus={num_gpus}, "
                         f"got num_replicas={num_replicas}")
    if num_replicas < num_experts:
        raise ValueError(f"{_OP}: num_replicas must be >= the number of experts ({num_experts}), "
                         f"got num_replicas={num_replicas}")
    if num_groups % num_nodes == 0:
        groups, nodes = num_groups, num_nodes
        if num_experts % num_nodes or num_replicas % num_nodes:  # implied, kept for clarity
            raise ValueError(f"{_OP}: experts and replicas must split evenly over "
                             f"num_nodes={num_nodes}")
    else:
        groups, nodes = 1, 1
    bound = max_replicas_bound(num_experts, num_replicas, num_groups, num_nodes)
    if max_replicas is None:
        max_replicas = num_replicas - num_experts + 1
    max_replicas = _check_int("max_replicas", max_replicas)
    if max_replicas < bound:
        raise ValueError(f"{_OP}: max_replicas must be >= {bound} (the most replicas one expert "
                         f"can get here), got {max_replicas}")
    # Cast before the jit boundary: one compilation serves every input dtype.
    weight = jnp.asarray(weight).astype(jnp.float32)
    return _solve(weight, num_replicas, groups, nodes, num_gpus, refine_steps, max_replicas)
