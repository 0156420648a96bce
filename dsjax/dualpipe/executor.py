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
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from dsjax.dualpipe.plan import DST_DOWN, DST_UP, FIELD, Plan, build_plan
from dsjax.dualpipe.schedules import Schedule, stage_copies, validate

_shard_map = getattr(jax, "shard_map", None)
if _shard_map is None:  # older JAX
    from jax.experimental.shard_map import shard_map as _shard_map  # type: ignore

Pytree = Any
OverlapHook = Callable[[Callable[[], Any], Callable[[], Any]], tuple[Any, Any]]


class _LeafSpec(NamedTuple):
    """How one parameter leaf is split over non-pipeline mesh axes (a pytree leaf of its own:
    parameter pytrees may contain tuples)."""
    entries: tuple
    names: tuple  # the mesh axes named in entries


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
        input_grads: ``[n, *act]``, the gradient of the summed loss w.r.t. ``inputs`` (so the layers
            before the pipeline, e.g. an embedding, can be differentiated by the caller).
        loss_param_grads: gradient pytree of ``loss_params`` (None when none were given).
        aux_losses: f32 ``[n]``, per micro-batch the sum over stages of the stages' auxiliary
            losses (``with_stats``; zeros otherwise). ``losses`` excludes them.
        stats: per stage, the stage's statistics pytree summed over micro-batches (``with_stats``).
        loss_stats: the loss function's statistics summed over micro-batches (``with_stats``).
    """

    losses: jax.Array
    grads: list[Pytree]
    device_grads: Pytree
    op_log: jax.Array
    input_grads: jax.Array | None = None
    loss_param_grads: Pytree = None
    aux_losses: jax.Array | None = None
    stats: list[Pytree] | None = None
    loss_stats: Pytree = None


class DualPipe:
    """Runs a pipeline schedule over a mesh axis with one shard_map program.

    Args:
        stage_fn: ``stage_fn(stage_params, x) -> y``; ``x`` and ``y`` have the same shape and dtype
            (one activation of a micro-batch), every stage has the same parameter structure. With
            ``with_stats``: ``-> (y, aux_loss, stats)``, where the scalar ``aux_loss`` is added to
            the micro-batch's loss (and differentiated: e.g. an MoE balance loss) and the pytree
            ``stats`` (not differentiated: e.g. expert loads) is summed over micro-batches per stage.
        loss_fn: ``loss_fn(y, labels) -> scalar`` for the last stage's output of one micro-batch;
            ``loss_fn(loss_params, y, labels)`` when :meth:`step` gets ``loss_params`` (e.g. the
            output head, differentiated too). With ``with_stats`` it returns ``(loss, stats)``.
        schedule: a :class:`~dsjax.dualpipe.schedules.Schedule` (``pp`` = the axis size).
        mesh: a mesh with an axis ``axis_name`` of size ``schedule.pp`` (other axes replicate,
            unless named in ``data_axes`` / ``param_specs``).
        axis_name: the pipeline axis.
        overlapped_forward_backward: optional ``hook(forward, backward) -> (forward(), backward())``
            called by each ``FB`` op with two thunks; a model can interleave their pieces itself.
        data_axes: mesh axes the micro-batches are split over (data parallelism inside each stage,
            e.g. an expert-parallel axis): ``inputs`` and ``labels`` leaves ``[n, B, ...]`` are split
            along ``B``; ``stage_fn`` and ``loss_fn`` see the local rows and may use collectives
            over these axes (all devices of a pipeline rank run the same op in the same tick).
            ``loss_fn`` must return the mean over its local rows; losses are averaged and
            gradients summed over the shards accordingly (the global-mean loss's gradients).
        param_specs: ``param_specs(path, leaf) -> PartitionSpec | None`` for one stage's parameter
            leaves: how a leaf is split over non-pipeline mesh axes (e.g. ``P("ep")`` for routed
            experts ``[E, ...]``, so each device holds its ``E/R`` experts). A leaf's gradient is
            summed over the ``data_axes`` it is not split over.
        loss_param_specs: ``loss_param_specs(path, leaf) -> PartitionSpec | None`` for the leaves of
            :meth:`step_detailed`'s ``loss_params``, the same way: ``loss_fn`` receives each leaf's
            per-device shard (e.g. the routed experts of an MoE block in the loss, ``P("ep")``,
            run expert-parallel like a stage's) and the leaf's gradient comes back split the same
            way, summed over the pipeline axis and the ``data_axes`` it is not split over. None
            (the default) or a None entry: replicated, every device gets the whole leaf.
        with_stats: ``stage_fn`` and ``loss_fn`` return auxiliary losses and statistics (above).

    The gradients are those of the sum of the per-micro-batch losses (as DeepSeek's DualPipe
    accumulates one backward per chunk). Parameter leaves that are not floating point (counters,
    integer tables) are carried but not differentiated; their "gradients" are zeros.
    """

    def __init__(self, stage_fn: Callable[[Pytree, jax.Array], Any],
                 loss_fn: Callable[..., Any], *, schedule: Schedule, mesh: Mesh,
                 axis_name: str = "pp", overlapped_forward_backward: OverlapHook | None = None,
                 data_axes: Sequence[str] = (), param_specs: Callable[[Any, Any], Any] | None = None,
                 with_stats: bool = False, loss_param_specs: Callable[[Any, Any], Any] | None = None):
        if not isinstance(schedule, Schedule):
            raise TypeError(f"DualPipe: schedule must be a Schedule, got {type(schedule).__name__}")
        validate(schedule)
        if axis_name not in mesh.shape:
            raise ValueError(f"DualPipe: mesh must have an axis {axis_name!r}, got axes {tuple(mesh.shape)}")
        if mesh.shape[axis_name] != schedule.pp:
            raise ValueError(f"DualPipe: mesh axis {axis_name!r} must have size schedule.pp={schedule.pp}, "
                             f"got {mesh.shape[axis_name]}")
        data_axes = tuple(data_axes)
        bad = [a for a in data_axes if a not in mesh.shape or a == axis_name]
        if bad or len(set(data_axes)) != len(data_axes):
            raise ValueError(f"DualPipe: data_axes must be distinct mesh axes other than {axis_name!r}, "
                             f"got {data_axes} (mesh axes {tuple(mesh.shape)})")
        self.stage_fn, self.loss_fn = stage_fn, loss_fn
        self.schedule, self.mesh, self.axis_name = schedule, mesh, axis_name
        self.hook = overlapped_forward_backward or _sequential
        self.data_axes, self.param_specs, self.with_stats = data_axes, param_specs, with_stats
        self.loss_param_specs = loss_param_specs
        self.num_shards = int(np.prod([mesh.shape[a] for a in data_axes])) if data_axes else 1
        self._plans: dict[bool, Plan] = {}
        self._jitted: dict[tuple[bool, bool], Callable] = {}
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
        leaves = [("inputs", inputs)] + [("labels leaves", a) for a in jax.tree.leaves(labels if labels is not None else ())]
        for name, leaf in leaves[1:]:
            if leaf.ndim < 1 or leaf.shape[0] != n:
                raise ValueError(f"{op}: {name} must have leading dimension num_microbatches={n}, got "
                                 f"shape {leaf.shape}")
        if self.data_axes:
            for name, leaf in leaves:
                if leaf.ndim < 2 or leaf.shape[1] % self.num_shards:
                    raise ValueError(f"{op}: {name} must have a second (row) dimension divisible by the "
                                     f"{self.num_shards} devices of data_axes {self.data_axes}, got shape "
                                     f"{leaf.shape}")

    def _leaf_specs(self, tree: Pytree, loss: bool = False) -> Pytree:
        """Per leaf of one stage's params (after ``[pp, slots]``) or of the loss parameters
        (``loss``): its PartitionSpec entries over non-pipeline mesh axes."""
        fn, what = (self.loss_param_specs, "loss_param_specs") if loss else (self.param_specs, "param_specs")
        if fn is None:
            return jax.tree.map(lambda a: _LeafSpec((), ()), tree)

        def spec(path, leaf):
            sp = fn(path, leaf)
            sp = tuple(sp) if sp is not None else ()
            names = [a for e in sp if e is not None for a in (e if isinstance(e, tuple) else (e,))]
            if (len(sp) > leaf.ndim or len(set(names)) != len(names)
                    or any(a not in self.mesh.shape or a == self.axis_name for a in names)):
                raise ValueError(f"DualPipe: {what} gave {sp} for the leaf at {jax.tree_util.keystr(path)} "
                                 f"of shape {leaf.shape}; expected at most {leaf.ndim} entries naming "
                                 f"non-pipeline mesh axes, each at most once")
            for d, e in zip(leaf.shape, sp):
                size = int(np.prod([self.mesh.shape[a] for a in (e if isinstance(e, tuple) else (e,))])) if e else 1
                if d % size:
                    raise ValueError(f"DualPipe: {what} gave {sp} for the leaf at {jax.tree_util.keystr(path)} "
                                     f"of shape {leaf.shape}; expected dimensions divisible by the mesh axes "
                                     f"that split them, got {d} over {e} of size {size}")
            return _LeafSpec(sp, tuple(names))
        return jax.tree_util.tree_map_with_path(spec, tree)

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

    def step_detailed(self, params: Sequence[Pytree], inputs: jax.Array, labels: Pytree,
                      loss_params: Pytree = None) -> StepResult:
        """Like :meth:`step`, also returning the per-device gradients, the executed op log, the
        gradients of ``inputs`` and of ``loss_params`` (passed to ``loss_fn`` as its first
        argument when given), and the auxiliary losses and statistics of ``with_stats``."""
        self._check(params, inputs, labels)
        has_lp = loss_params is not None
        out = self._program(True, has_lp)(list(params), inputs, labels, loss_params if has_lp else ())
        losses, grads, dev, log, gx, lgrads, aux, stats, lstats = out
        return StepResult(losses, grads, dev, log, gx, lgrads if has_lp else None, aux,
                          stats if self.with_stats else None, lstats if self.with_stats else None)

    def forward(self, params: Sequence[Pytree], inputs: jax.Array) -> jax.Array:
        """Forward-only run of the schedule's forwards: the last stage's outputs ``[n, *act]``."""
        self._check(params, inputs, None)
        return self._program(False, False)(list(params), inputs, None, ())

    # ----------------------------------------------------------------- the program
    def _program(self, train: bool, has_lp: bool) -> Callable:
        if (train, has_lp) not in self._jitted:
            self._jitted[(train, has_lp)] = jax.jit(functools.partial(self._run, train, has_lp))
        return self._jitted[(train, has_lp)]

    def _run(self, train: bool, has_lp: bool, params: list[Pytree], inputs: jax.Array, labels: Pytree | None,
             loss_params: Pytree):
        plan = self.plan(train)
        pp, L, ax = self.schedule.pp, plan.num_slots, self.axis_name
        stacked = jax.tree.map(lambda *a: jnp.stack(a), *params)
        idx = jnp.asarray(plan.stage_index.reshape(-1))
        local = jax.tree.map(lambda a: a[idx].reshape((pp, L) + a.shape[1:]), stacked)
        leaf_specs = self._leaf_specs(params[0])
        is_spec = lambda x: isinstance(x, _LeafSpec)  # noqa: E731
        in_specs = jax.tree.map(lambda sp: P(ax, None, *sp.entries), leaf_specs, is_leaf=is_spec)  # [pp, L, ...]
        dev_specs = jax.tree.map(lambda sp: P(ax, *sp.entries), leaf_specs, is_leaf=is_spec)  # [pp·L, ...]
        local = jax.lax.with_sharding_constraint(
            local, jax.tree.map(lambda sp: NamedSharding(self.mesh, sp), in_specs))
        table = jnp.asarray(plan.table)
        if labels is None:
            labels = jnp.zeros((self.schedule.num_microbatches,) + ((self.num_shards,) if self.data_axes else ()),
                               jnp.float32)
        rows = P(None, self.data_axes) if self.data_axes else P()
        label_specs = jax.tree.map(lambda _: rows, labels)
        # Loss parameters: whole on every device unless loss_param_specs splits them (then loss_fn
        # sees the shards, and their gradients leave the program split the same way).
        lp_leaf_specs = self._leaf_specs(loss_params, loss=True)
        lp_specs = jax.tree.map(lambda sp: P(*sp.entries), lp_leaf_specs, is_leaf=is_spec)
        if self.loss_param_specs is not None:
            loss_params = jax.lax.with_sharding_constraint(
                loss_params, jax.tree.map(lambda sp: NamedSharding(self.mesh, sp), lp_specs))
        body = functools.partial(self._rank_program, plan, has_lp, leaf_specs, lp_leaf_specs)
        if train:
            out_specs = (P(), dev_specs, P(ax), rows, lp_specs, P(), P(ax), P())
        else:
            out_specs = rows
        fn = _shard_map(body, mesh=self.mesh, in_specs=(in_specs, P(ax), rows, label_specs, lp_specs),
                        out_specs=out_specs, check_vma=False)
        if not train:
            return fn(local, table, inputs, labels, loss_params)
        losses, dev, log, gx, lgrads, aux, stats, lstats = fn(local, table, inputs, labels, loss_params)
        grads = [jax.tree.map(lambda a, i=i: a[i], dev) for i in self._first_copy]
        dev = jax.tree.map(lambda a: a.reshape((pp, L) + a.shape[1:]), dev)
        stats = [jax.tree.map(lambda a, i=i: a[i], stats) for i in self._first_copy]
        return losses, grads, dev, log, gx, lgrads, aux, stats, lstats

    def _rank_program(self, plan: Plan, has_lp: bool, leaf_specs: Pytree, lp_leaf_specs: Pytree, local: Pytree,
                      table: jax.Array, inputs: jax.Array, labels: Pytree, loss_params: Pytree):
        """The per-rank program: a scan over ticks of this rank's table row."""
        train, ax, pp = plan.train, self.axis_name, self.schedule.pp
        n = self.schedule.num_microbatches
        local = jax.tree.map(lambda a: a[0], local)  # [L, ...]
        table = table[0]  # [T, fields]
        act = jax.ShapeDtypeStruct(inputs.shape[1:], inputs.dtype)
        zeros_act = jnp.zeros(act.shape, act.dtype)
        stage_fn, loss_fn, with_stats = self.stage_fn, self.loss_fn, self.with_stats
        p0 = jax.tree.map(lambda a: a[0], local)
        lbl0 = jax.tree.map(lambda a: a[0], labels)
        op = "DualPipe.step" if train else "DualPipe.forward"

        # Only floating-point leaves are differentiated; the others are closed over.
        p_leaves0, p_def = jax.tree.flatten(p0)
        diff = [jnp.issubdtype(a.dtype, jnp.inexact) for a in p_leaves0]
        lp_leaves0, lp_def = jax.tree.flatten(loss_params)
        lp_diff = [jnp.issubdtype(a.dtype, jnp.inexact) for a in lp_leaves0]

        def split(leaves, mask):
            return [a for a, d in zip(leaves, mask) if d], [a for a, d in zip(leaves, mask) if not d]

        def join(d_leaves, n_leaves, mask):
            d_it, n_it = iter(d_leaves), iter(n_leaves)
            return [next(d_it) if m else next(n_it) for m in mask]

        def run_stage(p, x):
            out = stage_fn(p, x)
            if with_stats:
                y, aux, st = out
                aux = jnp.asarray(aux, jnp.float32)
            else:
                y, aux, st = out, jnp.float32(0), ()
            if not hasattr(y, "shape") or (y.shape, y.dtype) != (act.shape, act.dtype):
                raise ValueError(f"{op}: stage_fn must map an activation to the same shape and dtype, "
                                 f"got {act.shape} {act.dtype} -> {getattr(y, 'shape', y)} {getattr(y, 'dtype', '')}")
            if aux.shape != ():
                raise ValueError(f"{op}: stage_fn's auxiliary loss must be a scalar, got shape {aux.shape}")
            return y, aux, st

        def run_loss(lp, y, lbl):
            out = loss_fn(lp, y, lbl) if has_lp else loss_fn(y, lbl)
            loss, st = out if with_stats else (out, ())
            if getattr(loss, "shape", None) != ():
                raise ValueError(f"{op}: loss_fn must return a scalar, got shape {getattr(loss, 'shape', loss)}")
            return loss.astype(jnp.float32), st

        ls_struct = (jax.eval_shape(lambda y: run_loss(loss_params, y, lbl0)[1], zeros_act) if train else ())

        def fwd_with_loss(p, lp, x, lbl, is_last):
            y, aux, st = run_stage(p, x)
            loss, ls = lax.cond(is_last, lambda: run_loss(lp, y, lbl),
                                lambda: (jnp.float32(0), jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), ls_struct)))
            # The scalar output is what the backward seeds with 1: the last stage's loss (zero on
            # other stages) plus this stage's auxiliary loss.
            return (y, loss + aux), (loss, aux, st, ls)

        # Residual layout, found once on abstract values: which VJP residuals are the parameters.
        meta: dict[str, Any] = {}

        def fwd_vjp(p, x, lbl, is_last):
            pd, pn = split(jax.tree.leaves(p), diff)
            lpd, lpn = split(jax.tree.leaves(loss_params), lp_diff)

            def f(pd_, lpd_, x_):
                p_ = jax.tree.unflatten(p_def, join(pd_, pn, diff))
                lp_ = jax.tree.unflatten(lp_def, join(lpd_, lpn, lp_diff))
                return fwd_with_loss(p_, lp_, x_, lbl, is_last)

            (y, _), vjp, (loss, aux, st, ls) = jax.vjp(f, pd, lpd, x, has_aux=True)
            leaves, treedef = jax.tree.flatten(vjp)
            p_leaves, lp_leaves = jax.tree.leaves(p), jax.tree.leaves(loss_params)

            def source(leaf):
                k = next((k for k, q in enumerate(p_leaves) if leaf is q), None)
                if k is not None:
                    return k
                k = next((k for k, q in enumerate(lp_leaves) if leaf is q), None)
                return -1 if k is None else -2 - k
            src = tuple(source(leaf) for leaf in leaves)
            if "treedef" not in meta:
                meta["treedef"], meta["src"] = treedef, src
            elif src != meta["src"] or len(leaves) != len(meta["src"]):
                raise ValueError("DualPipe: the stage's VJP residuals changed between traces")
            return y, (loss, aux, st, ls), [leaf for leaf, k in zip(leaves, src) if k == -1]

        if train:
            # one abstract trace of a forward: the step outputs' and the residuals' shapes
            info_struct, res_struct = jax.eval_shape(lambda p, x, l: fwd_vjp(p, x, l, jnp.bool_(True))[1:],
                                                     p0, zeros_act, lbl0)
            # what one (stage, micro-batch) keeps between its F and its backward (params excluded)
            self.residual_shapes = [(s.shape, s.dtype) for s in res_struct]
            res = [jnp.zeros((plan.num_res + 1,) + s.shape, s.dtype) for s in res_struct]
            zeros_res = [jnp.zeros(s.shape, s.dtype) for s in res_struct]
            gin = jnp.zeros((plan.num_gin + 1,) + act.shape, act.dtype)
            acc = [jnp.zeros((plan.num_slots + 1,) + a.shape[1:], a.dtype)
                   for a in split(jax.tree.leaves(local), diff)[0]]
            lacc = [jnp.zeros(a.shape, a.dtype) for a in split(lp_leaves0, lp_diff)[0]]
            zeros_info = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), info_struct)
            st_acc = jax.tree.map(lambda s: jnp.zeros((plan.num_slots + 1,) + s.shape, s.dtype), info_struct[2])
            ls_acc = zeros_info[3]
            gx = jnp.zeros((n + 1,) + act.shape, act.dtype)
        else:
            res, zeros_res, gin, acc, lacc = [], [], jnp.zeros((1,) + act.shape, act.dtype), [], []
            zeros_info = st_acc = ls_acc = gx = None
        zeros_dp = [jnp.zeros(a.shape, a.dtype) for a in split(jax.tree.leaves(p0), diff)[0]]
        zeros_dlp = [jnp.zeros(a.shape, a.dtype) for a in split(lp_leaves0, lp_diff)[0]]
        ain = jnp.zeros((plan.num_ain + 1,) + act.shape, act.dtype)
        losses = jnp.zeros((n + 1,), jnp.float32)
        auxes = jnp.zeros((n + 1,), jnp.float32)
        outs = jnp.zeros((n + 1,) + act.shape, act.dtype)

        def get(tree, i):
            return jax.tree.map(lambda a: lax.dynamic_index_in_dim(a, i, keepdims=False), tree)

        def tick(carry, row):
            ain, gin, res, acc, lacc, losses, auxes, outs, st_acc, ls_acc, gx = carry
            f = {k: row[FIELD[k]] for k in ("f_slot", "f_mb", "f_from_input", "f_ain", "f_last", "f_dst",
                                            "f_res", "f_done")}
            b = {k: row[FIELD[k]] for k in ("b_slot", "b_res", "b_gin", "b_last", "b_dst", "b_acc", "b_stage",
                                            "b_mb")}
            x_in = jnp.where(f["f_from_input"] == 1, get(inputs, f["f_mb"]), get(ain, f["f_ain"]))
            p_f = get(local, f["f_slot"])
            lbl_f = get(labels, f["f_mb"])
            is_last_f = f["f_last"] == 1

            def run_f():
                if train:
                    return fwd_vjp(p_f, x_in, lbl_f, is_last_f)
                return run_stage(p_f, x_in)[0], zeros_info, []

            def run_b(want_dx: bool, want_dp: bool):
                p_b = get(local, b["b_slot"])
                stored = iter(get(res, b["b_res"]))
                p_leaves, lp_leaves = jax.tree.leaves(p_b), jax.tree.leaves(loss_params)
                leaves = [p_leaves[k] if k >= 0 else lp_leaves[-2 - k] if k <= -2 else next(stored)
                          for k in meta["src"]]
                vjp = jax.tree.unflatten(meta["treedef"], leaves)
                is_last = b["b_last"] == 1
                dy = jnp.where(is_last, zeros_act, get(gin, b["b_gin"]))
                dp, dlp, dx = vjp((dy, jnp.float32(1)))
                return ((dx if want_dx else zeros_act), (dp if want_dp else zeros_dp),
                        (dlp if want_dp else zeros_dlp))

            # The forward half and the backward half of a tick are two independent conditionals, so
            # in an FB tick the activation's ppermute depends only on the forward and may overlap the
            # backward's compute (and the gradient's ppermute the next forward). A user hook instead
            # gets both halves of an FB in one place and runs them in its own order.
            kind = row[FIELD["kind"]]
            hooked = train and self.hook is not _sequential
            f_sel = jnp.asarray([0, 1, 0, 0, 0, 2 if hooked else 1], jnp.int32)[kind]
            b_sel = jnp.asarray([0, 0, 1, 2, 3, 0 if hooked else 1], jnp.int32)[kind]
            zeros_b = (zeros_act, zeros_dp, zeros_dlp)

            def f_idle():
                out = (jnp.int32(0), zeros_act, zeros_info, zeros_res)
                return out + ((zeros_b,) if hooked else ())

            def f_op():
                y, info, leaves = run_f()
                return (jnp.int32(1), y, info, leaves) + ((zeros_b,) if hooked else ())

            def f_hooked():
                (y, info, leaves), bres = self.hook(run_f, lambda: run_b(True, True))
                return jnp.int32(5), y, info, leaves, bres

            def b_op(code, want_dx, want_dp):
                def go():
                    if code == 0:
                        return (jnp.int32(0),) + zeros_b
                    return (jnp.int32(code),) + run_b(want_dx, want_dp)
                return go

            f_branches = [f_idle, f_op] + ([f_hooked] if hooked else [])
            f_out = lax.switch(f_sel, f_branches)
            f_code, y, info, leaves = f_out[:4]
            if train:
                b_code, dx, dp, dlp = lax.switch(b_sel, [b_op(0, False, False), b_op(2, True, True),
                                                         b_op(3, True, False), b_op(4, False, True)])
                if hooked:
                    hx, hp, hlp = f_out[4]
                    dx, dp, dlp = dx + hx, jax.tree.map(jnp.add, dp, hp), jax.tree.map(jnp.add, dlp, hlp)
            else:
                b_code, dx, dp, dlp = jnp.int32(0), zeros_act, zeros_dp, zeros_dlp
            # F alone 1, B 2, BI 3, W 4, FB 5 (from the two halves that actually ran)
            code = jnp.where((f_code == 1) & (b_code == 2), 5, f_code + b_code)

            # results into this rank's buffers (the trash slot takes unused writes)
            if train:
                loss, aux, st, ls = info
                res = [buf.at[f["f_res"]].set(leaf) for buf, leaf in zip(res, leaves)]
                acc = [a.at[b["b_acc"]].add(g) for a, g in zip(acc, dp)]
                lacc = [a + g for a, g in zip(lacc, dlp)]
                ran_f = f_code != 0
                auxes = auxes.at[jnp.where(ran_f, f["f_mb"], n)].add(aux)
                st_acc = jax.tree.map(lambda a, v: a.at[jnp.where(ran_f, f["f_slot"], plan.num_slots)].add(v),
                                      st_acc, st)
                ls_acc = jax.tree.map(jnp.add, ls_acc, ls)
                # the first stage's input gradient goes back to the caller (B and BI compute it)
                first = (b["b_stage"] == 0) & ((b_code == 2) | (b_code == 3))
                gx = gx.at[jnp.where(first, b["b_mb"], n)].set(dx)
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
            return (ain, gin, res, acc, lacc, losses, auxes, outs, st_acc, ls_acc, gx), log

        carry = (ain, gin, res, acc, lacc, losses, auxes, outs, st_acc, ls_acc, gx)
        carry, log = lax.scan(tick, carry, table)
        ain, gin, res, acc, lacc, losses, auxes, outs, st_acc, ls_acc, gx = carry
        data, shards = self.data_axes, self.num_shards
        if not train:
            return lax.psum(outs[:n], ax)

        def pair_sum(tree):
            """DualPipe: add the partner copy's value, same sum on both copies."""
            if self._pairs is None:
                return tree
            summed = []
            for j, (pj, perm) in enumerate(self._pairs):
                other = lax.ppermute(get(tree, pj), ax, perm)
                summed.append(jax.tree.map(jnp.add, get(tree, j), other))
            return jax.tree.map(lambda *a: jnp.stack(a), *summed)

        def data_sum(x, skip=()):
            axes = tuple(a for a in data if a not in skip)
            return lax.psum(x, axes) if axes else x

        grads = pair_sum([a[:-1] for a in acc])  # drop the trash slot
        # The loss is the mean over the data shards of their local means: gradients are summed over
        # the shards a leaf is replicated on, then divided by the shard count.
        specs = jax.tree.leaves(leaf_specs, is_leaf=lambda x: isinstance(x, _LeafSpec))
        names = [sp.names for sp in split(specs, diff)[0]]
        grads = [data_sum(g, skip=nm) / shards for g, nm in zip(grads, names)]
        zeros_n = [jnp.zeros((plan.num_slots,) + a.shape[1:], a.dtype) for a in split(jax.tree.leaves(local), diff)[1]]
        grads = jax.tree.unflatten(p_def, join(grads, zeros_n, diff))
        # A loss parameter split over data axes holds only its shard's gradient: summed over the
        # pipeline axis (only the last stage's rank computed it) and the data axes it is whole on.
        lp_specs = jax.tree.leaves(lp_leaf_specs, is_leaf=lambda x: isinstance(x, _LeafSpec))
        lp_names = [sp.names for sp in split(lp_specs, lp_diff)[0]]
        lgr = [lax.psum(g, (ax,) + tuple(a for a in data if a not in nm)) / shards
               for g, nm in zip(lacc, lp_names)]
        lzeros = [jnp.zeros(a.shape, a.dtype) for a in split(lp_leaves0, lp_diff)[1]]
        lgrads = jax.tree.unflatten(lp_def, join(lgr, lzeros, lp_diff))
        mean = (lambda x: lax.psum(x, data) / shards) if data else (lambda x: x)
        losses = mean(lax.psum(losses[:n], ax))
        auxes = mean(lax.psum(auxes[:n], ax))
        gx = lax.psum(gx[:n], ax) / shards
        st = pair_sum(jax.tree.map(lambda a: a[:-1], st_acc))
        st = jax.tree.map(lambda a: data_sum(a), st)
        ls = jax.tree.map(lambda a: data_sum(lax.psum(a, ax)), ls_acc)
        return losses, grads, log[None], gx, lgrads, auxes, st, ls
