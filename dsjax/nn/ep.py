"""Expert-parallel routed experts for :class:`dsjax.nn.moe.DeepSeekMoE`, through DeepEP.

The layout follows DeepSeek-V3's training setup (arXiv:2412.19437 §3.2): routed experts are split
over an expert-parallel (EP) mesh axis, rank r holding experts ``[r·E/R, (r+1)·E/R)``; tokens are
split over every mesh axis (data parallel x EP). Inside ``jax.shard_map`` each rank sends its
tokens to the ranks holding their experts (:func:`dsjax.deep_ep.dispatch`: one copy per
destination rank), runs its local experts on what it received, weights the outputs by the gating
weights, and sends the rows back (:func:`dsjax.deep_ep.combine`, summing each token's copies).

Dispatch and combine are each other's transpose, so gradients of the tokens, the gating weights
(hence the router) and the expert weights flow through the same path. The receive buffer is sized
for the worst case (every token of every EP rank on one rank), so no token can be dropped (DeepEP's
``num_worst_tokens`` mode at its bound): the result equals the dense computation.

The per-rank body is the public :func:`ep_local_experts`, for callers that are already inside
a ``shard_map`` (a pipeline stage); :func:`ep_routed_fn` wraps it in one. With redundant experts
(EPLB) the "experts" here are the physical slots: given the placement, the body maps each
device's logical ids to replica slots itself (:func:`dsjax.eplb.replica_route` on its own tokens,
salted by the device's index so the remainders rotate over the replicas), so no global sort of
the routing runs; both the flat EP step and the pipeline stages route this way.

With ``fp8=True`` each rank runs its local experts with FP8 grouped GEMMs on the contiguous layout
(:func:`dsjax.nn.moe.routed_experts_fp8`) over the rows it received; the layout's static row
count is sized from the worst-case receive buffer, so again nothing is dropped.
"""

from __future__ import annotations

import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P

from dsjax import deep_ep
from dsjax.eplb import replica_route
from dsjax.nn.layers import vary_over
from dsjax.nn.moe import routed_experts_dense, routed_experts_fp8

_shard_map = getattr(jax, "shard_map", None)
if _shard_map is None:  # pragma: no cover - older JAX
    from jax.experimental.shard_map import shard_map as _shard_map


def ep_local_experts(xl: jax.Array, wl: jax.Array, il: jax.Array, w1l: jax.Array,
                     w3l: jax.Array, w2l: jax.Array, *, num_experts: int, ep_axis: str,
                     num_worst_tokens: int, implementation: str = "auto", fp8: bool = False,
                     dp_axes: Sequence[str] = (),
                     placement: tuple[jax.Array, jax.Array] | None = None,
                     token_axes: Sequence[str] | None = None) -> jax.Array:
    """The per-rank body of :func:`ep_routed_fn`: dispatch, local experts, combine.

    Call it INSIDE a ``jax.shard_map`` (or any context where ``ep_axis`` is a bound mesh axis);
    it opens no shard_map of its own, so a pipeline-parallel stage can call it directly. Rank
    ``r`` of ``ep_axis`` holds experts (physical slots) ``[r·E/R, (r+1)·E/R)``.

    Args:
        xl: ``[t, D]`` this device's tokens (float32 or bfloat16).
        wl: ``[t, K]`` gating weights (cast to float32).
        il: int32 ``[t, K]`` expert ids in ``[0, num_experts)`` (physical slots), or logical
            expert ids when ``placement`` is given; negative means "no expert".
        w1l, w3l: ``[E/R, D, I]``; w2l: ``[E/R, I, D]``, this rank's experts, in xl's dtype.
        num_experts: E, the global number of experts (slots); a multiple of R.
        ep_axis: the expert-parallel mesh axis name (size R).
        num_worst_tokens: static receive-buffer rows; ``R · t`` (every token of every EP rank on
            this rank) guarantees nothing is dropped, which is what :func:`ep_routed_fn` uses.
        implementation: DeepEP's local kernels (``"auto"`` | ``"cuda"`` | ``"cpu"`` | ``"reference"``).
        fp8: FP8 grouped GEMMs (:func:`dsjax.nn.moe.routed_experts_fp8`) instead of the dense
            float computation.
        dp_axes: the other mesh axes the tokens are split over (data parallelism); with ``fp8``
            the weights are marked varying over them so their gradient is summed over them.
        placement: ``(log2phy int32 [E_logical, X], logcnt int32 [E_logical])`` of the layer's
            redundant experts (replicated), or None. Given, ``il`` holds logical ids and is
            mapped to slots here by :func:`dsjax.eplb.replica_route` with salt = this device's
            linear index over ``token_axes``.
        token_axes: the mesh axes this device's tokens are split over, in mesh order (default
            ``(*dp_axes, ep_axis)``); only read with ``placement``.

    Returns:
        ``[t, D]`` in xl's dtype: Σ_k wl[:, k] · expert_{il[:, k]}(xl) for this device's tokens.
    """
    ranks = jax.lax.axis_size(ep_axis)
    if num_experts % ranks or w1l.shape[0] != num_experts // ranks:
        raise ValueError(f"ep_local_experts: num_experts ({num_experts}) must be a multiple of the "
                         f"EP size {ranks} (axis {ep_axis!r}) and each rank must hold "
                         f"num_experts / {ranks} experts; got w1l with {w1l.shape[0]}")
    if placement is not None:
        axes = tuple(token_axes) if token_axes is not None else (*dp_axes, ep_axis)
        il = replica_route(il, *placement, salt=jax.lax.axis_index(axes))
    recv_x, recv_idx, recv_w, _, handle = deep_ep.dispatch(
        xl, il, wl.astype(jnp.float32), num_experts=num_experts, axis_name=ep_axis,
        num_worst_tokens=num_worst_tokens, implementation=implementation)
    # Ids of other ranks' experts (and padding rows) are -1 with weight 0. The explicit mask
    # matters for the gradient: dispatch's backward sums the weight cotangents of all copies of a
    # token, so entries of experts held elsewhere must get a zero cotangent (with the clamped id
    # they would otherwise receive expert 0's output).
    live = recv_idx >= 0
    if fp8:  # -1 ids are dropped by the contiguous layout, with zero weight cotangents
        # The FP8 GEMMs are a custom_vjp: their weight cotangent varies like the tokens (over
        # every token axis), so the weights must enter varying the same way; the transpose of
        # that cast is the psum of the weight gradients over data parallelism.
        w1l, w3l, w2l = (vary_over(w, tuple(dp_axes)) for w in (w1l, w3l, w2l))
        y = routed_experts_fp8(recv_x, recv_w, recv_idx, w1l, w3l, w2l)
    else:
        y = routed_experts_dense(recv_x, jnp.where(live, recv_w, 0.0),
                                 jnp.where(live, recv_idx, 0), w1l, w3l, w2l)
    return deep_ep.combine(y, handle, implementation=implementation)


@functools.cache
def ep_routed_fn(mesh: Mesh, *, ep_axis: str = "ep", token_axes: Sequence[str] | None = None,
                 implementation: str = "auto", fp8: bool = False) -> Callable[..., jax.Array]:
    """A ``routed_fn`` for :class:`~dsjax.nn.moe.DeepSeekMoE` that runs the experts with EP.

    Args:
        mesh: the device mesh; must have an axis named ``ep_axis``.
        ep_axis: the expert-parallel axis (R = its size must divide the number of experts).
        token_axes: mesh axes the tokens are split over (default: every axis of the mesh, in
            mesh order), so each device routes its own share of the tokens.
        implementation: DeepEP's local kernels: ``"auto"`` | ``"cuda"`` | ``"cpu"`` | ``"reference"``.
        fp8: run the local experts as FP8 grouped GEMMs (DeepGEMM implementation ``"auto"``)
            instead of the dense float computation.

    Returns:
        ``fn(x [T, D], weights f32 [T, K], indices i32 [T, K], w1 [E, D, I], w3 [E, D, I],
        w2 [E, I, D], *, placement=None) -> [T, D]`` (x's dtype), equal to
        :func:`routed_experts_dense` up to the order of float32 sums. With ``fp8`` the forward
        equals :func:`routed_experts_fp8` on one device up to summation order (its quantization
        is per row and per weight block); the weight gradients differ by FP8 rounding, Wgrad's
        1x128 tiles running along the rows each rank holds. With ``placement=(log2phy,
        logcnt)`` the indices are logical expert ids, routed to replica slots on each device
        (:func:`ep_local_experts`). T must be a multiple of the number of devices in
        ``token_axes`` (a ValueError says so, at trace time). Negative indices mean "no expert".
        The function carries ``routes_replicas = True`` and its ``ep_mesh`` / ``ep_axis``.

    Cached per arguments (``token_axes`` must then be a tuple or None), so models switched to
    EP with the same mesh share one function object and hence their jit compilations.
    """
    if ep_axis not in mesh.axis_names:
        raise ValueError(f"ep_routed_fn: ep_axis {ep_axis!r} is not an axis of the mesh "
                         f"(axes {tuple(mesh.axis_names)})")
    axes = tuple(mesh.axis_names) if token_axes is None else tuple(token_axes)
    unknown = [a for a in axes if a not in mesh.axis_names]
    if unknown or ep_axis not in axes:
        raise ValueError(f"ep_routed_fn: token_axes must be mesh axes including {ep_axis!r}, got {axes}")
    ranks = mesh.shape[ep_axis]
    shards = 1
    for a in axes:
        shards *= mesh.shape[a]
    tok_spec, exp_spec = P(axes), P(ep_axis)
    dp_axes = tuple(a for a in axes if a != ep_axis)

    def fn(x: jax.Array, weights: jax.Array, indices: jax.Array, w1: jax.Array, w3: jax.Array,
           w2: jax.Array, *, placement: tuple[jax.Array, jax.Array] | None = None) -> jax.Array:
        t, e = x.shape[0], w1.shape[0]
        if t % shards:
            raise ValueError(f"ep_routed_fn: the token count ({t}) must be a multiple of the "
                             f"{shards} devices of mesh axes {axes}")
        if e % ranks:
            raise ValueError(f"ep_routed_fn: the expert count ({e}) must be a multiple of the EP "
                             f"size {ranks} (mesh axis {ep_axis!r})")
        # Worst case: every token of every EP rank lands on this rank; nothing can be dropped.
        worst = ranks * (t // shards)

        def local(*args):
            return ep_local_experts(*args[:6], num_experts=e, ep_axis=ep_axis,
                                    num_worst_tokens=worst, implementation=implementation, fp8=fp8,
                                    dp_axes=dp_axes, placement=args[6:] or None, token_axes=axes)

        extra = () if placement is None else tuple(placement)
        sm = _shard_map(local, mesh=mesh,
                        in_specs=(tok_spec, tok_spec, tok_spec, exp_spec, exp_spec, exp_spec)
                        + (P(),) * len(extra), out_specs=tok_spec)
        return sm(x, weights, indices, w1, w3, w2, *extra)

    # DeepSeekMoE hands it logical ids and the placement (routing per device), and the replica
    # gradient tying finds the slot layout here (dsjax.nn.moe.tie_expert_replica_grads).
    fn.routes_replicas = True
    fn.ep_mesh, fn.ep_axis = mesh, ep_axis
    return fn


def use_expert_parallelism(model, mesh: Mesh, **kwargs) -> int:
    """Switches every :class:`~dsjax.nn.moe.DeepSeekMoE` of ``model`` to :func:`ep_routed_fn`.

    Args:
        model: any NNX module graph (e.g. :class:`dsjax.nn.model.DeepSeekV3`).
        mesh, kwargs: passed to :func:`ep_routed_fn`; ``fp8`` defaults to each layer's
            ``cfg.use_fp8``, so an FP8 model keeps FP8 experts under EP.

    Returns:
        The number of MoE layers switched.
    """
    from flax import nnx  # pylint: disable=import-outside-toplevel
    from dsjax.nn.moe import DeepSeekMoE  # pylint: disable=import-outside-toplevel

    n = 0
    for _, node in nnx.iter_graph(model):
        if isinstance(node, DeepSeekMoE):
            node.routed_fn = ep_routed_fn(mesh, **{"fp8": bool(node.cfg.use_fp8), **kwargs})
            n += 1
    return n
