"""The communication plan of a normal dispatch (the ``handle``) and the two directions of movement.

A dispatch is one or two hops; each hop packs rows into per-destination send buffers of static
capacity (one copy per destination, packed at the front of each destination's block), exchanges
them over a mesh axis, and the last hop's receive buffer is compacted into ``num_worst_tokens``
rows. The exchange is either XLA's ``all_to_all`` of the whole static buffers (padding travels) or
``ragged_all_to_all`` with the exact per-destination row counts (``transport="ragged"``: only rows
that hold a token travel, into the same static receive buffers, so both give identical arrays). The handle records, per
hop, where each row went (``send_src``) and where each copy sits (``reduce_idx``), so that

* :func:`move_forward` (dispatch direction) copies rows source -> receiver, and
* :func:`move_backward` (combine direction) returns rows receiver -> source, summing the copies of
  each row (inside the destination node first in the two-hop path),

and each is the exact transpose of the other (so each is the other's backward pass).
:func:`move_backward_weighted` is combine's 3-D form: per-slot expert outputs are reduced with the
top-k weights while being packed for the way back (one fused gather-reduce), then returned.
"""

from __future__ import annotations

import dataclasses
from types import ModuleType
from typing import Any

import jax
import jax.numpy as jnp

from dsjax._src.dispatch import current_platform
from dsjax.deep_ep import reference

I32 = jnp.int32
F32 = jnp.float32
AxisName = Any  # a mesh axis name or a tuple of them
TRANSPORTS = ("all_to_all", "ragged")
# XLA backends without a ragged-all-to-all thunk (XLA:CPU fails with UNIMPLEMENTED at run time).
RAGGED_UNSUPPORTED = ("cpu",)

# The call site of the ragged primitive, a module attribute so that tests on CPU can put a pure-JAX
# emulation of its documented semantics in its place.
ragged_all_to_all = jax.lax.ragged_all_to_all


def check_ragged_backend(op: str) -> None:
    """Raises ValueError (naming ``transport``) when the platform computations run on (the default
    device's, else the default backend) cannot run ragged_all_to_all."""
    backend = current_platform()  # honours jax.default_device, as `implementation` does
    if backend in RAGGED_UNSUPPORTED:
        raise ValueError(
            f"{op}: transport='ragged' needs an XLA backend that implements ragged_all_to_all "
            f"(GPU or TPU); the default backend is {backend!r}, where it is UNIMPLEMENTED. "
            "Use transport='all_to_all' (static capacity) there")


def kernels(impl: str) -> ModuleType:
    """The module of local kernels for an implementation ('reference' or an FFI one)."""
    if impl == "reference":
        return reference
    from dsjax.deep_ep import _ffi
    return _ffi


@dataclasses.dataclass(frozen=True)
class Hop:
    """One exchange: ``axis`` of ``num_dests`` ranks, ``capacity`` send rows per destination.

    ``transport`` is ``"all_to_all"`` (static buffers on the wire) or ``"ragged"`` (exact rows).
    """

    axis: AxisName
    num_dests: int
    capacity: int
    transport: str = "all_to_all"


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Handle:
    """What combine (and the backward passes) need from a normal dispatch; a pytree of arrays.

    Attributes:
        reduce_idx: per hop, int32 ``[rows in, D]``: flat send slot of each input row's copy to
            destination d, -1 if none (the first hop's rows are the tokens ``[T]``).
        send_src: per hop, int32 ``[D·C]``: input row of each send slot, -1 for padding.
        recv_src: int32 ``[num_worst_tokens]``: received-buffer row of each output row, -1 padding.
        recv_dst: int32 ``[D·C]`` (last hop): output row of each received row, -1 if none/dropped.
        recv_topk_idx: int32 ``[num_worst_tokens, K]``: the local expert ids dispatch returned
            (-1 = no local expert / padding row); combine's 3-D form ignores the slots that hold -1.
        send_counts: per hop, int32 ``[D]``: rows this rank sent to each destination in the
            dispatch direction (``transport="ragged"`` only; empty for ``"all_to_all"``).
        recv_counts: per hop, int32 ``[D]``: rows this rank received from each source (same).
        num_dropped: int32 ``[]``: (token, destination) copies lost to a capacity, summed over all
            ranks (the same on every rank). 0 means nothing was lost.
        num_recv_tokens: int32 ``[]``: rows of this rank's output that hold a token.
        hops: static, the exchanges in order.
        num_tokens: static, T.
    """

    reduce_idx: tuple[jax.Array, ...]
    send_src: tuple[jax.Array, ...]
    recv_src: jax.Array
    recv_dst: jax.Array
    recv_topk_idx: jax.Array
    send_counts: tuple[jax.Array, ...]
    recv_counts: tuple[jax.Array, ...]
    num_dropped: jax.Array
    num_recv_tokens: jax.Array
    hops: tuple[Hop, ...] = dataclasses.field(metadata=dict(static=True))
    num_tokens: int = dataclasses.field(metadata=dict(static=True))

    @property
    def num_worst_tokens(self) -> int:
        return self.recv_src.shape[0]


def exchange(x: jax.Array, axis: AxisName) -> jax.Array:
    """``all_to_all`` of ``[D·C, ...]`` blocks: block d goes to rank d, block s comes from rank s."""
    return jax.lax.all_to_all(x, axis, 0, 0, tiled=True)


def exchange_hop(x: jax.Array, hop: Hop, counts: tuple[jax.Array, jax.Array] | None = None,
                 fill: Any = 0) -> jax.Array:
    """Exchanges ``[D·C, ...]`` blocks over ``hop.axis``: block d goes to rank d, block s comes from s.

    Args:
        x: ``[D·C, ...]``, the rows for destination d in ``x[d·C : d·C + C]``, packed at the front.
        hop: the exchange; ``hop.transport`` picks the collective.
        counts: ragged only: ``(send [D], recv [D])`` int32, rows sent to / received from each
            rank (rows past them are padding and stay off the wire).
        fill: ragged only: the value of receive rows nobody wrote (what ``all_to_all`` would
            deliver there: the senders' padding value).

    Returns:
        ``[D·C, ...]``: block s holds what rank s sent; identical for both transports.
    """
    if hop.transport == "all_to_all":
        return exchange(x, hop.axis)
    send, recv = counts
    starts = jnp.arange(hop.num_dests, dtype=I32) * hop.capacity
    # output_offsets are where *my* rows land in each receiver: block `me` of its buffer.
    me = jax.lax.axis_index(hop.axis).astype(I32)
    out_offsets = jnp.full((hop.num_dests,), me * hop.capacity, I32)
    output = jnp.full(x.shape, fill, x.dtype)
    return ragged_all_to_all(x, output, starts, send, out_offsets, recv, axis_name=hop.axis)


def hop_counts(hop: Hop, send_src: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Ragged sizes of a hop: rows sent to each destination (local), rows received (tiny all_to_all)."""
    send = (send_src.reshape(hop.num_dests, hop.capacity) >= 0).sum(axis=1, dtype=I32)
    return send, exchange(send, hop.axis)


def _counts(handle: Handle, i: int, backward: bool) -> tuple[jax.Array, jax.Array] | None:
    if handle.hops[i].transport == "all_to_all":
        return None
    send, recv = handle.send_counts[i], handle.recv_counts[i]
    return (recv, send) if backward else (send, recv)


def compact(valid: jax.Array, num_out: int) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Stable compaction of the received rows marked ``valid`` into ``num_out`` rows.

    Returns:
        ``(recv_src [num_out], recv_dst [M], kept [], dropped [])``, int32.
    """
    m = valid.shape[0]
    rank = jnp.cumsum(valid, dtype=I32) - valid.astype(I32)
    keep = valid & (rank < num_out)
    recv_dst = jnp.where(keep, rank, -1)
    recv_src = jnp.full((num_out,), -1, I32).at[jnp.where(keep, rank, num_out)].set(
        jnp.arange(m, dtype=I32), mode="drop")
    return recv_src, recv_dst, keep.sum(dtype=I32), (valid & ~keep).sum(dtype=I32)


def move_forward(kern: ModuleType, handle: Handle, rows: jax.Array) -> jax.Array:
    """Dispatch direction: ``[T, ...]`` rows of the source ranks -> ``[num_worst_tokens, ...]``."""
    for i, (hop, src) in enumerate(zip(handle.hops, handle.send_src)):
        rows = exchange_hop(kern.gather_rows(rows, src), hop, _counts(handle, i, False))
    return kern.gather_rows(rows, handle.recv_src)


def _return_hops(kern: ModuleType, handle: Handle, rows: jax.Array, out_dtype) -> jax.Array:
    """Sends last-hop receive buffers ``[D·C, H]`` back through every hop, summing the copies."""
    for i in reversed(range(len(handle.hops))):
        back = exchange_hop(rows, handle.hops[i], _counts(handle, i, True))
        rows = kern.gather_reduce(back, handle.reduce_idx[i], None, out_dtype)
    return rows


def move_backward(kern: ModuleType, handle: Handle, rows: jax.Array, out_dtype) -> jax.Array:
    """Combine direction: ``[num_worst_tokens, H]`` -> ``[T, H]``, each token's copies summed.

    Sums run in float32 and are rounded to ``out_dtype`` before each exchange (what goes on the
    wire has the dtype of the data, as in DeepEP).
    """
    return _return_hops(kern, handle, kern.gather_rows(rows, handle.recv_dst), out_dtype)


def slot_plan(kern: ModuleType, handle: Handle, weights: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per last-hop receive row m and slot k: the flat row ``n·K + k`` of a ``[N·K, H]`` array of
    per-slot outputs (-1 where row m holds no token or slot k has no local expert) and its weight
    (0 there), with ``n = recv_dst[m]``. int32 / float32 ``[D·C, K]``.
    """
    k = handle.recv_topk_idx.shape[1]
    n = handle.recv_dst
    ids = kern.gather_rows(handle.recv_topk_idx, n)
    live = (n[:, None] >= 0) & (ids >= 0)
    flat = jnp.where(live, n[:, None] * k + jnp.arange(k, dtype=I32), -1)
    w = jnp.where(live, kern.gather_rows(weights.astype(F32), n), 0.0)
    return flat, w


def move_backward_weighted(kern: ModuleType, handle: Handle, x: jax.Array, weights: jax.Array,
                           out_dtype) -> jax.Array:
    """Combine's 3-D form: ``x [N, K, H]`` per-slot outputs, ``weights [N, K]`` -> ``[T, H]``.

    Each receive row's live slots are summed with their weights in float32 while packing the send
    buffer (one gather-reduce: the local reduce and the unpack are fused), rounded to
    ``out_dtype``, then returned like :func:`move_backward`: one row per (token, rank) travels.
    Slots whose id is -1 are never read, so whatever they hold (NaN included) cannot leak.
    """
    nrows, k, h = x.shape
    flat, w = slot_plan(kern, handle, weights)
    rows = kern.gather_reduce(x.reshape(nrows * k, h), flat, w, out_dtype)
    return _return_hops(kern, handle, rows, out_dtype)
