"""Applying EPLB placements to a model in training: re-place the redundant experts, move the
routed weights and their optimizer moments, and report the balance before and after.

DeepSeek-V3 (arXiv:2412.19437 §3.4) re-solves the expert placement periodically from the load
observed over a recent window and moves the expert weights to their new physical slots; EPLB
(https://github.com/deepseek-ai/EPLB) is the solver (:func:`dsjax.eplb.rebalance_experts`).
Here, for every :class:`~dsjax.nn.moe.DeepSeekMoE` with redundant experts:

1. solve a placement of its ``P = E + n_redundant_experts`` slots on the ``ep`` ranks from the
   tracker's load of its logical experts (all layers in one vmapped solve);
2. new slot ``j`` takes a copy of an old slot holding logical expert ``new_phy2log[j]``
   (:func:`dsjax.eplb.relayout_expert_weights`), for the weights ``w1``/``w3``/``w2`` and for
   every optimizer-state leaf of the same path and slot count (AdamW's ``mu`` and ``nu``), so
   training continues exactly as if nothing had moved. Slot-sharded arrays (``P(ep)``, the
   layout :mod:`dsjax.nn.ep` computes with) move by collective permutes of their shards inside
   ``shard_map``; others by a gather;
3. update the placement variables (``phy2log``, ``log2phy``, ``logcnt``).

Replicas of an expert are identical (:func:`~dsjax.nn.moe.tie_expert_replica_grads`), and
routing stays logical, so the model computes the same function before and after: each token's
expert output comes from another copy of the same weights.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from dsjax import eplb
from dsjax.eplb.online import rank_loads
from dsjax.nn.moe import DeepSeekMoE, moe_layers, routed_weight_owner

_OP = "rebalance_model"


def placement(model: nnx.Module) -> jax.Array:
    """int32 ``[L, P]``: the current ``phy2log`` of every MoE layer (graph order).

    Raises:
        ValueError: the model has no MoE layer, or one without redundant experts.
    """
    return jnp.stack([m.phy2log[...] for _, m in _placed_layers(model, op="placement")])


def _placed_layers(model: nnx.Module, *, op: str) -> list[tuple[tuple, DeepSeekMoE]]:
    layers = moe_layers(model)
    if not layers:
        raise ValueError(f"{op}: the model has no DeepSeekMoE layer")
    bare = [".".join(map(str, p)) for p, m in layers if m.phy2log is None]
    if bare:
        raise ValueError(f"{op}: every MoE layer needs redundant experts (config "
                         f"n_redundant_experts > 0) to hold a placement; layers {bare} have none")
    return layers


def _label(path: tuple) -> str:
    """'layer 3' for ``('layers', 3, 'ffn')``, 'MTP block' for the MTP head's MoE."""
    if len(path) >= 2 and path[0] == "layers":
        return f"layer {path[1]}"
    if path and path[0] == "mtp":
        return "MTP block"
    return ".".join(map(str, path))


@functools.cache
def _ring_mover(mesh: jax.sharding.Mesh, axis: str) -> Callable[..., jax.Array]:
    """Jitted relayout of a ``P(axis)``-sharded slot array by ring permutes under shard_map."""
    body = functools.partial(eplb.relayout_expert_weights, axis_name=axis)
    return jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(P(axis), P(), P()),
                                 out_specs=P(axis)))


_gather_mover = jax.jit(eplb.relayout_expert_weights)


def _move(x: jax.Array, old: jax.Array, new: jax.Array, ep_axis: str) -> jax.Array:
    """``x [P, ...]`` in the new slot order, keeping its sharding."""
    sh = getattr(x, "sharding", None)
    spec = tuple(sh.spec) if isinstance(sh, NamedSharding) else ()
    if spec and spec[0] == ep_axis and all(s is None for s in spec[1:]):
        out = _ring_mover(sh.mesh, ep_axis)(x, old, new)
    else:
        out = _gather_mover(x, old, new)
    return jax.device_put(out, sh) if sh is not None else out


def _relayout_state(obj: nnx.Module, layers: list[tuple[tuple, DeepSeekMoE]],
                    maps: list[tuple[jax.Array, jax.Array] | None], num_slots: int,
                    ep_axis: str) -> int:
    """Moves every routed-weight-shaped leaf of ``obj``'s state (layers whose map is None keep
    theirs); returns how many leaves belong to the layers."""
    found = 0

    def visit(path, x):
        nonlocal found
        i = routed_weight_owner(path, layers)
        if i is None or not hasattr(x, "shape") or x.ndim < 1 or x.shape[0] != num_slots:
            return x
        found += 1
        return x if maps[i] is None else _move(x, maps[i][0], maps[i][1], ep_axis)

    state = jax.tree_util.tree_map_with_path(visit, nnx.state(obj))
    nnx.update(obj, state)
    return found


def _current(layers: list[tuple[tuple, DeepSeekMoE]]) -> eplb.EplbResult:
    """The layers' placement state stacked like a solver result ``[L, ...]``."""
    return eplb.EplbResult(*(jnp.stack([getattr(m, k)[...] for _, m in layers])
                             for k in ("phy2log", "log2phy", "logcnt")))


def _better(new_max: jax.Array, cur_max: jax.Array) -> jax.Array:
    """bool [L]: the new busiest-rank load is below the current one by more than float32 noise
    (a rank sums at most a few hundred replica loads: ~1e-5 relative is far above rounding)."""
    return new_max < cur_max * (1 - 1e-5)


def _set_like(var: nnx.Variable, value: jax.Array) -> None:
    """Assigns keeping the variable's sharding, so the jitted step sees the same input layout."""
    old = var[...]
    sh = getattr(old, "sharding", None)
    var[...] = jax.device_put(value.astype(old.dtype), sh) if sh is not None else value


def rebalance_model(model: nnx.Module, opt: nnx.Optimizer | None, load: jax.Array, *,
                    ep_size: int, ep_axis: str = "ep", num_nodes: int = 1, refine_steps: int = 0,
                    only_if_better: bool = True, step: int = 0, window: int = 1,
                    log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Re-places the routed experts of every MoE layer from the observed load; applies it.

    Args:
        model: a model whose :class:`~dsjax.nn.moe.DeepSeekMoE` layers all have redundant
            experts (``cfg.n_redundant_experts > 0``); changed in place.
        opt: its optimizer (``nnx.Optimizer``), whose state leaves at the routed weights' paths
            with leading axis P (AdamW's moments) move with the weights; None for no optimizer.
        load: float ``[L, E]`` tokens per logical expert, one row per MoE layer in graph order
            (``ExpertLoadTracker.load()`` of the training loop).
        ep_size: expert-parallel ranks; must divide P and E. Rank r holds slots
            ``[r·P/ep, (r+1)·P/ep)``.
        ep_axis: the mesh axis name the slot-sharded arrays are split over.
        num_nodes: nodes for the hierarchical policy (``cfg.n_expert_groups`` must be a multiple
            of it, else EPLB's global policy runs).
        refine_steps: :func:`~dsjax.eplb.rebalance_experts` local-search steps (0 = DeepSeek's
            greedy exactly).
        only_if_better: a layer takes the new placement only if it lowers the load of its most
            loaded EP rank under ``load`` (so ``imbalance_after <= imbalance_before`` always);
            False applies every new placement, as DeepSeek's deployment does.
        step, window: the training step and the tracker window, for the report.
        log: optional sink for a one-line summary.

    Returns:
        The report record: ``step``, ``first_step`` (first step of the load window),
        ``imbalance_before`` / ``imbalance_after`` (mean over layers of max/mean EP-rank load
        under the placement in use and the new one), ``imbalance_identity`` (one replica per
        expert, no EPLB), ``replicas`` (P), ``rank_load_before`` / ``rank_load_after`` (float
        ``[L][ep]``), ``layers`` (labels), ``moved_slots`` (slots whose expert changed, all
        layers), ``applied`` (per layer: whether its placement was replaced).

    Raises:
        ValueError: no MoE layer, a layer without redundant experts, a load of the wrong shape,
            or sizes EPLB cannot place.
    """
    layers = _placed_layers(model, op=_OP)
    cfg = layers[0][1].cfg
    e, num_slots = cfg.n_routed_experts, cfg.n_physical_experts
    if any(m.cfg.n_physical_experts != num_slots or m.cfg.n_routed_experts != e
           for _, m in layers):
        raise ValueError(f"{_OP}: every MoE layer must have the same expert and slot counts")
    load = jnp.asarray(load)
    if load.shape != (len(layers), e):
        raise ValueError(f"{_OP}: load must have shape [MoE layers, experts] = "
                         f"{(len(layers), e)}, got {tuple(load.shape)}")
    if not isinstance(ep_size, int) or ep_size < 1 or num_slots % ep_size or e % ep_size:
        raise ValueError(f"{_OP}: ep_size must be a positive int dividing the {e} experts and "
                         f"the {num_slots} slots, got {ep_size!r}")
    res = eplb.rebalance_experts(load, num_slots, cfg.n_expert_groups, num_nodes, ep_size,
                                 refine_steps=refine_steps)
    old = placement(model)
    cur = eplb.balance_stats(load, old, ep_size)
    if only_if_better:
        # A layer keeps its placement unless the new one lowers its busiest rank's load (by more
        # than float32 noise): moving weights for nothing costs time and can even lose balance,
        # the greedy being a heuristic and the current placement a solve of another window.
        better = _better(eplb.balance_stats(load, res.phy2log, ep_size).max_load, cur.max_load)
        res = eplb.EplbResult(*(jnp.where(better.reshape((-1,) + (1,) * (n.ndim - 1)), n, o)
                                for n, o in zip(res, _current(layers))))
    before, after = np.asarray(old), np.asarray(res.phy2log)
    applied = [bool((before[i] != after[i]).any()) for i in range(len(layers))]
    maps = [(old[i], res.phy2log[i]) if applied[i] else None for i in range(len(layers))]
    found = _relayout_state(model, layers, maps, num_slots, ep_axis)
    if found != 3 * len(layers):  # the parameters themselves must all have been found
        raise RuntimeError(f"{_OP}: found {found} routed weights for {len(layers)} MoE layers")
    if opt is not None:
        _relayout_state(opt, layers, maps, num_slots, ep_axis)
    for i, (_, m) in enumerate(layers):
        _set_like(m.phy2log, res.phy2log[i])
        _set_like(m.log2phy, res.log2phy[i])
        _set_like(m.logcnt, res.logcnt[i])

    stats = {k: eplb.balance_stats(load, p, ep_size) for k, p in
             (("before", old), ("after", res.phy2log), ("identity", None))}
    rec = {"step": step, "first_step": max(1, step - window + 1),
           "imbalance_before": float(np.mean(stats["before"].imbalance)),
           "imbalance_after": float(np.mean(stats["after"].imbalance)),
           "imbalance_identity": float(np.mean(stats["identity"].imbalance)),
           "replicas": num_slots,
           "rank_load_before": np.asarray(rank_loads(load, old, ep_size)).tolist(),
           "rank_load_after": np.asarray(rank_loads(load, res.phy2log, ep_size)).tolist(),
           "layers": [_label(p) for p, _ in layers],
           "moved_slots": int(np.sum(before != after)), "applied": applied}
    if log is not None:
        log(f"eplb  step {step}: EP-rank imbalance over the last {window} steps "
            f"{rec['imbalance_before']:.3f} -> {rec['imbalance_after']:.3f} (no EPLB "
            f"{rec['imbalance_identity']:.3f}), {num_slots} slots on {ep_size} ranks, "
            f"{rec['moved_slots']} slots re-assigned")
    return rec
