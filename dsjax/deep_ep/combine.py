"""Normal-mode ``combine``: the reverse of :func:`~dsjax.deep_ep.dispatch`, summing over ranks.

Follows DeepEP's ``Buffer.combine`` (deepseek-ai/DeepEP): every received row goes back to the rank
and token it came from, and each token's rows are summed (in float32, rounded to x's dtype); with
``topk_weights`` the weights are reduced the same way (DeepEP's ``combined_topk_weights``). In
the two-hop path the rows are first reduced inside the destination node, on the rank that
forwarded them, so one row per (token, node) crosses the node axis back.
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


def combine(x: jax.Array, handle: Handle, *, topk_weights: jax.Array | None = None,
            implementation: impl_dispatch.Implementation = "auto"):
    """Returns each received row to its source token and sums the copies; inside ``jax.shard_map``.

    Args:
        x: bfloat16 or float32 ``[num_worst_tokens, H]``: one row per received row of the dispatch
            that made ``handle`` (typically the weighted sum of the local experts' outputs for that
            row). Padding rows and rows of dropped tokens are ignored.
        handle: from :func:`dispatch`, in the same ``shard_map`` (mesh axes are taken from it).
        topk_weights: optional float32 ``[num_worst_tokens, K]`` (e.g. ``recv_topk_weights``),
            reduced over ranks like x; since each entry is nonzero on one rank only, this gives
            back each token's original weights (0 for dropped copies).
        implementation: ``"auto"`` | ``"cuda"`` | ``"cpu"`` | ``"reference"`` for the local work.

    Returns:
        ``[T, H]`` of x's dtype: ``Σ`` over the ranks token t was sent to of that rank's row (a
        token with no expert gets zeros); with ``topk_weights`` the pair
        ``(combined_x, combined_topk_weights float32 [T, K])``.

    Differentiable: the gradient of x is a dispatch of the output gradient with ``handle``.
    """
    op = "deep_ep.combine"
    if not isinstance(handle, Handle):
        raise TypeError(f"{op}: handle must be the handle returned by deep_ep.dispatch, got {type(handle).__name__}")
    n = handle.num_worst_tokens
    checks.check_dtype("x", x, _validate.ACTIVATION_DTYPES, op=op)
    checks.check_rank("x", x, op=op, exact=2, layout="[num_worst_tokens, hidden]")
    if x.shape[0] != n:
        raise ValueError(f"{op}: x must have num_worst_tokens={n} rows (one per received row), got shape {tuple(x.shape)}")
    parts = (x,)
    if topk_weights is not None:
        checks.check_dtype("topk_weights", topk_weights, (jnp.float32,), op=op)
        checks.check_rank("topk_weights", topk_weights, op=op, exact=2, layout="[num_worst_tokens, num_topk]")
        if topk_weights.shape[0] != n:
            raise ValueError(f"{op}: topk_weights must have num_worst_tokens={n} rows, got shape {tuple(topk_weights.shape)}")
        parts = (x, topk_weights)
    impl = impl_dispatch.choose(implementation, op=op, has=_HAS)
    if impl == "reference":
        out = _combine_impl(parts, handle, impl)
    else:
        out = _combine_vjp(parts, handle, impl)
    return out[0] if topk_weights is None else (out[0], out[1])
