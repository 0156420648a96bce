"""shard_map executor for pipeline schedules (GPipe, 1F1B, ZB1P, DualPipe, DualPipeV).

One SPMD program runs every rank of the "pp" mesh axis: a ``lax.scan`` over lockstep ticks reads the
rank's row of the static op table (:mod:`dsjax.dualpipe.plan`), runs the forward half and the
backward half of its op as two ``lax.switch`` conditionals, and exchanges activations and gradients
with the neighbour ranks by ``ppermute`` (both directions in the same tick when the schedule needs
it, as DualPipe does).

Backward work follows DeepSeek's DualPipe (deepseek-ai/DualPipe): the ``F`` op runs ``jax.vjp`` of
the stage and keeps the residuals in a buffer slot until the backward; ``B`` computes input and
weight gradients; ``BI`` only the input gradient (XLA drops the unused weight-gradient half of the
VJP in that branch), and the deferred ``W`` computes the weight gradient from the same residuals
and output gradient. In an ``FB`` tick the forward and the backward are independent conditionals,
so the forward's ``ppermute`` depends on the forward only and XLA may overlap it with the backward's
compute; ``overlapped_forward_backward`` instead hands both halves to a model to interleave itself.
Residuals that are the stage's parameters are not copied per micro-batch: the backward re-reads the
parameters. For DualPipe the two copies of each stage end with the same gradients (summed across the
pair by one ``ppermute``).

Limits: every tick lasts as long as the slowest op of any rank (lockstep), so ranks do not drift
ahead as they would with asynchronous sends; the last stage's loss is computed under a
``lax.cond`` whose residuals are kept for every stage (a scalar and one activation-sized array in
the usual case); every stage must map activations to the same shape and have the same parameter
structure; inputs and labels are replicated to every rank.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from dsjax.dualpipe.plan import DST_DOWN, DST_SELF, DST_UP, FIELD, KIND_CODE, Plan, build_plan
from dsjax.dualpipe.schedules import Schedule, stage_copies, validate

_shard_map = getattr(jax, "shard_map", None)
if _shard_map is None:  # older JAX
    from jax.experimental.shard_map import shard_map as _shard_map  # type: ignore

Pytree = Any
OverlapHook = Callable[[Callable[[], Any], Callable[[], Any]], tuple[Any, Any]]


def _sequential(forward: Callable[[], Any], backward: Callable[[], Any]) -> tuple[Any, Any]:
    return forward(), backward()


@dataclasses.dataclass
class StepResult:
    """Everything one training step returns.

    Attributes:
        losses: f32 ``[n]``, the loss of each micro-batch.
        grads: per stage, the gradient pytree of the sum of the micro-batch losses.
        device_grads: the gradient pytrees as held on the devices, stacked ``[pp, slots, ...]``
            (slot ``j`` of rank ``r`` holds stage ``schedule.rank_stages[r][j]``).
        op_log: int32 ``[pp, T, 5]``: per tick, the op each rank ran (kind code, forward stage and
            micro-batch, backward stage and micro-batch); see :func:`dsjax.dualpipe.plan.ops_from_log`.
    """

    losses: jax.Array
    grads: list[Pytree]
    device_grads: Pytree
    op_log: jax.Array


class DualPipe:
    """Runs a pipeline schedule over a mesh axis with one shard_map program.

    Args:
        stage_fn: ``stage_fn(stage_params, x) -> y``; ``x`` and ``y`` have the same shape and dtype
            (one activation of a micro-batch), every stage has the same parameter structure.
        loss_fn: ``loss_fn(y, labels) -> scalar`` for the last stage's output of one micro-batch.
        schedule: a :class:`~dsjax.dualpipe.schedules.Schedule` (``pp`` = the axis size).
        mesh: a mesh with an axis ``axis_name`` of size ``schedule.pp`` (other axes replicate).
        axis_name: the pipeline axis.
        overlapped_forward_backward: optional ``hook(forward, backward) -> (forward(), backward())``
            called by each ``FB`` op with two thunks; a model can interleave their pieces itself.

    The gradients are those of the sum of the per-micro-batch losses (as DeepSeek's DualPipe
    accumulates one backward per chunk).
    """

    def __init__(self, stage_fn: Callable[[Pytree, jax.Array], jax.Array],
                 loss_fn: Callable[[jax.Array, Pytree], jax.Array], *, schedule: Schedule, mesh: Mesh,
                 axis_name: str = "pp", overlapped_forward_backward: OverlapHook | None = None):
        if not isinstance(schedule, Schedule):
            raise TypeError(f"DualPipe: schedule must be a Schedule, got {type(schedule).__name__}")
        validate(schedule)
        if axis_name not in mesh.shape:
            raise ValueError(f"DualPipe: mesh must have an axis {axis_name!r}, got axes {tuple(mesh.shape)}")
        if mesh.shape[axis_name] != schedule.pp:
            raise ValueError(f"DualPipe: mesh axis {axis_name!r} must have size schedule.pp={schedule.pp}, "
                             f"got {mesh.shape[axis_name]}")
        self.stage_fn, self.loss_fn = stage_fn, loss_fn
        self.schedule, self.mesh, self.axis_name = schedule, mesh, axis_name
        self.hook = overlapped_forward_backward or _sequential
        self._plans: dict[bool, Plan] = {}
        self._jitted: dict[bool, Callable] = {}
        copies = stage_copies(schedule)
        self._first_copy = [copies[s][0][0] * len(schedule.rank_stages[0]) + copies[s][0][1]
                            for s in range(schedule.num_stages)]
        self._pairs = self._copy_pairs(copies)
        self.residual_shapes: list[tuple[tuple[int, ...], Any]] | None = None  # set when traced

    # ----------------------------------------------------------------- static helpers
    def _copy_pairs(self, copies: dict[int, list[tuple[int, int]]]) -> list[tuple[int, list[tuple[int, int]]]] | None:
        """For two copies per stage: per local slot j, (partner slot, ppermute pairs src->dst)."""
        n_copies = {len(c) for c in copies.values()}
        if n_copies == {1}:
            return None
        if n_copies != {2}:
            raise ValueError(f"DualPipe: every stage must have one copy or every stage two, got copy "
                             f"counts {sorted(n_copies)}")
        L = len(self.schedule.rank_stages[0])
        out = []
        for j in range(L):
            partner_slot, perm = None, []
            for r in range(self.schedule.pp):
                s = self.schedule.rank_stages[r][j]
                (q, pj), = [c for c in copies[s] if c != (r, j)]
                if partner_slot not in (None, pj):
                    raise ValueError("DualPipe: the copies of the stages must sit in matching slots")
                partner_slot = pj
                perm.append((q, r))
            out.append((partner_slot, perm))
        return out

    def plan(self, train: bool = True) -> Plan:
        """The static plan (tick tables, buffer sizes) of the training or forward-only program."""
        if train not in self._plans:
            self._plans[train] = build_plan(self.schedule, train=train)
        return self._plans[train]

    def _check(self, params: Sequence[Pytree], inputs: jax.Array, labels: Pytree | None) -> None:
        op = "DualPipe.step" if labels is not None else "DualPipe.forward"
        S, n = self.schedule.num_stages, self.schedule.num_microbatches
        if not isinstance(params, (list, tuple)) or len(params) != S:
            raise ValueError(f"{op}: params must be a list of {S} per-stage pytrees, got "
                             f"{type(params).__name__} of length {len(params) if hasattr(params, '__len__') else '?'}")
        ref = jax.tree.structure(params[0])
        shapes0 = [(a.shape, a.dtype) for a in jax.tree.leaves(params[0])]
        for s, p in enumerate(params[1:], 1):
            if jax.tree.structure(p) != ref or [(a.shape, a.dtype) for a in jax.tree.leaves(p)] != shapes0:
                raise ValueError(f"{op}: every stage must have the same parameter structure, shapes and "
                                 f"dtypes; stage {s} differs from stage 0")
        if not hasattr(inputs, "shape") or inputs.ndim < 1 or inputs.shape[0] != n:
            raise ValueError(f"{op}: inputs must have shape [num_microbatches={n}, ...], got "
                             f"{getattr(inputs, 'shape', type(inputs).__name__)}")
        x = jax.ShapeDtypeStruct(inputs.shape[1:], inputs.dtype)
        y = jax.eval_shape(self.stage_fn, params[0], x)
        if not hasattr(y, "shape") or (y.shape, y.dtype) != (x.shape, x.dtype):
            raise ValueError(f"{op}: stage_fn must map an activation to the same shape and dtype, "
                             f"got {x.shape} {x.dtype} -> {getattr(y, 'shape', y)} {getattr(y, 'dtype', '')}")
        if labels is not None:
            for leaf in jax.tree.leaves(labels):
                if leaf.ndim < 1 or leaf.shape[0] != n:
                    raise ValueError(f"{op}: labels leaves must have leading dimension "
                                     f"num_microbatches={n}, got shape {leaf.shape}")
            lbl = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape[1:], a.dtype), labels)
            loss = jax.eval_shape(self.loss_fn, y, lbl)
            if getattr(loss, "shape", None) != ():
                raise ValueError(f"{op}: loss_fn must return a scalar, got shape {getattr(loss, 'shape', loss)}")

    # ----------------------------------------------------------------- public API
    def step(self, params: Sequence[Pytree], inputs: jax.Array, labels: Pytree) -> tuple[jax.Array, list[Pytree]]:
        """One training step.

        Args:
            params: ``num_stages`` pytrees, one per stage, all with the same structure and shapes.
            inputs: ``[n, *act]``, micro-batch ``m`` is ``inputs[m]``.
            labels: pytree of ``[n, ...]`` leaves; ``labels[m]`` goes to ``loss_fn`` with micro-batch m.

        Returns:
            ``(losses [n] f32, grads)``: grads is a list of per-stage pytrees like ``params``.
        """
        res = self.step_detailed(params, inputs, labels)
        return res.losses, res.grads

    def step_detailed(self, params: Sequence[Pytree], inputs: jax.Array, labels: Pytree) -> StepResult:
        """Like :meth:`step`, also returning the per-device gradients and the executed op log."""
        self._check(params, inputs, labels)
        losses, grads, dev, log = self._program(True)(list(params), inputs, labels)
        return StepResult(losses, grads, dev, log)

    def forward(self, params: Sequence[Pytree], inputs: jax.Array) -> jax.Array:
        """Forward-only run of the schedule's forwards: the last stage's outputs ``[n, *act]``."""
        self._check(params, inputs, None)
        return self._program(False)(list(params), inputs, None)

    # ----------------------------------------------------------------- the program
    def _program(self, train: bool) -> Callable:
        if train not in self._jitted:
            self._jitted[train] = jax.jit(functools.partial(self._run, train))
        return self._jitted[train]

    def _run(self, train: bool, params: list[Pytree], inputs: jax.Array, labels: Pytree | None):
        plan = self.plan(train)
        pp, L, ax = self.schedule.pp, plan.num_slots, self.axis_name
        stacked = jax.tree.map(lambda *a: jnp.stack(a), *params)
        idx = jnp.asarray(plan.stage_index.reshape(-1))
        local = jax.tree.map(lambda a: a[idx].reshape((pp, L) + a.shape[1:]), stacked)
        local = jax.lax.with_sharding_constraint(local, NamedSharding(self.mesh, P(ax)))
        table = jnp.asarray(plan.table)
        if labels is None:
            labels = jnp.zeros((self.schedule.num_microbatches,), jnp.float32)
        body = functools.partial(self._rank_program, plan)
        out_specs = (P(), P(ax), P(ax)) if train else P()
        fn = _shard_map(body, mesh=self.mesh, in_specs=(P(ax), P(ax), P(), P()), out_specs=out_specs,
                        check_vma=False)
        if not train:
            return fn(local, table, inputs, labels)
        losses, dev, log = fn(local, table, inputs, labels)
        grads = [jax.tree.map(lambda a, i=i: a[i], dev) for i in self._first_copy]
        dev = jax.tree.map(lambda a: a.reshape((pp, L) + a.shape[1:]), dev)
        return losses, grads, dev, log

    def _rank_program(self, plan: Plan, local: Pytree, table: jax.Array, inputs: jax.Array, labels: Pytree):
        """The per-rank program: a scan over ticks of this rank's table row."""
        train, ax, pp = plan.train, self.axis_name, self.schedule.pp
        n = self.schedule.num_microbatches
        local = jax.tree.map(lambda a: a[0], local)  # [L, ...]
        table = table[0]  # [T, fields]
        act = jax.ShapeDtypeStruct(inputs.shape[1:], inputs.dtype)
        zeros_act = jnp.zeros(act.shape, act.dtype)
        stage_fn, loss_fn = self.stage_fn, self.loss_fn
        p0 = jax.tree.map(lambda a: a[0], local)

        def fwd_with_loss(p, x, lbl, is_last):
            y = stage_fn(p, x)
            loss = lax.cond(is_last, lambda: loss_fn(y, lbl).astype(jnp.float32), lambda: jnp.float32(0))
            return y, loss

        # Residual layout, found once on abstract values: which VJP residuals are the parameters.
        meta: dict[str, Any] = {}

        def fwd_vjp(p, x, lbl, is_last):
            (y, loss), vjp = jax.vjp(lambda p_, x_: fwd_with_loss(p_, x_, lbl, is_last), p, x)
            leaves, treedef = jax.tree.flatten(vjp)
            p_leaves = jax.tree.leaves(p)
            src = tuple(next((k for k, q in enumerate(p_leaves) if leaf is q), -1) for leaf in leaves)
            if "treedef" not in meta:
                meta["treedef"], meta["src"] = treedef, src
            elif src != meta["src"] or len(leaves) != len(meta["src"]):
                raise ValueError("DualPipe: the stage's VJP residuals changed between traces")
            return y, loss, [leaf for leaf, k in zip(leaves, src) if k < 0]

        lbl0 = jax.tree.map(lambda a: a[0], labels)
        if train:
            res_struct = jax.eval_shape(lambda p, x, l: fwd_vjp(p, x, l, jnp.bool_(True))[2], p0, zeros_act, lbl0)
            # what one (stage, micro-batch) keeps between its F and its backward (params excluded)
            self.residual_shapes = [(s.shape, s.dtype) for s in res_struct]
            res = [jnp.zeros((plan.num_res + 1,) + s.shape, s.dtype) for s in res_struct]
            zeros_res = [jnp.zeros(s.shape, s.dtype) for s in res_struct]
            gin = jnp.zeros((plan.num_gin + 1,) + act.shape, act.dtype)
            acc = jax.tree.map(lambda a: jnp.zeros((a.shape[0] + 1,) + a.shape[1:], a.dtype), local)
        else:
            res, zeros_res, gin, acc = [], [], jnp.zeros((1,) + act.shape, act.dtype), None
        zeros_dp = jax.tree.map(jnp.zeros_like, p0)
        ain = jnp.zeros((plan.num_ain + 1,) + act.shape, act.dtype)
        losses = jnp.zeros((n + 1,), jnp.float32)
        outs = jnp.zeros((n + 1,) + act.shape, act.dtype)

        def get(tree, i):
            return jax.tree.map(lambda a: lax.dynamic_index_in_dim(a, i, keepdims=False), tree)

        def tick(carry, row):
            ain, gin, res, acc, losses, outs = carry
            f = {k: row[FIELD[k]] for k in ("f_slot", "f_mb", "f_from_input", "f_ain", "f_last", "f_dst",
                                            "f_res", "f_done")}
            b = {k: row[FIELD[k]] for k in ("b_slot", "b_res", "b_gin", "b_last", "b_dst", "b_acc")}
            x_in = jnp.where(f["f_from_input"] == 1, get(inputs, f["f_mb"]), get(ain, f["f_ain"]))
            p_f = get(local, f["f_slot"])
            lbl_f = get(labels, f["f_mb"])
            is_last_f = f["f_last"] == 1

            def run_f():
                if train:
                    y, loss, leaves = fwd_vjp(p_f, x_in, lbl_f, is_last_f)
                    return y, loss, leaves
                return stage_fn(p_f, x_in), jnp.float32(0), []

            def run_b(want_dx: bool, want_dp: bool):
                p_b = get(local, b["b_slot"])
                stored = iter(get(res, b["b_res"]))
                p_leaves = jax.tree.leaves(p_b)
                leaves = [p_leaves[k] if k >= 0 else next(stored) for k in meta["src"]]
                vjp = jax.tree.unflatten(meta["treedef"], leaves)
                is_last = b["b_last"] == 1
                dy = jnp.where(is_last, zeros_act, get(gin, b["b_gin"]))
                dp, dx = vjp((dy, jnp.where(is_last, 1.0, 0.0).astype(jnp.float32)))
                return (dx if want_dx else zeros_act), (dp if want_dp else zeros_dp)

            # The forward half and the backward half of a tick are two independent conditionals, so
            # in an FB tick the activation's ppermute depends only on the forward and may overlap the
            # backward's compute (and the gradient's ppermute the next forward). A user hook instead
            # gets both halves of an FB in one place and runs them in its own order.
            kind = row[FIELD["kind"]]
            hooked = train and self.hook is not _sequential
            f_sel = jnp.asarray([0, 1, 0, 0, 0, 2 if hooked else 1], jnp.int32)[kind]
            b_sel = jnp.asarray([0, 0, 1, 2, 3, 0 if hooked else 1], jnp.int32)[kind]

            def f_idle():
                out = (jnp.int32(0), zeros_act, jnp.float32(0), zeros_res)
                return out + ((zeros_act, zeros_dp) if hooked else ())

            def f_op():
                y, loss, leaves = run_f()
                return (jnp.int32(1), y, loss, leaves) + ((zeros_act, zeros_dp) if hooked else ())

            def f_hooked():
                (y, loss, leaves), (dx, dp) = self.hook(run_f, lambda: run_b(True, True))
                return jnp.int32(5), y, loss, leaves, dx, dp

            def b_op(code, want_dx, want_dp):
                def go():
                    if code == 0:
                        return jnp.int32(0), zeros_act, zeros_dp
                    dx, dp = run_b(want_dx, want_dp)
                    return jnp.int32(code), dx, dp
                return go

            f_branches = [f_idle, f_op] + ([f_hooked] if hooked else [])
            f_out = lax.switch(f_sel, f_branches)
            f_code, y, loss, leaves = f_out[:4]
            if train:
                b_code, dx, dp = lax.switch(b_sel, [b_op(0, False, False), b_op(2, True, True),
                                                    b_op(3, True, False), b_op(4, False, True)])
                if hooked:
                    dx = dx + f_out[4]
                    dp = jax.tree.map(jnp.add, dp, f_out[5])
            else:
                b_code, dx, dp = jnp.int32(0), zeros_act, zeros_dp
            # F alone 1, B 2, BI 3, W 4, FB 5 (from the two halves that actually ran)
            code = jnp.where((f_code == 1) & (b_code == 2), 5, f_code + b_code)

            # results into this rank's buffers (the trash slot takes unused writes)
            if train:
                res = [buf.at[f["f_res"]].set(leaf) for buf, leaf in zip(res, leaves)]
                acc = jax.tree.map(lambda a, g: a.at[b["b_acc"]].add(g), acc, dp)
            losses = losses.at[f["f_done"]].set(loss)
            if not train:
                outs = outs.at[f["f_done"]].set(y)
            # neighbour exchange: every channel the schedule uses, both directions in one tick
            sends = {"act_down": (f["f_dst"], DST_DOWN, y, "r_act_prev"),
                     "act_up": (f["f_dst"], DST_UP, y, "r_act_next"),
                     "grad_down": (b["b_dst"], DST_DOWN, dx, "r_grad_prev"),
                     "grad_up": (b["b_dst"], DST_UP, dx, "r_grad_next")}
            for ch in plan.channels:
                if not train and ch.startswith("grad"):
                    continue
                dst, want, val, field = sends[ch]
                step = 1 if want == DST_DOWN else -1
                perm = [(i, i + step) for i in range(pp) if 0 <= i + step < pp]
                msg = lax.ppermute(jnp.where(dst == want, val, jnp.zeros_like(val)), ax, perm)
                if ch.startswith("act"):
                    ain = ain.at[row[FIELD[field]]].set(msg)
                else:
                    gin = gin.at[row[FIELD[field]]].set(msg)
            ain = ain.at[row[FIELD["r_act_self"]]].set(y)
            if train:
                gin = gin.at[row[FIELD["r_grad_self"]]].set(dx)
            log = jnp.stack([code, row[FIELD["f_stage"]], row[FIELD["f_mb"]], row[FIELD["b_stage"]],
                             row[FIELD["b_mb"]]])
            return (ain, gin, res, acc, losses, outs), log

        carry = (ain, gin, res, acc, losses, outs)
        (ain, gin, res, acc, losses, outs), log = lax.scan(tick, carry, table)
        if not train:
            return lax.psum(outs[:n], ax)
        grads = jax.tree.map(lambda a: a[:-1], acc)  # drop the trash slot
        if self._pairs is not None:  # DualPipe: add the partner copy's gradient, same sum on both
            summed = []
            for j, (pj, perm) in enumerate(self._pairs):
                other = lax.ppermute(get(grads, pj), ax, perm)
                summed.append(jax.tree.map(jnp.add, get(grads, j), other))
            grads = jax.tree.map(lambda *a: jnp.stack(a), *summed)
        return lax.psum(losses[:n], ax), grads, log[None]
