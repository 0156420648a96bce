"""Pipeline-parallel training step: a DeepSeek-V3 model over a ``(pp, dp, ep)`` mesh.

DeepSeek-V3 trains with 16-way pipeline parallelism scheduled by DualPipe, 64-way expert
parallelism and ZeRO-1 data parallelism (arXiv:2412.19437 §3.2). This module runs the same
composition on a JAX mesh:

* the embedding and the dense layers (``n_dense_layers``) run before the pipeline, data-parallel
  over ``dp`` x ``ep`` (each pipeline rank computes them for the whole batch);
* the MoE layers are the pipeline: split into ``schedule.num_stages`` equal stages run by
  :class:`dsjax.dualpipe.DualPipe` over the ``pp`` axis (``dualpipe`` by default: two copies of
  every stage, micro-batches entering from both ends); inside a stage the rows of a micro-batch
  are split over ``dp`` x ``ep`` and the routed experts run expert-parallel through DeepEP
  (:func:`dsjax.nn.ep.ep_local_experts`), each device holding its ``E/ep`` experts;
* the last stage's loss function holds the final norm, the output head and the depth-1 MTP
  module, whose MoE block is expert-parallel too: the executor hands the loss function its
  routed weights split ``P("ep")`` (each device its ``P/ep`` slots, as in the stages) and returns
  their gradients split the same way, so no device ever holds the whole ``[P, ...]`` MTP expert
  array or its gradient.

Gradients are those of the same loss as :func:`dsjax.nn.model.lm_loss` on the whole batch (the
mean over micro-batches of their token means, the sequence-wise balance losses included): the
executor returns the gradients of the stages and of the loss parameters, plus the gradient of its
inputs, which flows back through the embedding and the dense layers with ``jax.vjp``. The expert
loads every MoE layer counted come back as stage statistics, so the auxiliary-loss-free bias
update and EPLB see the whole batch.

Limits: the executor runs ticks in lockstep (see :mod:`dsjax.dualpipe.executor`); the layers
before the pipeline are repeated on every pipeline rank; ``n_layers - n_dense_layers`` must be a
multiple of the schedule's stage count.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, PartitionSpec as P

from dsjax.dualpipe import DualPipe, make_schedule
from dsjax.nn.ep import ep_local_experts
from dsjax.nn.layers import shard_fp8_linears
from dsjax.nn.model import DeepSeekV3, LossParts
from dsjax.nn.moe import DeepSeekMoE, moe_layers, routed_weight_owner


@functools.cache
def local_routed_fn(ep_axis: str, ep_size: int, implementation: str, fp8: bool,
                    token_axes: tuple[str, ...] = ("dp", "ep")):
    """A ``routed_fn`` for :class:`DeepSeekMoE` inside a stage (ep_axis already bound): the
    weights it gets are this rank's ``E/ep`` experts; with redundant experts it gets logical ids
    and the placement and routes this device's tokens to replicas, salted by the device's index
    over ``token_axes`` (the same code as the flat EP step, :func:`dsjax.nn.ep.ep_local_experts`).
    Cached so equal settings share one function (the model's graph, hence the step's
    compilation, stays the same across runs)."""
    def fn(x, weights, indices, w1, w3, w2, *, placement=None):
        # dp_axes=(): the executor sums the weight gradients over the data axes itself.
        return ep_local_experts(x, weights, indices, w1, w3, w2, num_experts=w1.shape[0] * ep_size,
                                ep_axis=ep_axis, num_worst_tokens=ep_size * x.shape[0],
                                implementation=implementation, fp8=fp8, dp_axes=(),
                                placement=placement, token_axes=token_axes)
    fn.routes_replicas = True
    return fn


class Pipeline:
    """How one model is cut and scheduled (static: hashable by identity, built once per run).

    Args:
        mesh: mesh with axes ``pp``, ``dp``, ``ep`` (``dp`` may have size 1).
        cfg: the model's :class:`~dsjax.nn.config.DeepSeekV3Config`.
        schedule: ``dualpipe`` | ``dualpipev`` | ``zb1p`` | ``1f1b`` | ``gpipe``.
        num_microbatches: micro-batches per step (DualPipe: even and >= 2·pp).
        implementation: DeepEP's local kernels.

    Raises:
        ValueError: the MoE layers do not split into the schedule's stages, or the schedule
            rejects (pp, num_microbatches); the message names the numbers.
    """

    def __init__(self, mesh: Mesh, cfg, *, schedule: str = "dualpipe", num_microbatches: int = 4,
                 implementation: str = "auto"):
        for a in ("pp", "dp", "ep"):
            if a not in mesh.shape:
                raise ValueError(f"Pipeline: mesh must have axes pp, dp, ep; got {tuple(mesh.shape)}")
        self.mesh, self.cfg = mesh, cfg
        self.schedule = make_schedule(schedule, mesh.shape["pp"], num_microbatches)
        n_moe = cfg.n_layers - cfg.n_dense_layers
        stages = self.schedule.num_stages
        if n_moe < stages or n_moe % stages:
            raise ValueError(f"Pipeline: the {n_moe} MoE layers (n_layers {cfg.n_layers} - n_dense_layers "
                             f"{cfg.n_dense_layers}) must split evenly into the {stages} stages of "
                             f"{schedule} with pp={mesh.shape['pp']}")
        self.per_stage = n_moe // stages
        self.data_axes = ("dp", "ep")
        self.num_microbatches = num_microbatches
        self.routed_fn = local_routed_fn("ep", mesh.shape["ep"], implementation, bool(cfg.use_fp8),
                                         self.data_axes)
        self._executors: dict = {}  # per (block graph, loss-module graphs): one executor, one compilation

    def prepare(self, model: DeepSeekV3) -> None:
        """Switches the model's MoE layers to the in-stage EP function and its pre-pipeline FP8
        linears to data-parallel execution. Call once, before the first step."""
        for _, node in nnx.iter_graph(model):
            if isinstance(node, DeepSeekMoE):
                node.routed_fn = self.routed_fn
        for layer in list(model.layers)[:self.cfg.n_dense_layers]:
            shard_fp8_linears(layer, self.mesh, self.data_axes)

    # --------------------------------------------------------------- the step's pieces
    def _stage_fn(self, gd_block):
        def stage_fn(p, x):
            s = x.shape[1]
            pos = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), x.shape[:2])
            aux, loads = jnp.float32(0), []
            for params, rest in p:
                blk = nnx.merge(gd_block, params, rest)
                x = blk(x, pos)
                aux = aux + blk.ffn.aux_loss[...]
                loads.append(blk.ffn.load[...])
            return x, aux, {"load": jnp.stack(loads)}
        return stage_fn

    def _loss_fn(self, gds):
        cfg = self.cfg

        def loss_fn(lp, y, tokens):
            """y: the last stage's output for this device's rows; tokens int32 [rows, S+1]."""
            # Fresh Variable objects in this trace (the executor calls this under lax.cond, and NNX
            # refuses to mutate a Variable created at an outer trace level, e.g. an MoE's load).
            params, rest = jax.tree.map(lambda a: a, lp)
            norm = nnx.merge(gds["norm"], params["norm"])
            head = nnx.merge(gds["head"], params["head"])
            embed = nnx.merge(gds["embed"], params["embed"])
            h = norm(y)
            lm = optax.softmax_cross_entropy_with_integer_labels(
                head(h).astype(jnp.float32), tokens[:, 1:]).mean()
            stats = {"lm": lm, "mtp": jnp.float32(0), "balance": jnp.float32(0),
                     "mtp_load": jnp.zeros((cfg.n_routed_experts,), jnp.int32)}
            loss = lm
            if "mtp" in params:
                mtp = nnx.merge(gds["mtp"], params["mtp"], rest["mtp"])
                s = y.shape[1]
                pos = jnp.broadcast_to(jnp.arange(s - 1, dtype=jnp.int32), (y.shape[0], s - 1))
                nxt = embed(tokens[:, 1:-1]).astype(y.dtype)
                hm = mtp(h[:, :-1], nxt, pos)
                mtp_loss = optax.softmax_cross_entropy_with_integer_labels(
                    head(hm).astype(jnp.float32), tokens[:, 2:]).mean()
                balance = mtp.block.ffn.aux_loss[...]
                loss = lm + cfg.mtp_loss_weight * mtp_loss + balance
                stats = {"lm": lm, "mtp": mtp_loss, "balance": balance, "mtp_load": mtp.block.ffn.load[...]}
            return loss, stats
        return loss_fn

    def _executor(self, gd_block, gds, block_moes: tuple[tuple, ...], mtp_moes: tuple[tuple, ...] = ()) -> DualPipe:
        """``block_moes``: the paths of the MoE layers inside one block (``(("ffn",),)``);
        ``mtp_moes``: those inside the MTP module (``(("block", "ffn"),)``), or none."""
        key = (gd_block, tuple(sorted(gds.items(), key=lambda kv: kv[0])), block_moes, mtp_moes)
        if key not in self._executors:
            owners = [(p, None) for p in block_moes]
            # the loss parameters' paths run (params | rest, "mtp", *layer path, weight)
            lp_owners = [(("mtp",) + p, None) for p in mtp_moes]

            def specs(path, leaf):  # a stage's routed weights are split over ep like the model's
                return P("ep") if routed_weight_owner(path, owners) is not None else None

            def lp_specs(path, leaf):  # and so are the MTP block's, in the loss function
                return P("ep") if routed_weight_owner(path, lp_owners) is not None else None

            self._executors[key] = DualPipe(self._stage_fn(gd_block), self._loss_fn(gds), schedule=self.schedule,
                                            mesh=self.mesh, data_axes=self.data_axes, param_specs=specs,
                                            with_stats=True, loss_param_specs=lp_specs)
        return self._executors[key]

    # --------------------------------------------------------------- one step
    def loss_and_grads(self, model: DeepSeekV3, tokens: jax.Array) -> tuple[LossParts, Any, "StepStats"]:
        """The loss parts, the gradient State of ``nnx.state(model, nnx.Param)`` and the step's
        expert loads, for tokens int32 ``[B, S+1]`` (call inside ``nnx.jit``).

        ``B`` must be a multiple of ``num_microbatches`` x the ``dp·ep`` devices. Micro-batch ``m``
        takes rows ``m, m + n, m + 2n, ...``, so each device's share of the batch (split over
        ``dp`` x ``ep``) feeds every micro-batch without communication.
        """
        cfg, n = self.cfg, self.num_microbatches
        b = tokens.shape[0]
        shards = self.mesh.shape["dp"] * self.mesh.shape["ep"]
        if b % (n * shards):
            raise ValueError(f"Pipeline: the batch ({b} rows) must be a multiple of num_microbatches={n} "
                             f"x the {shards} devices of dp x ep")
        nd, k = cfg.n_dense_layers, self.per_stage
        gd, params, rest = nnx.split(model, nnx.Param, ...)
        layers = list(range(nd, cfg.n_layers))
        gd_block = nnx.graphdef(model.layers[nd])
        gds = {name: nnx.graphdef(getattr(model, name)) for name in ("norm", "head", "embed")}
        has_mtp = model.mtp is not None
        if has_mtp:
            gds["mtp"] = nnx.graphdef(model.mtp)
        names = ["norm", "head", "embed"] + (["mtp"] if has_mtp else [])

        def extract(params):
            stages = [tuple(params["layers"][layers[s * k + i]] for i in range(k))
                      for s in range(self.schedule.num_stages)]
            return stages, {name: params[name] for name in names}

        stage_params, lp_params = extract(params)
        stage_args = [tuple((p, rest["layers"][layers[s * k + i]]) for i, p in enumerate(sp))
                      for s, sp in enumerate(stage_params)]
        lp_rest = {"mtp": rest["mtp"]} if has_mtp else {}

        inputs = tokens[:, :-1]
        s_len = inputs.shape[1]

        def pre(params):
            m = nnx.merge(gd, params, rest)
            pos = jnp.broadcast_to(jnp.arange(s_len, dtype=jnp.int32), inputs.shape)
            x = m.embed(inputs).astype(jnp.dtype(cfg.dtype))
            for layer in list(m.layers)[:nd]:
                x = layer(x, pos)
            return x

        x, pre_vjp = jax.vjp(pre, params)

        def to_mb(a):  # [B, ...] -> [n, B/n, ...], micro-batch m = rows m, m+n, ...
            return jnp.swapaxes(a.reshape((b // n, n) + a.shape[1:]), 0, 1)

        ex = self._executor(gd_block, gds, tuple(p for p, _ in moe_layers(model.layers[nd])),
                            tuple(p for p, _ in moe_layers(model.mtp)) if has_mtp else ())
        res = ex.step_detailed(stage_args, to_mb(x), to_mb(tokens), loss_params=(lp_params, lp_rest))
        # The executor differentiates the SUM over micro-batches of their losses; the model's loss
        # is their mean (equal micro-batches), so every gradient is divided by n.
        scale = lambda t: jax.tree.map(lambda g: g / n, t)  # noqa: E731
        g_stages = [tuple(p for p, _ in sg) for sg in res.grads]
        _, ex_vjp = jax.vjp(extract, params)
        g_pipe, = ex_vjp((scale(g_stages), scale(res.loss_param_grads[0])))
        gx = jnp.swapaxes(res.input_grads, 0, 1).reshape(x.shape) / n
        g_pre, = pre_vjp(gx)
        grads = jax.tree.map(jnp.add, g_pre, g_pipe)

        lstats = res.loss_stats
        lm = lstats["lm"] / (n * shards)
        mtp = lstats["mtp"] / (n * shards)
        total = jnp.mean(res.losses + res.aux_losses)
        balance = jnp.mean(res.aux_losses) + lstats["balance"] / (n * shards)
        loads = [st["load"][i] for st in res.stats for i in range(k)]
        if has_mtp:
            loads.append(lstats["mtp_load"])
        return LossParts(total, lm, mtp, balance), grads, StepStats(jnp.stack(loads), res.op_log)

    def expert_meshes(self, model: DeepSeekV3) -> dict[tuple, Mesh | None]:
        """Per MoE layer path, the mesh whose ``ep`` axis splits its routed-weight gradients as
        :meth:`loss_and_grads` returns them (the ``mesh`` of
        :func:`dsjax.nn.moe.tie_expert_replica_grads`): every MoE layer's, the stages' and the
        MTP block's (split over ``ep`` by the executor's loss-parameter specs) alike."""
        return {p: self.mesh for p, _ in moe_layers(model)}

    def set_loads(self, model: DeepSeekV3, loads: jax.Array) -> None:
        """Writes a step's loads [MoE layers (+ MTP), E] into the model's ExpertLoad variables (what
        the auxiliary-loss-free bias update reads)."""
        moes = [model.layers[i].ffn for i in range(self.cfg.n_layers) if i >= self.cfg.n_dense_layers]
        if model.mtp is not None:
            moes.append(model.mtp.block.ffn)
        for moe, load in zip(moes, loads):
            moe.load[...] = load


class StepStats(NamedTuple):
    loads: jax.Array    # int32 [MoE layers (+1 for MTP), E]: tokens routed to each expert
    op_log: jax.Array   # int32 [pp, ticks, 5]: the executed schedule (dsjax.dualpipe.ops_from_log)
