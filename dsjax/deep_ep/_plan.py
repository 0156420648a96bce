"""The communication plan of a normal dispatch (the ``handle``) and the two directions of movement.

A dispatch is one or two hops; each hop packs rows into per-destination send buffers of static
capacity (one copy per destination), exchanges them with one ``all_to_all`` over a mesh axis, and
the last hop's receive buffer is compacted into ``num_worst_tokens`` rows. The handle records, per
hop, where each row went (``send_src``) and where each copy sits (``reduce_idx``), so that

* :func:`move_forward` (dispatch direction) copies rows source -> receiver, and
* :func:`move_backward` (combine direction) returns rows receiver -> source, summing the copies of
  each row (inside the destination node first in the two-hop path),

and each is the exact transpose of the other (so each is the other's backward pass).
"""

from __future__ import annotations

import dataclasses
from types import ModuleType
from typing import Any

import jax
import jax.numpy as jnp

from dsjax.deep_ep import reference

I32 = jnp.int32
AxisName = Any  # a mesh axis name or a tuple of them


def kernels(impl: str) -> ModuleType:
    """The module of local kernels for an implementation ('reference' or an FFI one)."""
    if impl == "reference":
        return reference
    from dsjax.deep_ep import _ffi
    return _ffi


@dataclasses.dataclass(frozen=True)
class Hop:
    """One exchange: ``axis`` of ``num_dests`` ranks, ``capacity`` send rows per destination."""

    axis: AxisName
    num_dests: int
    capacity: int


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
    for hop, src in zip(handle.hops, handle.send_src):
        rows = exchange(kern.gather_rows(rows, src), hop.axis)
    return kern.gather_rows(rows, handle.recv_src)


def move_backward(kern: ModuleType, handle: Handle, rows: jax.Array, out_dtype) -> jax.Array:
    """Combine direction: ``[num_worst_tokens, H]`` -> ``[T, H]``, each token's copies summed.

    Sums run in float32 and are rounded to ``out_dtype`` before each exchange (what goes on the
    wire has the dtype of the data, as in DeepEP).
    """
    rows = kern.gather_rows(rows, handle.recv_dst)
    for hop, red in zip(reversed(handle.hops), reversed(handle.reduce_idx)):
        rows = kern.gather_reduce(exchange(rows, hop.axis), red, None, out_dtype)
    return rows
