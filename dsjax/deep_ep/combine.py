"""Normal-mode ``combine``: the reverse of :func:`~dsjax.deep_ep.dispatch`, summing over ranks.

Follows DeepEP's ``Buffer.combine`` (deepseek-ai/DeepEP): every received row goes back to the rank
and token it came from, and each token's rows are summed (in float32, rounded to x's dtype); with
``topk_weights`` the weights are reduced the same way (DeepEP's ``combined_topk_weights``). In
the two-hop path the rows are first reduced inside the destination node, on the rank that
forwarded them, so one row per (token, node) crosses the node axis back.

Besides DeepEP's 2-D form (the caller has already weighted and summed its local experts' outputs
per received row), ``combine`` takes per-slot expert outputs ``[num_worst_tokens, K, H]`` with the
received top-k weights and does that local weighted reduce itself (float32, fused with packing the
send buffer, see :func:`dsjax.deep_ep._plan.move_backward_weighted`), so one row per (token, rank)
travels back and the result is the weighted MoE output ``[T, H]`` (the issue's contract).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from dsjax._src import checks
from dsjax._src import dispatch as impl_dispatch
from dsjax.deep_ep import _plan, _validate
from dsjax.deep_ep._plan import Handle

_HAS = ("reference", "cpu", "cuda")
F32 = jnp.float32


def _combine_impl(parts, handle, impl):
    kern = _plan.kernels(impl)
    return tuple(_plan.move_backward(kern, handle, p, p.dtype) for p in parts)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _combine_vjp(parts, handle, impl):
    return _combine_impl(parts, handle, impl)


def _combine_fwd(parts, handle, impl):
    return _combine_impl(parts, handle, impl), handle


def _combine_bwd(impl, handle, cts):
    # Combine sums the copies of each token; its transpose copies the gradient to every copy,
    # which is a dispatch of the gradient with the cached handle (no re-routing).
    kern = _plan.kernels(impl)
    return tuple(_plan.move_forward(kern, handle, g) for g in cts), None


_combine_vjp.defvjp(_combine_fwd, _combine_bwd)


def _weighted_impl(x, w, handle, impl):
    return _plan.move_backward_weighted(_plan.kernels(impl), handle, x, w, x.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _weighted_vjp(x, w, handle, impl):
    return _weighted_impl(x, w, handle, impl)


def _weighted_fwd(x, w, handle, impl):
    return _weighted_impl(x, w, handle, impl), (x, w, handle)


def _weighted_bwd(impl, res, g):
    # out[t] = Σ over t's copies n and live slots k of w[n,k]·x[n,k]: the gradient of each row is
    # a dispatch of g (g_row[n] = g[t(n)]); then g_x[n,k] = w[n,k]·g_row[n] and
    # g_w[n,k] = <x[n,k], g_row[n]> on live slots, exactly 0 on the others (whatever x holds there).
    x, w, handle = res
    g_row = _plan.move_forward(_plan.kernels(impl), handle, g).astype(F32)
    live = handle.recv_topk_idx >= 0
    w_live = jnp.where(live, w, 0.0)
    g_x = (w_live[..., None] * g_row[:, None, :]).astype(x.dtype)
    x_live = jnp.where(live[..., None], x.astype(F32), 0.0)
    g_w = jnp.einsum("nkh,nh->nk", x_live, g_row, precision=jax.lax.Precision.HIGHEST)
    return g_x, jnp.where(live, g_w, 0.0).astype(w.dtype), None


_weighted_vjp.defvjp(_weighted_fwd, _weighted_bwd)


def combine(x: jax.Array, handle: Handle, *, topk_weights: jax.Array | None = None,
            implementation: impl_dispatch.Implementation = "auto"):
    """Returns each received row to its source token and sums the copies; inside ``jax.shard_map``.

    Two forms, chosen by x's rank:

    * **Per-slot (3-D) form**, the MoE contract: ``x`` is bfloat16 or float32
      ``[num_worst_tokens, K, H]`` where ``x[n, k]`` is the output of local expert
      ``recv_topk_idx[n, k]`` for received row n, and ``topk_weights`` (required) is float32
      ``[num_worst_tokens, K]`` (normally dispatch's ``recv_topk_weights``). Each rank computes
      ``Σ_k w[n, k]·x[n, k]`` over the slots whose id is >= 0 in float32 (slots with id -1, padding
      rows and dropped rows are never read: NaN or garbage there cannot leak into the result or
      the gradients), rounds it to x's dtype and sends ONE row per (token, rank) back, where the
      rows are summed (float32, rounded to x's dtype). Returns ``[T, H]`` of x's dtype: the
      weighted MoE output ``Σ_k w[t, k]·expert_k(x_t)`` (zeros for a token with no expert).
    * **DeepEP (2-D) form**: ``x`` is ``[num_worst_tokens, H]``, one row per received row, already
      weighted and summed over the local experts by the caller. Without ``topk_weights`` returns
      ``[T, H]``: Σ over the ranks token t was sent to of that rank's row. With ``topk_weights``
      ``[num_worst_tokens, K]`` the weights are *not applied*: they are reduced over ranks like x
      (DeepEP's ``combined_topk_weights``; each entry is nonzero on one rank only, so this gives
      back each token's original weights, 0 for dropped copies) and the pair
      ``(combined_x [T, H], combined_topk_weights float32 [T, K])`` is returned.

    Args:
        x: ``[num_worst_tokens, K, H]`` (per-slot form) or ``[num_worst_tokens, H]`` (DeepEP form),
            bfloat16 or float32.
        handle: from :func:`dispatch`, in the same ``shard_map`` (mesh axes and the transport are
            taken from it).
        topk_weights: float32 ``[num_worst_tokens, K]``; required by the per-slot form.
        implementation: ``"auto"`` | ``"cuda"`` | ``"cpu"`` | ``"reference"`` for the local work.

    Returns:
        Per-slot form: ``[T, H]``. DeepEP form: ``[T, H]``, or the pair above with ``topk_weights``.

    Differentiable: the gradient of x is a dispatch of the output gradient with ``handle``; in the
    per-slot form also w.r.t. ``topk_weights`` (``<x[n, k], dispatched gradient>`` on live slots).
    """
    op = "deep_ep.combine"
    if not isinstance(handle, Handle):
        raise TypeError(f"{op}: handle must be the handle returned by deep_ep.dispatch, got {type(handle).__name__}")
    n = handle.num_worst_tokens
    k = handle.recv_topk_idx.shape[1]
    checks.check_dtype("x", x, _validate.ACTIVATION_DTYPES, op=op)
    checks.check_rank("x", x, op=op, at_least=2,
                      layout="[num_worst_tokens, hidden] or [num_worst_tokens, num_topk, hidden]")
    if x.ndim > 3:
        raise ValueError(f"{op}: x must have rank 2 [num_worst_tokens, hidden] or 3 "
                         f"[num_worst_tokens, num_topk, hidden], got shape {tuple(x.shape)}")
    if x.shape[0] != n:
        raise ValueError(f"{op}: x must have num_worst_tokens={n} rows (one per received row), got shape {tuple(x.shape)}")
    per_slot = x.ndim == 3
    if per_slot:
        if topk_weights is None:
            raise ValueError(
                f"{op}: a per-slot x [num_worst_tokens, num_topk, hidden] (got shape {tuple(x.shape)}) "
                "needs topk_weights [num_worst_tokens, num_topk] (dispatch's recv_topk_weights), got None")
        if x.shape[1] != k:
            raise ValueError(f"{op}: a per-slot x must have num_topk={k} slots (dispatch's K), got shape {tuple(x.shape)}")
    if topk_weights is not None:
        checks.check_dtype("topk_weights", topk_weights, (jnp.float32,), op=op)
        checks.check_rank("topk_weights", topk_weights, op=op, exact=2, layout="[num_worst_tokens, num_topk]")
        if topk_weights.shape[0] != n:
            raise ValueError(f"{op}: topk_weights must have num_worst_tokens={n} rows, got shape {tuple(topk_weights.shape)}")
        if per_slot and topk_weights.shape[1] != k:
            raise ValueError(f"{op}: topk_weights must have num_topk={k} columns like x, got shape {tuple(topk_weights.shape)}")
    impl = impl_dispatch.choose(implementation, op=op, has=_HAS)
    if per_slot:  # the reference is never wrapped: plain autodiff of it is the oracle
        if impl == "reference":
            return _weighted_impl(x, topk_weights, handle, impl)
        return _weighted_vjp(x, topk_weights, handle, impl)
    parts = (x,) if topk_weights is None else (x, topk_weights)
    if impl == "reference":
        out = _combine_impl(parts, handle, impl)
    else:
        out = _combine_vjp(parts, handle, impl)
    return out[0] if topk_weights is None else (out[0], out[1])
