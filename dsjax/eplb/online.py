"""Online EPLB pieces: load tracking, replica routing, expert-weight relayout, balance statistics.

These surround :func:`dsjax.eplb.rebalance_experts` in a training or serving loop, as in
DeepSeek-V3's deployment (https://github.com/deepseek-ai/EPLB, DeepSeek-V3 report §3.4): count how
many tokens every expert receives over a sliding window, periodically re-solve the placement,
move the expert weights to their new slots, and route each token to one replica of its expert.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from dsjax._src import checks


def _check_int_dtype(name: str, x: Any, *, op: str) -> None:
    checks.check_array(name, x, op=op)
    if not np.issubdtype(np.dtype(x.dtype), np.integer):
        raise TypeError(f"{op}: {name} must have an integer dtype, got {np.dtype(x.dtype).name}")


def count_experts(topk_idx: jax.Array, num_experts: int) -> jax.Array:
    """Tokens routed to each expert.

    Args:
        topk_idx: integer [..., K], logical expert ids; negative ids (padding, dropped tokens) and
            ids >= num_experts are not counted.
        num_experts: E.

    Returns:
        float32 [E] counts (the dtype the solver consumes; exact up to 2**24 tokens per expert).
    """
    flat = topk_idx.reshape(-1)
    valid = (flat >= 0) & (flat < num_experts)
    safe = jnp.where(valid, flat, num_experts)
    return jnp.zeros((num_experts,), jnp.float32).at[safe].add(
        valid.astype(jnp.float32), mode="drop")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ExpertLoadTracker:
    """Per-layer expert token counts over a sliding window of steps; an immutable pytree.

    The window is a ring buffer of ``W`` step slots. :meth:`add` counts into the current slot,
    :meth:`advance` closes the step (the oldest slot is cleared and becomes current), and
    :meth:`load` sums the window: the current step plus the ``W - 1`` steps before it. All methods
    are jit-compatible (``layer`` and the counts may be traced). It is state, not a parameter: in
    Flax NNX keep it in an ``nnx.Variable`` subclass such as :class:`ExpertLoad` so optimizers do
    not touch it.

    Attributes:
        counts: float32 [W, L, E], per-step counts.
        cursor: int32 [], index of the current slot.
        steps: int32 [], number of completed steps (the window is full once steps >= W - 1).
    """

    counts: jax.Array
    cursor: jax.Array
    steps: jax.Array

    @classmethod
    def create(cls, num_layers: int, num_experts: int, *, window: int = 1) -> "ExpertLoadTracker":
        """Empty tracker: ``num_layers`` x ``num_experts`` counts over ``window`` steps."""
        for name, v in (("num_layers", num_layers), ("num_experts", num_experts),
                        ("window", window)):
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
                raise ValueError(f"ExpertLoadTracker.create: {name} must be an int >= 1, got {v!r}")
        return cls(jnp.zeros((window, num_layers, num_experts), jnp.float32),
                   jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32))

    @property
    def window(self) -> int:
        return self.counts.shape[0]

    @property
    def num_layers(self) -> int:
        return self.counts.shape[1]

    @property
    def num_experts(self) -> int:
        return self.counts.shape[2]

    def add(self, topk_idx: jax.Array, *, layer: int | jax.Array | None = None
            ) -> "ExpertLoadTracker":
        """Counts routed tokens into the current step.

        Args:
            topk_idx: integer expert ids; [L, ..., K] for all layers when ``layer`` is None, else
                [..., K] for that one layer. Negative ids are ignored.
            layer: layer index (int or traced int32 scalar, e.g. inside ``lax.scan``) or None.
        """
        op = "ExpertLoadTracker.add"
        _check_int_dtype("topk_idx", topk_idx, op=op)
        if layer is None:
            if topk_idx.ndim < 1 or topk_idx.shape[0] != self.num_layers:
                raise ValueError(f"{op}: topk_idx must have shape [{self.num_layers}, ...] (layers "
                                 f"first) when layer is None, got {tuple(topk_idx.shape)}")
            per_layer = jax.vmap(lambda t: count_experts(t, self.num_experts))(topk_idx)
            slot = self.counts[self.cursor] + per_layer
        else:
            if isinstance(layer, (int, np.integer)) and not 0 <= layer < self.num_layers:
                raise ValueError(f"{op}: layer must be in [0, {self.num_layers}), got {layer}")
            slot = self.counts[self.cursor]
            slot = slot.at[layer].add(count_experts(topk_idx, self.num_experts))
        return dataclasses.replace(self, counts=self.counts.at[self.cursor].set(slot))

    def add_counts(self, counts: jax.Array) -> "ExpertLoadTracker":
        """Adds precomputed float32-convertible counts [L, E] to the current step."""
        checks.check_shape("counts", counts, (self.num_layers, self.num_experts),
                           op="ExpertLoadTracker.add_counts", layout="[layers, experts]")
        return dataclasses.replace(
            self, counts=self.counts.at[self.cursor].add(counts.astype(jnp.float32)))

    def advance(self) -> "ExpertLoadTracker":
        """Closes the current step; the oldest slot is cleared and becomes the current one."""
        nxt = (self.cursor + 1) % self.window
        return ExpertLoadTracker(self.counts.at[nxt].set(0.0), nxt.astype(jnp.int32),
                                 self.steps + 1)

    def load(self) -> jax.Array:
        """float32 [L, E]: tokens per expert over the window (input of ``rebalance_experts``)."""
        return self.counts.sum(axis=0)


try:  # Flax is a runtime dependency, but keep this module importable without it.
    from flax import nnx

    class ExpertLoad(nnx.Variable):
        """NNX variable type for an :class:`ExpertLoadTracker` (state, not a parameter)."""

except ImportError:  # pragma: no cover
    ExpertLoad = None  # type: ignore[assignment,misc]


def replica_route(topk_idx: jax.Array, log2phy: jax.Array, logcnt: jax.Array, *,
                  salt: int | jax.Array = 0) -> jax.Array:
    """Maps logical expert ids to physical replica slots, spreading tokens over replicas.

    The ``n``-th occurrence (in row-major order of ``topk_idx``) of expert ``e`` goes to replica
    ``(n + salt + e) % logcnt[e]``: the replicas of ``e`` receive ``floor`` or ``ceil`` of
    ``count_e / logcnt[e]`` tokens each, exactly, and the same inputs always give the same
    routing. ``salt`` (e.g. the step or ``lax.axis_index``) rotates which replicas take the
    remainder; adding ``e`` keeps experts from all sending their remainder to replica 0.

    Args:
        topk_idx: integer [..., K], logical expert ids of one layer; negative ids (padding) map
            to -1.
        log2phy: int32 [E, X], as returned by ``rebalance_experts`` for that layer.
        logcnt: int32 [E], replicas per expert (>= 1 for every expert that appears).
        salt: int or traced integer scalar.

    Returns:
        int32, shape of ``topk_idx``: physical slot ids, -1 where the id was negative.
    """
    op = "replica_route"
    _check_int_dtype("topk_idx", topk_idx, op=op)
    checks.check_rank("log2phy", log2phy, op=op, exact=2, layout="[experts, max_replicas]")
    _check_int_dtype("log2phy", log2phy, op=op)
    checks.check_shape("logcnt", logcnt, (log2phy.shape[0],), op=op, layout="[experts]")
    _check_int_dtype("logcnt", logcnt, op=op)
    num_experts = log2phy.shape[0]
    flat = topk_idx.reshape(-1).astype(jnp.int32)
    n = flat.shape[0]
    if n == 0:
        return jnp.zeros(topk_idx.shape, jnp.int32)
    valid = flat >= 0
    key = jnp.where(valid, flat, num_experts)  # invalid ids sort last
    order = jnp.argsort(key, stable=True)
    sorted_key = key[order]
    # Occurrence number of each entry among entries of the same expert.
    starts = jnp.searchsorted(sorted_key, sorted_key, side="left")
    occ_sorted = jnp.arange(n, dtype=jnp.int32) - starts.astype(jnp.int32)
    occ = jnp.zeros((n,), jnp.int32).at[order].set(occ_sorted)
    e = jnp.clip(flat, 0, num_experts - 1)
    cnt = jnp.maximum(logcnt.astype(jnp.int32)[e], 1)
    j = (occ + jnp.asarray(salt, jnp.int32) + e) % cnt
    phy = log2phy.astype(jnp.int32)[e, j]
    return jnp.where(valid, phy, -1).reshape(topk_idx.shape)


def _relayout_sources(old_phy2log: jax.Array, new_phy2log: jax.Array, per_shard: int
                      ) -> tuple[jax.Array, jax.Array]:
    """Old slot to copy for every new slot: on the same shard if one holds the expert, else the
    lowest old slot holding it. Returns (src int32 [R], found bool [R])."""
    num = old_phy2log.shape[0]
    match = new_phy2log[:, None] == old_phy2log[None, :]
    shard = jnp.arange(num, dtype=jnp.int32) // per_shard
    local = match & (shard[:, None] == shard[None, :])
    src = jnp.where(jnp.any(local, axis=1), jnp.argmax(local, axis=1), jnp.argmax(match, axis=1))
    return src.astype(jnp.int32), jnp.any(match, axis=1)


def _slots_per_shard(leaves: list, num: int, axis_name: str, *, op: str, what: str) -> int:
    """R / D slots per device under ``shard_map`` over ``axis_name`` (size D); checks that every
    leaf has that leading axis."""
    shards = lax.axis_size(axis_name)
    if num % shards:
        raise ValueError(f"{op}: the {num} slots must split evenly over axis {axis_name!r} of "
                         f"size {shards}")
    per = num // shards
    for x in leaves:
        if x.ndim < 1 or x.shape[0] != per:
            raise ValueError(f"{op}: under shard_map every {what} must have leading axis {per} "
                             f"(= {num} slots / {shards} shards), got shape {tuple(x.shape)}")
    return per


def relayout_expert_weights(weights: Any, old_phy2log: jax.Array, new_phy2log: jax.Array, *,
                            axis_name: str | None = None) -> Any:
    """Expert weights in the new physical order.

    New slot ``s`` gets a copy of an old slot holding expert ``new_phy2log[s]`` (replicas of an
    expert are identical copies, so any one will do; the one on the same shard is preferred).

    Without ``axis_name`` it is a gather over the slot axis (XLA shards it as needed). With
    ``axis_name``, call it inside ``shard_map`` with the slot axis sharded over that mesh axis of
    size D: each device holds R/D slots and the weights move by D - 1 collective permutes (ring
    shifts) of one shard-sized buffer each, so no device ever holds more than three shards.

    Args:
        weights: a pytree of arrays whose leading axis is the slot axis: [R, ...] globally, or
            [R / D, ...] per device under ``shard_map``.
        old_phy2log: int32 [R], the logical expert of every slot of ``weights`` (replicated).
        new_phy2log: int32 [R], the target placement (replicated). Every expert it names must
            appear in ``old_phy2log`` (true for any two ``rebalance_experts`` outputs); this is
            checked when the maps are concrete, and slots without a source get zeros otherwise.
        axis_name: mesh axis the slots are sharded over, or None.

    Returns:
        A pytree like ``weights`` in the new order.
    """
    op = "relayout_expert_weights"
    checks.check_rank("old_phy2log", old_phy2log, op=op, exact=1, layout="[replicas]")
    checks.check_shape("new_phy2log", new_phy2log, tuple(old_phy2log.shape), op=op,
                       layout="[replicas]")
    _check_int_dtype("old_phy2log", old_phy2log, op=op)
    _check_int_dtype("new_phy2log", new_phy2log, op=op)
    num = old_phy2log.shape[0]
    if not isinstance(old_phy2log, jax.core.Tracer) and not isinstance(new_phy2log,
                                                                        jax.core.Tracer):
        missing = np.setdiff1d(np.asarray(new_phy2log), np.asarray(old_phy2log))
        if missing.size:
            raise ValueError(f"{op}: every expert of new_phy2log must appear in old_phy2log, "
                             f"missing {missing.tolist()}")
    leaves = jax.tree_util.tree_leaves(weights)
    if not leaves:
        return weights
    old = old_phy2log.astype(jnp.int32)
    new = new_phy2log.astype(jnp.int32)

    if axis_name is None:
        for x in leaves:
            if x.ndim < 1 or x.shape[0] != num:
                raise ValueError(f"{op}: every weight must have leading axis {num} (slots), "
                                 f"got shape {tuple(x.shape)}")
        src, found = _relayout_sources(old, new, num)

        def gather(x: jax.Array) -> jax.Array:
            mask = found.reshape((num,) + (1,) * (x.ndim - 1))
            return jnp.where(mask, x[src], jnp.zeros((), x.dtype))

        return jax.tree_util.tree_map(gather, weights)

    num_shards = lax.axis_size(axis_name)
    per = _slots_per_shard(leaves, num, axis_name, op=op, what="weight")
    src, found = _relayout_sources(old, new, per)
    src_shard = jnp.where(found, src // per, -1)
    me = lax.axis_index(axis_name)

    def move(x: jax.Array) -> jax.Array:
        out = jnp.zeros_like(x)
        bshape = (per,) + (1,) * (x.ndim - 1)
        for k in range(num_shards):
            # Shift k: this device sends to (me + k) the rows that device's new slots take from
            # here, at those slots' positions; it receives from (me - k) in the same way.
            dst = (me + k) % num_shards
            dst_slots = dst * per + jnp.arange(per, dtype=jnp.int32)
            mine = src_shard[dst_slots] == me
            rows = x[jnp.where(mine, src[dst_slots] - me * per, 0)]
            send = jnp.where(mine.reshape(bshape), rows, jnp.zeros((), x.dtype))
            if k == 0:
                recv = send
            else:
                perm = [(i, (i + k) % num_shards) for i in range(num_shards)]
                recv = lax.ppermute(send, axis_name, perm)
            from_src = src_shard[me * per + jnp.arange(per, dtype=jnp.int32)] == (
                (me - k) % num_shards)
            out = jnp.where(from_src.reshape(bshape), recv, out)
        return out

    return jax.tree_util.tree_map(move, weights)


def round_robin_placement(num_experts: int, num_replicas: int
                          ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """A load-agnostic starting placement of one layer: slot ``s`` holds expert ``s % E``.

    Experts ``0 .. R - E - 1`` get a second replica (more when ``R >= 2E``); with slots split
    evenly over ranks, replicas of one expert land on different ranks whenever ``E`` is at least
    the slots per rank. ``log2phy`` is padded to ``R - E + 1`` columns, the width
    :func:`~dsjax.eplb.rebalance_experts` returns by default, so later placements have the same
    shapes.

    Args:
        num_experts: E >= 1.
        num_replicas: R >= E, the number of physical slots.

    Returns:
        ``(phy2log int32 [R], log2phy int32 [E, R - E + 1] padded with -1, logcnt int32 [E])``.
    """
    for name, v in (("num_experts", num_experts), ("num_replicas", num_replicas)):
        if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
            raise ValueError(f"round_robin_placement: {name} must be an int >= 1, got {v!r}")
    if num_replicas < num_experts:
        raise ValueError(f"round_robin_placement: num_replicas must be >= num_experts "
                         f"({num_experts}), got {num_replicas}")
    phy2log = np.arange(num_replicas) % num_experts
    logcnt = np.bincount(phy2log, minlength=num_experts)
    log2phy = np.full((num_experts, num_replicas - num_experts + 1), -1, np.int32)
    for e in range(num_experts):
        slots = np.flatnonzero(phy2log == e)
        log2phy[e, :slots.size] = slots
    return (jnp.asarray(phy2log, jnp.int32), jnp.asarray(log2phy), jnp.asarray(logcnt, jnp.int32))


def tie_replica_grads(grads: Any, phy2log: jax.Array, *, axis_name: str | None = None,
                      num_experts: int | None = None) -> Any:
    """Gradients that keep the replicas of every logical expert identical.

    A logical expert stored in several physical slots is one parameter used several times, so
    its gradient is the sum of its replicas' gradients; every replica gets that sum. Replicas that
    start equal and get equal gradients stay equal under any elementwise-deterministic optimizer
    (AdamW), and each replica follows exactly the update the un-replicated expert would get (up
    to float32 summation order). Jit-compatible (``phy2log`` may be traced).

    Without ``axis_name`` it is a segment sum over the whole slot axis: under ``jit`` with the
    slots sharded, XLA reduces the full ``[R, ...]`` gradient across the shards. With
    ``axis_name`` (the sharded form), call it inside ``shard_map`` with the slot axis split over
    that mesh axis of size D: only the slots whose expert has several replicas take part, at most
    ``K = min(R, 2·(R - E))`` of them (each replicated expert has ``c >= 2`` slots and
    ``c <= 2·(c - 1)``; the ``c - 1`` sum to ``R - E``). Each device writes its involved rows
    into a float32 ``[K, ...]`` buffer at their rank among the involved slots, one ``psum`` over
    ``axis_name`` assembles it (every row is non-zero on exactly one device, so the psum is exact
    whatever its reduction order), and each involved slot takes the sum of its expert's rows,
    summed in slot order: bit-identical to the global form on unsharded gradients (XLA's
    partitioning of the global form on sharded ones sums per-shard partials first, which can
    differ in float32 rounding for experts with 3+ replicas). Singleton slots are returned as
    they came (no float32 round trip), and nothing moves when ``R == E``.

    Args:
        grads: a pytree of arrays whose leading axis is the slot axis, ``[R, ...]`` each, or
            ``[R / D, ...]`` per device under ``shard_map`` with ``axis_name``.
        phy2log: int32 ``[R]``, the logical expert of every slot (replicated, global).
        axis_name: mesh axis the slots are sharded over, or None for the global form.
        num_experts: E, required with ``axis_name`` (it sizes the static buffer). Every expert
            ``0 .. E-1`` must hold at least one slot (true of every placement
            :func:`~dsjax.eplb.rebalance_experts` and :func:`round_robin_placement` return).
            Under ``shard_map`` the placement is traced, so this cannot raise: a placement that
            breaks it with more than K replicated slots gets NaN in all of them (float
            gradients), never a silently wrong gradient.

    Returns:
        A pytree like ``grads``: slot ``s`` holds ``Σ_{s': phy2log[s'] = phy2log[s]} grads[s']``.
    """
    op = "tie_replica_grads"
    checks.check_rank("phy2log", phy2log, op=op, exact=1, layout="[replicas]")
    _check_int_dtype("phy2log", phy2log, op=op)
    num = phy2log.shape[0]
    ids = phy2log.astype(jnp.int32)
    if axis_name is not None:
        return _tie_sharded(grads, ids, axis_name, num_experts, op=op)
    for x in jax.tree_util.tree_leaves(grads):
        if x.ndim < 1 or x.shape[0] != num:
            raise ValueError(f"{op}: every gradient must have leading axis {num} (slots), got "
                             f"shape {tuple(x.shape)}")

    def tie(g: jax.Array) -> jax.Array:
        # Logical ids are < R, so R segments always suffice without knowing E.
        total = jax.ops.segment_sum(g.astype(jnp.float32), ids, num_segments=num)
        return total[ids].astype(g.dtype)

    return jax.tree_util.tree_map(tie, grads)


def replicated_slot_bound(num_slots: int, num_experts: int) -> int:
    """K = min(R, 2·(R - E)): the most slots whose expert has more than one replica, over all
    placements of E experts (each holding at least one slot) on R slots."""
    return min(num_slots, 2 * (num_slots - num_experts))


def _tie_sharded(grads: Any, ids: jax.Array, axis_name: str, num_experts: int | None, *,
                 op: str) -> Any:
    """:func:`tie_replica_grads` with ``axis_name``: see there."""
    num = ids.shape[0]
    if (not isinstance(num_experts, (int, np.integer)) or isinstance(num_experts, bool)
            or not 1 <= num_experts <= num):
        raise ValueError(f"{op}: num_experts must be an int in [1, {num}] (the logical experts "
                         f"of the {num} slots) with axis_name, got {num_experts!r}")
    leaves = jax.tree_util.tree_leaves(grads)
    per = _slots_per_shard(leaves, num, axis_name, op=op, what="gradient")
    k = replicated_slot_bound(num, int(num_experts))
    if k == 0 or not leaves:  # one slot per expert: nothing to tie
        return grads
    copies = jnp.zeros((num,), jnp.int32).at[ids].add(1, mode="drop")[ids]
    involved = copies > 1                                               # [R]
    row = jnp.cumsum(involved.astype(jnp.int32)) - 1                    # buffer row of each slot
    overflow = row[-1] >= k         # only for a placement without some expert: see the docstring
    fits = involved & ~overflow
    # Expert of every buffer row (-1: unused), and the first row of the same expert: the
    # segment its sum goes to. Rows are in slot order, so each expert sums in slot order.
    row_expert = jnp.full((k,), -1, jnp.int32).at[jnp.where(fits, row, k)].set(ids, mode="drop")
    first = jnp.argmax(row_expert[:, None] == row_expert[None, :], axis=1).astype(jnp.int32)
    local = lax.axis_index(axis_name) * per + jnp.arange(per, dtype=jnp.int32)
    mine, lost = fits[local], involved[local] & overflow
    dest = jnp.where(mine, row[local], k)                               # k: not written
    take = first[jnp.clip(row[local], 0, k - 1)]

    def tie(g: jax.Array) -> jax.Array:
        buf = jnp.zeros((k,) + g.shape[1:], jnp.float32).at[dest].set(
            g.astype(jnp.float32), mode="drop")
        buf = lax.psum(buf, axis_name)
        total = jax.ops.segment_sum(buf, first, num_segments=k)
        bshape = (per,) + (1,) * (g.ndim - 1)
        out = jnp.where(mine.reshape(bshape), total[take].astype(g.dtype), g)
        if jnp.issubdtype(g.dtype, jnp.inexact):
            out = jnp.where(lost.reshape(bshape), jnp.asarray(jnp.nan, g.dtype), out)
        return out

    return jax.tree_util.tree_map(tie, grads)


class BalanceStats(NamedTuple):
    """Per-layer GPU load statistics (float32 [L] each).

    Attributes:
        max_load: load of the most loaded GPU.
        mean_load: total load / num_gpus.
        imbalance: max_load / mean_load (1 is perfect; 1 when a layer has no load at all).
    """

    max_load: jax.Array
    mean_load: jax.Array
    imbalance: jax.Array


def _check_placement(weight: jax.Array, phy2log: jax.Array | None, num_gpus: int, *, op: str
                     ) -> tuple[jax.Array, jax.Array]:
    """Validated float32 weight [L, E] and int32 phy2log [L, R] (the identity when None)."""
    checks.check_rank("weight", weight, op=op, exact=2, layout="[layers, experts]")
    num_layers, num_experts = weight.shape
    w = jnp.asarray(weight).astype(jnp.float32)
    if phy2log is None:
        phy2log = jnp.broadcast_to(jnp.arange(num_experts, dtype=jnp.int32),
                                   (num_layers, num_experts))
    checks.check_rank("phy2log", phy2log, op=op, exact=2, layout="[layers, replicas]")
    _check_int_dtype("phy2log", phy2log, op=op)
    if phy2log.shape[0] != num_layers:
        raise ValueError(f"{op}: phy2log must have {num_layers} layers like weight, got shape "
                         f"{tuple(phy2log.shape)}")
    if not isinstance(num_gpus, (int, np.integer)) or isinstance(num_gpus, bool) or num_gpus < 1:
        raise ValueError(f"{op}: num_gpus must be an int >= 1, got {num_gpus!r}")
    num_slots = phy2log.shape[1]
    if num_slots % num_gpus:
        raise ValueError(f"{op}: the {num_slots} slots must be a multiple of num_gpus, "
                         f"got num_gpus={num_gpus}")
    return w, jnp.asarray(phy2log).astype(jnp.int32)


def rank_loads(weight: jax.Array, phy2log: jax.Array | None, num_gpus: int) -> jax.Array:
    """Load of every GPU (EP rank) under a placement: the one definition the statistics, the
    rebalancing reports and the training loop share.

    A replica carries ``weight[e] / (number of slots holding e)``; GPU ``g`` holds slots
    ``[g * R / G, (g + 1) * R / G)``.

    Args:
        weight: [L, E] float or integer loads.
        phy2log: int32 [L, R] placement, or None for the identity placement (expert ``e`` on
            GPU ``e // (E / G)``, one replica each, i.e. no EPLB).
        num_gpus: G; must divide R (or E for the identity placement).

    Returns:
        float32 [L, G]; each row sums to the layer's total load (up to float32 rounding).
    """
    w, phy = _check_placement(weight, phy2log, num_gpus, op="rank_loads")
    return _rank_loads(w, phy, num_gpus)


@functools.partial(jax.jit, static_argnums=2)
def _rank_loads(w: jax.Array, phy2log: jax.Array, num_gpus: int) -> jax.Array:
    num_layers, num_experts = w.shape
    cnt = jax.vmap(lambda p: jnp.zeros((num_experts,), jnp.float32).at[p].add(1.0))(phy2log)
    per_slot = jnp.take_along_axis(w / jnp.maximum(cnt, 1.0), phy2log, axis=1)
    return per_slot.reshape(num_layers, num_gpus, -1).sum(-1)


def balance_stats(weight: jax.Array, phy2log: jax.Array | None, num_gpus: int) -> BalanceStats:
    """GPU load statistics of a placement: ``weight``, ``phy2log`` and ``num_gpus`` as in
    :func:`rank_loads`, whose GPU loads these summarize.

    Returns:
        :class:`BalanceStats` with float32 [L] fields.
    """
    w, phy = _check_placement(weight, phy2log, num_gpus, op="balance_stats")
    return _balance_stats(w, phy, num_gpus)


@functools.partial(jax.jit, static_argnums=2)
def _balance_stats(w: jax.Array, phy2log: jax.Array, num_gpus: int) -> BalanceStats:
    max_load = _rank_loads(w, phy2log, num_gpus).max(-1)
    mean_load = w.sum(-1) / num_gpus
    imbalance = jnp.where(mean_load > 0, max_load / jnp.where(mean_load > 0, mean_load, 1.0), 1.0)
    return BalanceStats(max_load, mean_load, imbalance)
