"""DeepSeekMoE layer: shared experts plus group-limited top-k routed experts.

The routed experts are computed by ``routed_experts_dense`` here (every expert on every token,
masked by the gating weights: exact, simple, fine for CPU-sized models), or, with
``cfg.use_fp8``, by ``routed_experts_fp8``: DeepSeek-V3's FP8 recipe (arXiv:2412.19437 §3.3) on
DeepGEMM's m-grouped contiguous layout (each (token, expert) pair becomes one row, rows sorted by
expert, each expert padded to 128 rows), so only the selected experts are computed. The
expert-parallel path (DeepEP dispatch/combine under shard_map, :mod:`dsjax.nn.ep`) plugs in at
``routed_fn`` and runs either of the two on the rows each rank receives.
The load-balancing bias and the observed expert load are NNX variables that are not parameters:
the optimizer never sees them, and ``apply_bias_update`` changes the bias between steps.

With ``cfg.n_redundant_experts > 0`` the layer follows DeepSeek-V3's deployment with EPLB
(report §3.4, https://github.com/deepseek-ai/EPLB): the routed weights live in
``P = E + n_redundant_experts`` *physical* slots, hot experts replicated, and the placement
(``phy2log [P]``, ``log2phy [E, P - E + 1]``, ``logcnt [E]``) is non-trainable state. Routing,
the bias and the load stay per *logical* expert (what EPLB balances); the chosen logical ids are
then mapped to physical slots by :func:`dsjax.eplb.replica_route`, which spreads each expert's
tokens evenly and deterministically over its replicas (under expert parallelism on each device's
own tokens, inside the EP body), and the routed experts (dense, FP8 or EP) run on the P slots
unchanged. Replicas are kept identical by :func:`tie_expert_replica_grads` (applied to the
gradients before the optimizer; with the slots split over an EP axis it exchanges only the
replicated slots' rows); :mod:`dsjax.train.rebalance` re-places them.
"""

from __future__ import annotations

import functools
from typing import Callable, Mapping

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, PartitionSpec as P

from dsjax.deep_gemm import fp8_grouped_linear, get_m_alignment_for_contiguous_layout
from dsjax.eplb import replica_route, round_robin_placement, tie_replica_grads
from dsjax.nn import router
from dsjax.nn.config import DeepSeekV3Config
from dsjax.nn.layers import MLP, linear_factory


class ExpertBias(nnx.Variable):
    """Selection bias of the auxiliary-loss-free balancing (not trained by gradients)."""


class ExpertLoad(nnx.Variable):
    """Tokens routed to each expert in the last forward pass (int32 [E])."""


class AuxLoss(nnx.Variable):
    """Sequence-wise balance loss of the last forward pass (scalar)."""


class ExpertPlacement(nnx.Variable):
    """EPLB placement of the routed experts on physical slots (int32; changed by rebalancing,
    never by gradients)."""


def routed_experts_dense(x: jax.Array, weights: jax.Array, indices: jax.Array, w1: jax.Array,
                         w3: jax.Array, w2: jax.Array) -> jax.Array:
    """Σ_k weight_k · expert_{idx_k}(x) for x [T, D], experts w1/w3 [E, D, I], w2 [E, I, D]."""
    e = w1.shape[0]
    combine = jnp.zeros((x.shape[0], e), jnp.float32).at[
        jnp.arange(x.shape[0])[:, None], indices].add(weights)
    h = jax.nn.silu(jnp.einsum("td,edi->tei", x, w1)) * jnp.einsum("td,edi->tei", x, w3)
    y = jnp.einsum("tei,eid->ted", h, w2)
    return jnp.einsum("ted,te->td", y.astype(jnp.float32), combine).astype(x.dtype)


def contiguous_layout(indices: jax.Array, num_experts: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """DeepGEMM's m-grouped contiguous layout for routed (token, expert) pairs.

    Every valid pair ``(t, k)`` (``0 <= indices[t, k] < num_experts``) gets one row; rows are
    grouped by expert in expert order, each expert's block starting at a multiple of 128
    (:func:`~dsjax.deep_gemm.get_m_alignment_for_contiguous_layout`) and padded with -1 rows.
    The row count is static: ``m_sum = 128·ceil((T·K + 127·E) / 128)`` bounds
    ``Σ_e 128·ceil(count_e / 128)`` for any routing, so no pair is ever dropped.

    Args:
        indices: int32 ``[T, K]`` expert ids; negative (or >= E) means "no expert".
        num_experts: E.

    Returns:
        ``(m_indices int32 [m_sum], row_token int32 [m_sum], pair_row int32 [T·K])``: each row's
        expert (-1 for padding), each row's source token (0 on padding rows), and each pair's row
        (``m_sum``, out of range, for invalid pairs).
    """
    align = get_m_alignment_for_contiguous_layout()
    t, k = indices.shape
    p, e = t * k, num_experts
    m_sum = align * (-(-(p + (align - 1) * e) // align))
    flat = indices.reshape(p).astype(jnp.int32)
    key = jnp.where((flat >= 0) & (flat < e), flat, e)              # invalid pairs sort last
    counts = jnp.zeros((e + 1,), jnp.int32).at[key].add(1)
    padded = (counts[:e] + align - 1) // align * align
    row_start = jnp.concatenate([jnp.cumsum(padded) - padded, jnp.array([m_sum], jnp.int32)])
    sorted_start = jnp.cumsum(counts) - counts                      # start of each expert when sorted
    order = jnp.argsort(key, stable=True).astype(jnp.int32)
    skey = key[order]
    rank = jnp.arange(p, dtype=jnp.int32) - sorted_start[skey]
    row_sorted = jnp.where(skey < e, row_start[skey] + rank, m_sum)
    pair_row = jnp.zeros((p,), jnp.int32).at[order].set(row_sorted)
    m_indices = jnp.full((m_sum,), -1, jnp.int32).at[pair_row].set(flat, mode="drop")
    row_token = jnp.zeros((m_sum,), jnp.int32).at[pair_row].set(
        jnp.arange(p, dtype=jnp.int32) // k, mode="drop")
    return m_indices, row_token, pair_row


def routed_experts_fp8(x: jax.Array, weights: jax.Array, indices: jax.Array, w1: jax.Array,
                       w3: jax.Array, w2: jax.Array, *, implementation: str = "auto") -> jax.Array:
    """Σ_k weight_k · expert_{idx_k}(x) with FP8 grouped GEMMs, only the selected experts computed.

    The pairs are laid out contiguously (:func:`contiguous_layout`), the three expert GEMMs run
    as :func:`dsjax.deep_gemm.fp8_grouped_linear` (FP8 Fprop, Dgrad and Wgrad with 1x128 / 128x128
    scales), and each pair's output row is gathered back and weighted in float32. Gradients flow
    to ``x``, the gating ``weights`` (zero for invalid pairs) and the expert weights.

    Args:
        x: float32 or bfloat16 ``[T, D]``.
        weights: float32 ``[T, K]`` gating weights.
        indices: int32 ``[T, K]`` expert ids; negative means "no expert" (contributes nothing).
        w1, w3: ``[E, D, I]``; w2: ``[E, I, D]`` (x's dtype).
        implementation: DeepGEMM implementation (``"auto"`` | ``"cuda"`` | ``"cpu"`` | ``"reference"``).

    Returns:
        ``[T, D]`` in x's dtype; equal to :func:`routed_experts_dense` up to FP8 rounding.
    """
    t, k = indices.shape
    e = w1.shape[0]
    m_indices, row_token, pair_row = contiguous_layout(indices, e)
    xc = jnp.where((m_indices >= 0)[:, None], x[row_token], 0).astype(x.dtype)
    gl = functools.partial(fp8_grouped_linear, m_indices=m_indices, implementation=implementation)
    h = jax.nn.silu(gl(xc, w1)) * gl(xc, w3)
    yc = gl(h, w2)                                                   # [m_sum, D], padding rows 0
    valid = (pair_row < yc.shape[0]).reshape(t, k)
    y = yc[jnp.minimum(pair_row, yc.shape[0] - 1)].reshape(t, k, -1).astype(jnp.float32)
    w = jnp.where(valid, weights.astype(jnp.float32), 0.0)
    return jnp.einsum("tkd,tk->td", y, w).astype(x.dtype)


class DeepSeekMoE(nnx.Module):
    """Shared experts + routed experts with DeepSeek-V3 routing.

    Routed weights ``w1``/``w3`` ``[P, D, I]`` and ``w2`` ``[P, I, D]`` with ``P =
    cfg.n_physical_experts`` (= E without redundant experts); with redundant experts the
    placement variables ``phy2log``, ``log2phy``, ``logcnt`` (:class:`ExpertPlacement`) start as
    :func:`dsjax.eplb.round_robin_placement` and are None otherwise.

    Args:
        cfg: model configuration (experts, groups, routing scale, balance settings).
        rngs: parameter initialization.
        routed_fn: computes the routed experts from (x [T, D], weights [T, K], indices [T, K],
            w1, w3, w2) with indices in physical slots. With redundant experts the layer maps its
            logical ids to slots by :func:`~dsjax.eplb.replica_route` first, unless the function
            has the attribute ``routes_replicas = True`` (the expert-parallel ones of
            :mod:`dsjax.nn.ep` and :mod:`dsjax.train.pipeline`): it then gets the logical ids
            and ``placement=(log2phy, logcnt)`` and routes each device's tokens itself.
            Defaults to :func:`routed_experts_fp8` when ``cfg.use_fp8`` (the shared experts are
            then :class:`~dsjax.nn.fp8.Fp8Linear` too), else :func:`routed_experts_dense`. The
            router gate stays in high precision either way.
    """

    def __init__(self, cfg: DeepSeekV3Config, *, rngs: nnx.Rngs,
                 routed_fn: Callable[..., jax.Array] | None = None):
        e, d, i = cfg.n_routed_experts, cfg.dim, cfg.moe_inter_dim
        init = nnx.initializers.lecun_normal()
        self.gate = nnx.Param(init(rngs.params(), (d, e), jnp.float32))
        w1 = init(rngs.params(), (e, d, i), jnp.float32)
        w3 = init(rngs.params(), (e, d, i), jnp.float32)
        w2 = init(rngs.params(), (e, i, d), jnp.float32)
        if cfg.n_redundant_experts:
            # The logical experts are drawn exactly as without redundancy, then copied into their
            # slots: the layer computes the same function as the un-replicated one.
            phy2log, log2phy, logcnt = round_robin_placement(e, cfg.n_physical_experts)
            w1, w3, w2 = w1[phy2log], w3[phy2log], w2[phy2log]
            self.phy2log = ExpertPlacement(phy2log)
            self.log2phy = ExpertPlacement(log2phy)
            self.logcnt = ExpertPlacement(logcnt)
        else:
            self.phy2log = self.log2phy = self.logcnt = None
        self.w1 = nnx.Param(w1)
        self.w3 = nnx.Param(w3)
        self.w2 = nnx.Param(w2)
        self.bias = ExpertBias(jnp.zeros((e,), jnp.float32))
        self.load = ExpertLoad(jnp.zeros((e,), jnp.int32))
        self.aux_loss = AuxLoss(jnp.zeros((), jnp.float32))
        self.shared = (MLP(d, cfg.n_shared_experts * i, rngs=rngs, linear=linear_factory(cfg, rngs))
                       if cfg.n_shared_experts else None)
        self.cfg = cfg
        self.routed_fn = routed_fn or (routed_experts_fp8 if cfg.use_fp8 else routed_experts_dense)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x [B, S, D] -> [B, S, D]; records the expert load and the balance loss."""
        cfg = self.cfg
        b, s, d = x.shape
        flat = x.reshape(b * s, d)
        r = router.route(flat @ self.gate[...].astype(x.dtype), self.bias[...],
                         topk=cfg.n_activated_experts, n_groups=cfg.n_expert_groups,
                         topk_groups=cfg.n_limited_groups, route_scale=cfg.route_scale,
                         score_func=cfg.score_func)
        self.load[...] = jax.lax.stop_gradient(router.expert_counts(r.indices, cfg.n_routed_experts))
        if cfg.seq_aux_alpha > 0:
            self.aux_loss[...] = router.sequence_balance_loss(
                r.scores.reshape(b, s, -1), r.indices.reshape(b, s, -1), alpha=cfg.seq_aux_alpha)
        experts = tuple(w[...].astype(x.dtype) for w in (self.w1, self.w3, self.w2))
        if self.phy2log is None:
            y = self.routed_fn(flat, r.weights, r.indices, *experts)
        elif getattr(self.routed_fn, "routes_replicas", False):
            # Expert-parallel functions map logical ids to replicas on each device's own tokens
            # (dsjax.nn.ep.ep_local_experts): no global sort, and the remainders rotate per device.
            y = self.routed_fn(flat, r.weights, r.indices, *experts,
                               placement=(self.log2phy[...], self.logcnt[...]))
        else:
            slots = replica_route(r.indices, self.log2phy[...], self.logcnt[...])
            y = self.routed_fn(flat, r.weights, slots, *experts)
        y = y.reshape(b, s, d)
        if self.shared is not None:
            y = y + self.shared(x)
        return y

    def apply_bias_update(self) -> None:
        """Moves the selection bias towards balance from the load of the last forward pass."""
        self.bias[...] = router.update_bias(self.bias[...], self.load[...], self.cfg.bias_update_speed)


def moe_layers(model: nnx.Module) -> list[tuple[tuple, "DeepSeekMoE"]]:
    """``(path, layer)`` of every :class:`DeepSeekMoE` of ``model`` in graph order (the order of
    the loop's load tracker), ``path`` being the tuple of attribute names / list indices."""
    return [(tuple(path), node) for path, node in nnx.iter_graph(model)
            if isinstance(node, DeepSeekMoE)]


ROUTED_WEIGHTS = ("w1", "w3", "w2")


def key_path(path: tuple) -> tuple:
    """A ``jax.tree_util`` key path as plain keys (``.value`` of NNX variables dropped), so it
    compares with the paths of :func:`moe_layers`."""
    keys = tuple(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k))) for k in path)
    return keys[:-1] if keys and keys[-1] == "value" else keys


def routed_weight_owner(path: tuple, layers: list[tuple[tuple, "DeepSeekMoE"]]) -> int | None:
    """Index into ``layers`` of the MoE layer whose routed weight (or its optimizer moment) sits
    at state path ``path``, or None: the one test of "is this leaf a routed expert weight" that
    the training loop's placement, the pipeline's parameter specs, the rebalancer, the gradient
    tying and the expert-counted norm all use.

    Args:
        path: a ``jax.tree_util`` key path or plain keys (normalized by :func:`key_path`).
        layers: ``(path, layer)`` pairs as :func:`moe_layers` returns them (only the paths are
            read); paths relative to a sub-module match that sub-module's states.

    Returns:
        The index of the longest layer path that, followed by ``w1``/``w3``/``w2``, ends
        ``path`` (an optimizer moment's path ends with its parameter's path), or None.
    """
    path = key_path(path)
    if not path or path[-1] not in ROUTED_WEIGHTS:
        return None
    best, best_len = None, -1
    for i, (p, _) in enumerate(layers):
        n = len(p)
        if len(path) >= n + 1 and tuple(path[-n - 1:-1]) == tuple(p) and n > best_len:
            best, best_len = i, n
    return best


def expert_global_norm(model: nnx.Module, grads: nnx.State) -> jax.Array:
    """Global L2 norm of a gradient state counting every logical expert once.

    After :func:`tie_expert_replica_grads` each replica slot holds its expert's whole gradient,
    so a plain global norm (``optax.global_norm``) would count an expert with ``c`` replicas ``c``
    times and clip a model with redundant experts harder than the same model without. Here a
    routed-weight slot's squared norm is divided by its expert's replica count; without
    redundant experts this is the plain global norm.

    Args:
        model: the model the gradients were taken of (its placement variables give the counts).
        grads: its gradient state, replica gradients tied.

    Returns:
        float32 scalar.
    """
    layers = moe_layers(model)
    total = jnp.zeros((), jnp.float32)
    for path, g in jax.tree_util.tree_flatten_with_path(grads)[0]:
        sq = jnp.square(jnp.asarray(g, jnp.float32))
        i = routed_weight_owner(path, layers)
        moe = layers[i][1] if i is not None else None
        if moe is not None and moe.phy2log is not None:
            copies = moe.logcnt[...][moe.phy2log[...]].astype(jnp.float32)  # [P] replicas of each slot's expert
            total = total + jnp.sum(jnp.sum(sq.reshape(sq.shape[0], -1), axis=1) / copies)
        else:
            total = total + jnp.sum(sq)
    return jnp.sqrt(total)


def tie_expert_replica_grads(model: nnx.Module, grads: nnx.State, *,
                             mesh: Mesh | Mapping[tuple, Mesh | None] | None = None,
                             ep_axis: str = "ep") -> nnx.State:
    """Applies :func:`dsjax.eplb.tie_replica_grads` to the routed-weight gradients of every MoE
    layer with redundant experts (a no-op, returning ``grads``, when there is none).

    Call it inside the training step between ``nnx.value_and_grad`` and ``opt.update``: the
    replicas of each logical expert then receive the same (summed) gradient and stay identical.

    When the slots are split over an expert-parallel mesh axis, the sharded form runs (under
    ``shard_map``, slots ``P(ep_axis)``): only the replicated experts' slots are exchanged, by one
    ``psum`` of a ``[min(P, 2·(P - E)), ...]`` buffer per layer, instead of XLA reducing the full
    ``[P, ...]`` gradients across the EP ranks; the result is the same. A layer's mesh is
    ``mesh`` (or its entry in a ``mesh`` mapping) if given, else the one of the layer's
    ``routed_fn`` when that is an expert-parallel function of :func:`dsjax.nn.ep.ep_routed_fn`
    (its ``ep_mesh`` / ``ep_axis`` attributes), else none: the global segment sum, which is also
    the right form for gradients that are replicated anyway (no communication at all).

    Args:
        model: the model the gradients were taken of.
        grads: the gradient state (``nnx.State`` of the model's parameters, as returned by
            ``nnx.grad``).
        mesh: the mesh whose ``ep_axis`` splits the routed weights' slot axis (every other mesh
            axis holds them replicated); or a mapping from MoE layer path (as in
            :func:`moe_layers`) to such a mesh or None (global form; also for absent paths); or
            None (see above).
        ep_axis: that axis's name when ``mesh`` is given.

    Returns:
        The gradient state with tied routed-weight gradients.
    """
    layers = moe_layers(model)
    if not any(m.phy2log is not None for _, m in layers):
        return grads
    leaves, treedef = jax.tree_util.tree_flatten_with_path(grads)
    out = [g for _, g in leaves]
    owned: dict[int, list[int]] = {}
    for j, (path, _) in enumerate(leaves):
        i = routed_weight_owner(path, layers)
        if i is not None and layers[i][1].phy2log is not None:
            owned.setdefault(i, []).append(j)
    # Untied replicas would drift apart silently: every replicated layer's three weights must
    # have been found (grads of another module or filter than the model's parameters are not).
    found, want = sum(map(len, owned.values())), 3 * sum(m.phy2log is not None for _, m in layers)
    if found != want:
        raise ValueError(f"tie_expert_replica_grads: grads must be the gradient state of model's "
                         f"parameters; found {found} of the {want} routed-weight gradients of its "
                         f"layers with redundant experts")
    for i, js in owned.items():
        moe = layers[i][1]
        if isinstance(mesh, Mapping):
            m, axis = mesh.get(layers[i][0]), ep_axis
        elif mesh is not None:
            m, axis = mesh, ep_axis
        else:
            m, axis = getattr(moe.routed_fn, "ep_mesh", None), getattr(moe.routed_fn, "ep_axis", None)
        phy2log, gs = moe.phy2log[...], tuple(out[j] for j in js)
        if m is None:
            tied = tie_replica_grads(gs, phy2log)
        else:
            tied = _sharded_tie(m, axis, moe.cfg.n_routed_experts)(gs, phy2log)
        for j, t in zip(js, tied):
            out[j] = t
    return jax.tree_util.tree_unflatten(treedef, out)


@functools.cache
def _sharded_tie(mesh: Mesh, axis: str, num_experts: int) -> Callable[..., tuple]:
    """``fn(grads tuple of [P, ...], phy2log [P])``: the sharded replica tie over ``axis``."""
    body = functools.partial(tie_replica_grads, axis_name=axis, num_experts=num_experts)
    return jax.shard_map(body, mesh=mesh, in_specs=(P(axis), P()), out_specs=P(axis))
