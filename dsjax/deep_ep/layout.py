"""``get_dispatch_layout``: per-rank, per-node and per-expert token counts of one rank's routing.

Follows DeepEP's ``Buffer.get_dispatch_layout`` (deepseek-ai/DeepEP, ``csrc/kernels/layout.cu``):
counts are over this rank's own tokens; an expert-parallel rank r holds experts
``[r·E/R, (r+1)·E/R)``; node n holds ranks ``[n·ranks_per_node, (n+1)·ranks_per_node)``.
"""

from __future__ import annotations

from typing import NamedTuple

import jax

from dsjax._src import dispatch as impl_dispatch
from dsjax.deep_ep import _plan, _validate

_HAS = ("reference", "cpu", "cuda")


class Layout(NamedTuple):
    """Result of :func:`get_dispatch_layout` (field names as in DeepEP).

    Attributes:
        num_tokens_per_rank: int32 ``[R]``: tokens with at least one expert on rank r.
        num_tokens_per_node: int32 ``[R / ranks_per_node]`` or None without ``ranks_per_node``.
        num_tokens_per_expert: int32 ``[E]``: tokens that selected expert e.
        is_token_in_rank: bool ``[T, R]``.
    """

    num_tokens_per_rank: jax.Array
    num_tokens_per_node: jax.Array | None
    num_tokens_per_expert: jax.Array
    is_token_in_rank: jax.Array


def get_dispatch_layout(topk_idx: jax.Array, *, num_experts: int, num_ranks: int,
                        ranks_per_node: int | None = None,
                        implementation: impl_dispatch.Implementation = "auto") -> Layout:
    """Counts this rank's tokens per destination rank, node and expert.

    A local op (no communication); call it anywhere, e.g. inside ``jax.shard_map`` on each rank's
    ``topk_idx``. Sum the counts over ranks (``jax.lax.psum``) for global loads.

    Args:
        topk_idx: int32 ``[T, K]`` global expert ids; negative entries (DeepEP's -1) select
            nothing. Ids ``>= num_experts`` are invalid: the native implementations fail with an
            error at run time, the reference ignores them.
        num_experts: E, a multiple of ``num_ranks``.
        num_ranks: R, the expert-parallel world size.
        ranks_per_node: ranks per node (must divide R) to also count tokens per node.
        implementation: ``"auto"`` | ``"cuda"`` | ``"cpu"`` | ``"reference"``.

    Returns:
        :class:`Layout`. A token that lists an expert twice counts once for it (and for its rank).

    Raises:
        TypeError / ValueError: bad dtype, shape or sizes (before anything runs).
    """
    op = "get_dispatch_layout"
    _validate.check_topk(op, topk_idx, None, None)
    r = _validate.positive_int(op, "num_ranks", num_ranks)
    e = _validate.check_experts(op, num_experts, r)
    if ranks_per_node is not None:
        rpn = _validate.positive_int(op, "ranks_per_node", ranks_per_node)
        if r % rpn:
            raise ValueError(f"{op}: ranks_per_node must divide num_ranks={r}, got {rpn}")
    impl = impl_dispatch.choose(implementation, op=op, has=_HAS)
    return Layout(*_plan.kernels(impl).dispatch_layout(
        topk_idx, num_experts=e, num_ranks=r, ranks_per_node=ranks_per_node))
