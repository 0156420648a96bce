"""Normal-mode ``dispatch``: send each token once to every rank holding one of its experts.

Follows DeepEP's ``Buffer.dispatch`` (deepseek-ai/DeepEP): one copy of a token per destination
rank (not per expert); received top-k ids are local expert ids with -1 for experts held elsewhere
(their weights zeroed); receive buffers have the static size ``num_worst_tokens`` (DeepEP's
``num_worst_tokens`` mode, padding rows carry id -1); ``num_recv_tokens_per_expert`` is padded to
``expert_alignment``. With ``node_axis_name`` the token takes DeepEP's two-hop path: it crosses the
node axis once per destination node (to the rank with the same in-node index, as DeepEP's RDMA
hop does) and is forwarded inside that node (the NVLink hop).

Transport (``transport=``): XLA's ``all_to_all`` with a static send capacity per destination
(default; runs everywhere, the whole static buffers travel, so a smaller ``send_capacity`` sends
fewer bytes and may drop tokens), or ``ragged_all_to_all`` (``"ragged"``, GPU/TPU only: XLA:CPU
does not implement it) which sends each destination exactly its rows into the same static receive
buffers, after a tiny ``all_to_all`` of the per-destination counts; both give identical arrays.
Drops are never silent: they are counted in ``handle.num_dropped`` (summed over ranks) and
``strict=True`` makes them a run-time error.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import io_callback

from dsjax._src import dispatch as impl_dispatch
from dsjax.deep_ep import _plan, _validate
from dsjax.deep_ep._plan import Handle, Hop, exchange_hop, hop_counts

_HAS = ("reference", "cpu", "cuda")
I32 = jnp.int32


@dataclasses.dataclass(frozen=True)
class _Config:
    num_experts: int
    axis: Any
    node_axis: Any
    num_ranks: int
    num_nodes: int
    num_worst_tokens: int
    expert_alignment: int
    capacity: int
    forward_capacity: int
    strict: bool
    impl: str
    transport: str

    @property
    def all_axes(self) -> Any:
        if self.node_axis is None:
            return self.axis
        return (self.node_axis, self.axis)


def _strict_check(num_dropped: jax.Array, num_invalid: jax.Array) -> jax.Array:
    """Raises at run time (through a host callback) when a token copy was dropped.

    The counts are global (psum), so every rank raises at the same point of the SPMD program; a
    single failing rank would leave the others waiting in the next collective.
    """
    def check(dropped, invalid):
        if int(dropped) > 0 or int(invalid) > 0:
            raise ValueError(
                f"deep_ep.dispatch(strict=True): {int(dropped)} (token, destination) copies were "
                f"dropped for lack of capacity and {int(invalid)} top-k ids were >= num_experts; "
                "raise num_worst_tokens / send_capacity / forward_capacity")
        return np.int32(0)
    return io_callback(check, jax.ShapeDtypeStruct((), I32), num_dropped, num_invalid)


def _plan_routes(kern, topk_idx: jax.Array, topk_weights: jax.Array, cfg: _Config):
    """Routes, exchanges the metadata and compacts: (handle, recv_idx, recv_w, per_expert)."""
    t = topk_idx.shape[0]
    local = cfg.num_experts // cfg.num_ranks
    ragged = cfg.transport == "ragged"
    if cfg.node_axis is None:
        hops = (Hop(cfg.axis, cfg.num_ranks, cfg.capacity, cfg.transport),)
        red, src, sidx, sw, dropped = kern.route(
            topk_idx, topk_weights, experts_per_dest=local, num_dests=cfg.num_ranks,
            capacity=cfg.capacity, local_ids=True)
        reds, srcs = (red,), (src,)
        counts = (hop_counts(hops[0], src),) if ragged else ()
    else:
        gpus = cfg.num_ranks // cfg.num_nodes
        per_node = local * gpus
        hops = (Hop(cfg.node_axis, cfg.num_nodes, cfg.capacity, cfg.transport),
                Hop(cfg.axis, gpus, cfg.forward_capacity, cfg.transport))
        red1, src1, sidx1, sw1, d1 = kern.route(
            topk_idx, topk_weights, experts_per_dest=per_node, num_dests=cfg.num_nodes,
            capacity=cfg.capacity, local_ids=False)
        c1 = hop_counts(hops[0], src1) if ragged else None
        idx1 = exchange_hop(sidx1, hops[0], c1, fill=-1)
        w1 = exchange_hop(sw1, hops[0], c1)
        # The forwarder keeps only its own node's experts, renumbered from 0 within the node.
        lo = jax.lax.axis_index(cfg.node_axis).astype(I32) * per_node
        idx1 = jnp.where((idx1 >= lo) & (idx1 < lo + per_node), idx1 - lo, -1)
        red2, src2, sidx, sw, d2 = kern.route(
            idx1, w1, experts_per_dest=local, num_dests=gpus, capacity=cfg.forward_capacity,
            local_ids=True)
        reds, srcs, dropped = (red1, red2), (src1, src2), d1 + d2
        counts = (c1, hop_counts(hops[1], src2)) if ragged else ()
    last = counts[-1] if ragged else None
    ridx = exchange_hop(sidx, hops[-1], last, fill=-1)
    rw = exchange_hop(sw, hops[-1], last)
    recv_src, recv_dst, kept, dropped_recv = _plan.compact((ridx >= 0).any(axis=1), cfg.num_worst_tokens)
    recv_idx = jnp.where(recv_src[:, None] >= 0, kern.gather_rows(ridx, recv_src), -1)
    recv_w = kern.gather_rows(rw, recv_src)
    num_dropped = jax.lax.psum(dropped + dropped_recv, cfg.all_axes)
    per_expert = (recv_idx[:, :, None] == jnp.arange(local, dtype=I32)).any(axis=1).sum(axis=0, dtype=I32)
    a = cfg.expert_alignment
    per_expert = (per_expert + (a - 1)) // a * a
    if cfg.strict:
        invalid = jax.lax.psum((topk_idx >= cfg.num_experts).sum(dtype=I32), cfg.all_axes)
        per_expert = per_expert + _strict_check(num_dropped, invalid)
    handle = Handle(reds, srcs, recv_src, recv_dst, recv_idx, tuple(c[0] for c in counts),
                    tuple(c[1] for c in counts), num_dropped, kept, hops, t)
    return handle, recv_idx, recv_w, per_expert


def _dispatch_impl(parts, topk_idx, topk_weights, cfg: _Config):
    kern = _plan.kernels(cfg.impl)
    handle, recv_idx, recv_w, per_expert = _plan_routes(kern, topk_idx, topk_weights, cfg)
    recv = tuple(_plan.move_forward(kern, handle, p) for p in parts)
    return recv, recv_idx, recv_w, per_expert, handle


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _dispatch_vjp(parts, topk_idx, topk_weights, cfg):
    return _dispatch_impl(parts, topk_idx, topk_weights, cfg)


def _dispatch_fwd(parts, topk_idx, topk_weights, cfg):
    out = _dispatch_impl(parts, topk_idx, topk_weights, cfg)
    return out, (out[-1], out[1])


def _dispatch_bwd(cfg, res, cts):
    # Dispatch copies rows; its transpose is a combine (sum of the copies) with the same handle.
    handle, recv_idx = res
    g_parts, _, g_w, _, _ = cts
    # recv_topk_weights is 0 (a constant) where the expert lives on another rank (id -1): every
    # copy of a token carries all K slots, so without this mask a token sent to two ranks would
    # have those slots' cotangents summed into its weight gradient twice.
    g_w = jnp.where(recv_idx >= 0, g_w, 0.0)
    kern = _plan.kernels(cfg.impl)
    if len(g_parts) == 1:  # recv_x has x's dtype, so its cotangent has it too
        g_x = (_plan.move_backward(kern, handle, g_parts[0], g_parts[0].dtype),)
    else:  # FP8 codes and scales carry no gradient
        g_x = (None, None)
    return g_x, None, _plan.move_backward(kern, handle, g_w, jnp.float32)


_dispatch_vjp.defvjp(_dispatch_fwd, _dispatch_bwd)


def dispatch(
    x: jax.Array | tuple[jax.Array, jax.Array],
    topk_idx: jax.Array,
    topk_weights: jax.Array,
    *,
    num_experts: int,
    axis_name: Any,
    num_worst_tokens: int,
    node_axis_name: Any = None,
    expert_alignment: int = 1,
    send_capacity: int | None = None,
    forward_capacity: int | None = None,
    strict: bool = False,
    transport: str = "all_to_all",
    implementation: impl_dispatch.Implementation = "auto",
):
    """Sends each token to the EP ranks holding its experts; call inside ``jax.shard_map``.

    Each device is one EP rank; rank r holds experts ``[r·E/R, (r+1)·E/R)`` where R is the size of
    ``axis_name`` (times that of ``node_axis_name``; rank = node·gpus + gpu).

    Args:
        x: this rank's tokens, bfloat16 or float32 ``[T, H]``, or an FP8 pair
            ``(x_fp8 float8_e4m3fn [T, H], scales float32 [T, ceil(H/128)])`` from
            ``dsjax.deep_gemm.per_token_cast_to_fp8`` (sent as is: about half the bytes of bf16).
        topk_idx: int32 ``[T, K]`` global expert ids; negative = no expert. Ids must be
            ``< num_experts`` (native implementations fail at run time otherwise).
        topk_weights: float32 ``[T, K]``.
        num_experts: E, a multiple of R.
        axis_name: the EP mesh axis (or tuple of axes); in hierarchical mode the in-node axis.
        num_worst_tokens: static number of receive rows per rank (DeepEP's worst case is ``R·T``).
        node_axis_name: the node mesh axis: enables the two-hop path.
        expert_alignment: pad each ``num_recv_tokens_per_expert`` up to a multiple of this.
        send_capacity: send rows per (source rank, destination rank), or per (source rank,
            destination node) in hierarchical mode; default ``T`` (never drops).
        forward_capacity: hierarchical only: rows a forwarding rank sends to each rank of its node;
            default ``min(nodes·send_capacity, num_worst_tokens)``.
        strict: raise at run time (host callback, ``JaxRuntimeError`` carrying a ValueError)
            when a copy was dropped or an id is ``>= num_experts``.
        transport: ``"all_to_all"`` (static buffers, every backend) or ``"ragged"``
            (``jax.lax.ragged_all_to_all`` with exact per-destination sizes and offsets: only rows
            holding a token travel; GPU/TPU backends only: on a CPU default backend it raises
            ValueError before any collective is traced). Recorded in the handle, so
            :func:`combine` (and both backward passes) use the same transport. Same results.
        implementation: ``"auto"`` | ``"cuda"`` | ``"cpu"`` | ``"reference"`` for the local work.

    Returns:
        ``(recv_x, recv_topk_idx, recv_topk_weights, num_recv_tokens_per_expert, handle)``:

        * ``recv_x``: ``[num_worst_tokens, H]`` of x's dtype (an FP8 pair when x is one); tokens
          packed at the front, in order of source rank then source token (two-hop: in order of
          forwarding rank, then source node, then token); padding rows are zero.
        * ``recv_topk_idx``: int32 ``[num_worst_tokens, K]``: local expert ids in ``[0, E/R)``, -1
          for experts of other ranks and on every padding row.
        * ``recv_topk_weights``: float32 ``[num_worst_tokens, K]``, 0 where the id is -1.
        * ``num_recv_tokens_per_expert``: int32 ``[E/R]``, rounded up to ``expert_alignment``.
        * ``handle``: a :class:`~dsjax.deep_ep._plan.Handle` pytree for :func:`combine`;
          ``handle.num_dropped`` (int32, equal on all ranks) counts lost copies (0 = none).

    Differentiable (bf16/f32 x): the gradient of x is the combine (sum over destinations) of the
    gradient of recv_x, that of topk_weights the combine of recv_topk_weights' gradient.
    """
    op = "deep_ep.dispatch"
    parts, t, _ = _validate.split_x(op, x)
    _validate.check_topk(op, topk_idx, topk_weights, t)
    nwt = _validate.positive_int(op, "num_worst_tokens", num_worst_tokens)
    align = _validate.positive_int(op, "expert_alignment", expert_alignment)
    if not isinstance(strict, bool):
        raise TypeError(f"{op}: strict must be a Python bool, got {type(strict).__name__}")
    gpus = _validate.axis_size(op, "axis_name", axis_name)
    nodes = 1 if node_axis_name is None else _validate.axis_size(op, "node_axis_name", node_axis_name)
    ranks = gpus * nodes
    e = _validate.check_experts(op, num_experts, ranks)
    cap = max(t, 1) if send_capacity is None else _validate.positive_int(op, "send_capacity", send_capacity)
    if node_axis_name is None:
        if forward_capacity is not None:
            raise ValueError(f"{op}: forward_capacity applies to the two-hop path only (node_axis_name), got {forward_capacity}")
        fwd_cap = 0
    else:
        fwd_cap = (min(nodes * cap, nwt) if forward_capacity is None
                   else _validate.positive_int(op, "forward_capacity", forward_capacity))
    if transport not in _plan.TRANSPORTS:
        raise ValueError(f"{op}: transport must be one of {_plan.TRANSPORTS}, got {transport!r}")
    if transport == "ragged":
        _plan.check_ragged_backend(op)
    impl = impl_dispatch.choose(implementation, op=op, has=_HAS)
    cfg = _Config(e, axis_name, node_axis_name, ranks, nodes, nwt, align, cap, fwd_cap, strict, impl,
                  transport)
    if impl == "reference":  # never wrapped: plain autodiff of the reference is the oracle
        recv, recv_idx, recv_w, per_expert, handle = _dispatch_impl(parts, topk_idx, topk_weights, cfg)
    else:
        recv, recv_idx, recv_w, per_expert, handle = _dispatch_vjp(parts, topk_idx, topk_weights, cfg)
    recv_x = recv[0] if len(recv) == 1 else tuple(recv)
    return recv_x, recv_idx, recv_w, per_expert, handle
