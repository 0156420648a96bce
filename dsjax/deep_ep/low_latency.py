"""Low-latency mode: fixed-size buffers in DeepGEMM's masked layout, for decoding.

Follows DeepEP's ``low_latency_dispatch`` / ``low_latency_combine`` (deepseek-ai/DeepEP): each rank
sends at most ``num_max_dispatch_tokens_per_rank`` tokens, optionally quantized to FP8 on the way
(1x128 scales, as ``per_token_cast_to_fp8``); the receiver lays them out per local expert as
``[E/R, R·max_T, H]`` with a count per expert, exactly the input of DeepGEMM's
``m_grouped_fp8_gemm_nt_masked``; combine applies the top-k weights and sums.

Differences from DeepEP, by design: tokens travel once per destination rank (DeepEP's LL kernels
send one copy per expert) and are expanded per expert on the receiver; a local expert's rows are
ordered by source rank then source token (DeepEP: arrival order). The buffers are sized so that
nothing can be dropped. Weights are not sent by dispatch: combine exchanges them (``[R, max_T, K]``
float32, small) and weights the expert outputs on the expert side, so one row per (token, rank)
travels back. A decoding path, not differentiable: under ``jax.grad`` the FP8 cast and the FFI
kernels raise (the pure-JAX reference would differentiate); train with dispatch / combine.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from dsjax._src import checks
from dsjax._src import dispatch as impl_dispatch
from dsjax.deep_ep import _plan, _validate
from dsjax.deep_ep._plan import exchange

_HAS = ("reference", "cpu", "cuda")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LowLatencyHandle:
    """What :func:`low_latency_combine` needs (a pytree of arrays).

    Attributes:
        reduce_idx: int32 ``[T, R]``: send slot of each token's copy to rank r, -1 if none.
        pos: int32 ``[R·max_T, K]``: flat position ``e·R·max_T + p`` of each received row's k-th
            local expert in ``recv_x``, -1 where none.
        axis, num_experts, num_max_dispatch_tokens_per_rank, impl: static.
    """

    reduce_idx: jax.Array
    pos: jax.Array
    axis: Any = dataclasses.field(metadata=dict(static=True))
    num_experts: int = dataclasses.field(metadata=dict(static=True))
    num_max_dispatch_tokens_per_rank: int = dataclasses.field(metadata=dict(static=True))


def _route(kern, topk_idx, topk_weights, local, ranks, max_t):
    return kern.route(topk_idx, topk_weights, experts_per_dest=local, num_dests=ranks,
                      capacity=max_t, local_ids=True)


def low_latency_dispatch(
    x: jax.Array,
    topk_idx: jax.Array,
    *,
    num_max_dispatch_tokens_per_rank: int,
    num_experts: int,
    axis_name: Any,
    use_fp8: bool = True,
    implementation: impl_dispatch.Implementation = "auto",
):
    """Dispatches into the per-expert masked layout; call inside ``jax.shard_map``.

    Args:
        x: bfloat16 or float32 ``[T, H]`` with ``T <= num_max_dispatch_tokens_per_rank``.
        topk_idx: int32 ``[T, K]`` global expert ids, negative = none, ``< num_experts``.
        num_max_dispatch_tokens_per_rank: max_T, the static per-rank token budget.
        num_experts: E, a multiple of the axis size R.
        axis_name: the EP mesh axis (or tuple of axes).
        use_fp8: quantize to FP8 with 1x128 scales before sending.
        implementation: ``"auto"`` | ``"cuda"`` | ``"cpu"`` | ``"reference"``.

    Returns:
        ``(recv_x, recv_count, handle)``: ``recv_x`` is ``[E/R, R·max_T, H]`` of x's dtype, or with
        ``use_fp8`` the pair ``(float8_e4m3fn [E/R, R·max_T, H], float32 [E/R, R·max_T, ceil(H/128)])``;
        local expert e's tokens fill rows ``[0, recv_count[e])``, the rest is zero. ``recv_count``
        is int32 ``[E/R]`` (DeepGEMM's ``masked_m``). ``handle`` is a :class:`LowLatencyHandle`.
    """
    op = "deep_ep.low_latency_dispatch"
    checks.check_dtype("x", x, _validate.ACTIVATION_DTYPES, op=op)
    checks.check_rank("x", x, op=op, exact=2, layout="[num_tokens, hidden]")
    t, h = x.shape
    _validate.check_topk(op, topk_idx, None, t)
    max_t = _validate.positive_int(op, "num_max_dispatch_tokens_per_rank", num_max_dispatch_tokens_per_rank)
    if t > max_t:
        raise ValueError(f"{op}: x has {t} tokens, more than num_max_dispatch_tokens_per_rank={max_t}")
    if not isinstance(use_fp8, bool):
        raise TypeError(f"{op}: use_fp8 must be a Python bool, got {type(use_fp8).__name__}")
    ranks = _validate.axis_size(op, "axis_name", axis_name)
    e = _validate.check_experts(op, num_experts, ranks)
    impl = impl_dispatch.choose(implementation, op=op, has=_HAS)
    kern = _plan.kernels(impl)
    local = e // ranks
    m = ranks * max_t
    zeros_w = jnp.zeros(topk_idx.shape, jnp.float32)
    red, src, sidx, _, _ = _route(kern, topk_idx, zeros_w, local, ranks, max_t)
    if use_fp8:
        from dsjax.deep_gemm import per_token_cast_to_fp8
        parts = per_token_cast_to_fp8(x, implementation=impl)
    else:
        parts = (x,)
    recv_idx = exchange(sidx, axis_name)
    src_row, count, pos = kern.ll_layout(recv_idx, num_local_experts=local)
    out = []
    for p in parts:
        rows = kern.gather_rows(exchange(kern.gather_rows(p, src), axis_name), src_row)
        out.append(rows.reshape(local, m, p.shape[1]))
    handle = LowLatencyHandle(red, pos, axis_name, e, max_t)
    recv_x = out[0] if len(out) == 1 else tuple(out)
    return recv_x, count, handle


def low_latency_combine(
    y: jax.Array,
    topk_idx: jax.Array,
    topk_weights: jax.Array,
    handle: LowLatencyHandle,
    *,
    implementation: impl_dispatch.Implementation = "auto",
) -> jax.Array:
    """Weights each expert output by its top-k weight and sums per token; inside ``jax.shard_map``.

    Args:
        y: bfloat16 or float32 ``[E/R, R·max_T, H]``: expert outputs in the layout of
            ``low_latency_dispatch``'s ``recv_x`` (rows past ``recv_count`` are ignored).
        topk_idx: int32 ``[T, K]``, the same ids that were dispatched.
        topk_weights: float32 ``[T, K]``.
        handle: from :func:`low_latency_dispatch`.
        implementation: ``"auto"`` | ``"cuda"`` | ``"cpu"`` | ``"reference"``.

    Returns:
        ``[T, H]`` of y's dtype: ``Σ_k topk_weights[t, k] · y[expert of (t, k)]`` (float32 sums,
        rounded to y's dtype on the expert side and at the end).
    """
    op = "deep_ep.low_latency_combine"
    if not isinstance(handle, LowLatencyHandle):
        raise TypeError(f"{op}: handle must come from deep_ep.low_latency_dispatch, got {type(handle).__name__}")
    checks.check_dtype("y", y, _validate.ACTIVATION_DTYPES, op=op)
    ranks = _validate.axis_size(op, "handle.axis", handle.axis)
    local = handle.num_experts // ranks
    max_t = handle.num_max_dispatch_tokens_per_rank
    m = ranks * max_t
    checks.check_rank("y", y, op=op, exact=3, layout="[E/R, R*max_T, hidden]")
    if tuple(y.shape[:2]) != (local, m):
        raise ValueError(f"{op}: y must have shape ({local}, {m}, hidden) [E/R, R*max_T, hidden], got {tuple(y.shape)}")
    t = handle.reduce_idx.shape[0]
    _validate.check_topk(op, topk_idx, topk_weights, t)
    impl = impl_dispatch.choose(implementation, op=op, has=_HAS)
    kern = _plan.kernels(impl)
    _, _, _, send_w, _ = _route(kern, topk_idx, topk_weights, local, ranks, max_t)
    recv_w = exchange(send_w, handle.axis)
    rows = kern.gather_reduce(y.reshape(local * m, y.shape[2]), handle.pos, recv_w, y.dtype)
    back = exchange(rows, handle.axis)
    return kern.gather_reduce(back, handle.reduce_idx, None, y.dtype)
