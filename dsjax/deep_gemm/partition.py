"""Partitioning rules for DeepGEMM's custom calls, so that they run sharded under ``jax.jit``.

An FFI custom call is opaque to XLA's partitioner: with sharded operands it would all-gather them
and run the whole call on every device. Every quantizer and GEMM FFI call of
:mod:`dsjax.deep_gemm` therefore goes through :func:`partitioned`, which wraps it in
``jax.experimental.custom_partitioning`` with

* a Shardy ``sharding_rule`` (einsum-like factors, built per call from the static shapes), so
  that propagation moves shardings through the op: rows follow rows, 128-blocked dimensions are
  compound factors ``(blocks 128)`` tied to their scale dimension, contraction factors are
  reduction factors and everything the math forbids is a need-replication factor;
* a ``partition`` callback, the authority on what actually runs: it re-checks every factor's
  sharding against the op's rules (divisible, and a multiple of 128 per shard where scale blocks
  must not straddle shards) and replicates any factor that fails, so XLA inserts the gather
  itself and the answer is never wrong -- only, for a bad layout, slower;
* a ``custom_vmap`` rule (``custom_partitioning`` has no batching rule): the quantizers treat
  the vmapped axis as one more leading batch dim (still partitioned); the GEMMs loop over it as
  before, unpartitioned.

Why ``custom_partitioning`` rather than an automatic ``shard_map`` in the public ops: inside
``jit`` over a mesh with ``Auto`` axes (the default of ``jax.sharding.Mesh``) an operand's
sharding is decided by propagation after tracing, so a trace-time wrapper cannot see it;
``custom_partitioning`` is asked at partitioning time, with the final shardings, and works with
``ffi_call`` under ``custom_vjp``, ``remat`` and ``scan``. Inside a ``jax.shard_map`` over all mesh
axes it lowers to the plain call (the body is already per-device); over some axes, the
others are partitioned as above. Only for operands sharded over ``Explicit`` mesh axes, whose
shardings are part of the types at trace time and must be part of the results' types too, the
same plan runs as a ``shard_map`` built at trace time (operands the plan cannot use as they are
sharded are ``reshard``-ed, visibly).

The rules (DeepGEMM semantics: every output row and column is independent; scale blocks are
1x128 along K, 128x128 for the per-block operands):

* rows (``m``), groups of the masked GEMM and leading batch dims shard freely; ``n`` shards
  freely with per-row scales and in 128-row steps with 128x128 scales; the contiguous GEMM's
  rows shard in 128-row steps (its layout is checked per aligned block); the masked GEMM's
  ``m_max`` and every group axis of the contiguous and k-grouped GEMMs stay replicated (row
  counts and group offsets are global);
* the quantizers' block dims shard in 128 steps, so each shard's groups are the global ones and
  the result is bit-identical to the unsharded call;
* a sharded contraction dim ``k`` (128 per shard) is computed as per-shard float32 partial
  products summed with ``psum`` over the K axes (each 128-block carries its own scales, so the
  partial sums are exact block sums), then ``c`` is added and the result cast; this equals the
  unsharded product up to float32 summation order, which is how the data-parallel weight
  gradient (``fp8_gemm_nt_1d1d`` over a batch-sharded token axis) reduces. The k-grouped GEMM's
  ``K`` holds the group offsets and is gathered.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from jax.experimental.custom_partitioning import custom_partitioning
from jax._src import sharding_impls  # parse_flatten_op_sharding: HloSharding -> PartitionSpec
from jax.sharding import NamedSharding, PartitionSpec as P

BLOCK = 128

Dims = tuple[str, ...]


@dataclass(frozen=True)
class Layout:
    """Factors of one op: a factor name per dimension of every operand and result.

    Attributes:
        operands: factor names of each operand's dims, in order.
        results: factor names of each result's dims.
        free: factors that may be sharded (outputs follow them, no communication).
        reduce: contraction factors that may be sharded; partial results are ``psum``-ed.
        blocked: factor -> its 128-block partner (``k`` -> ``kb`` for the scale dim of ``k``),
            or ``""`` for a factor that only must shard in steps of 128 (no partner dim).
    """

    operands: tuple[Dims, ...]
    results: tuple[Dims, ...]
    free: frozenset[str] = frozenset()
    reduce: frozenset[str] = frozenset()
    blocked: dict[str, str] = field(default_factory=dict)

    def __hash__(self) -> int:  # dict field: hash the frozen content
        return hash((self.operands, self.results, self.free, self.reduce,
                     tuple(sorted(self.blocked.items()))))


def _axes(entry: Any) -> tuple[str, ...]:
    if entry is None:
        return ()
    return tuple(entry) if isinstance(entry, (tuple, list)) else (entry,)


def _spec(sharding: Any, ndim: int, mesh: Any) -> tuple[tuple[str, ...], ...] | None:
    """Per-dim mesh axes of an operand's sharding; None when it is not expressible on ``mesh``.

    Shardy may hand the callback shardings over sub-axes (an 8-way axis split 4 x 2 to fit a
    factor of 4), which no PartitionSpec can name: such an operand votes for nothing and the
    plan replicates what only it could have sharded.
    """
    if isinstance(sharding, NamedSharding):
        spec = tuple(sharding.spec)
    else:
        try:
            hlo = sharding._to_xla_hlo_sharding(ndim)  # pylint: disable=protected-access
            spec = tuple(sharding_impls.parse_flatten_op_sharding(hlo, mesh)[0])
        except Exception:  # noqa: BLE001 -- any undecodable sharding is "unknown"
            return None
    spec = spec + (None,) * (ndim - len(spec))
    return tuple(_axes(e) for e in spec)


def _sizes(layout: Layout, shapes: Sequence[tuple[int, ...]]) -> dict[str, int]:
    sizes: dict[str, int] = {}
    for dims, shape in zip(layout.operands, shapes):
        for f, n in zip(dims, shape):
            sizes.setdefault(f, n)
    return sizes


def plan(layout: Layout, mesh: Any, shapes: Sequence[tuple[int, ...]],
         specs: Sequence[tuple[tuple[str, ...], ...] | None]) -> dict[str, tuple[str, ...]]:
    """Mesh axes of every factor, from the operands' shardings, within the op's rules.

    A factor takes the axes of the first operand dim (of it or of its block partner) sharded in a
    way the op allows: mesh axes not used by another factor, a size they divide, and, for a
    128-blocked factor, a multiple of 128 per shard. Anything else is replicated (``()``).
    """
    sizes = _sizes(layout, shapes)
    partner_of = {v: k for k, v in layout.blocked.items() if v}
    shardable = layout.free | layout.reduce
    chosen: dict[str, tuple[str, ...]] = {}
    used: set[str] = set()
    for dims, spec in zip(layout.operands, specs):
        if spec is None:
            continue
        for f, axes in zip(dims, spec):
            main = partner_of.get(f, f)  # a scale dim votes for its value dim's factor
            if not axes or main in chosen or main not in shardable or used & set(axes):
                continue
            if any(a not in mesh.shape for a in axes):
                continue
            n = math.prod(mesh.shape[a] for a in axes)
            size = sizes[main]
            if n <= 1 or size % n:
                continue
            if main in layout.blocked and (size // n) % BLOCK:
                continue
            chosen[main] = tuple(axes)
            used |= set(axes)
            if layout.blocked.get(main):
                chosen[layout.blocked[main]] = tuple(axes)
    return chosen


def sharding_rule(layout: Layout, shapes: Sequence[tuple[int, ...]]) -> tuple[str, dict[str, Any]]:
    """The Shardy rule string and keywords of ``layout`` for these operand shapes.

    A 128-blocked factor whose size is a multiple of 128 becomes the compound ``(blocks inner)``
    with ``inner`` = 128 never sharded, and ``blocks`` shared with its scale dim; a blocked factor
    of any other size, and every factor the op does not allow to shard, needs replication.
    """
    sizes = _sizes(layout, shapes)
    partner_of = {v: k for k, v in layout.blocked.items() if v}
    shardable = layout.free | layout.reduce
    replicate: set[str] = set()
    reduction: set[str] = set()
    kw: dict[str, Any] = {}

    def name(f: str) -> str:
        main = partner_of.get(f, f)
        if main not in shardable:
            replicate.add(f)
            return f
        if main in layout.blocked:
            size = sizes.get(main, 0)
            if size <= BLOCK or size % BLOCK:  # one block (or a partial one) cannot split
                replicate.add(f)
                return f
            outer = layout.blocked[main] or f"{main}_blocks"
            if not layout.blocked[main]:
                kw[outer] = size // BLOCK  # no scale dim to infer it from
            if main in layout.reduce:
                reduction.add(outer)
            if f == main:
                inner = f"{main}_in"
                kw[inner] = BLOCK
                replicate.add(inner)
                return f"({outer} {inner})"
            return outer
        if main in layout.reduce:
            reduction.add(f)
        return f

    ops = ", ".join(" ".join(name(f) for f in dims) for dims in layout.operands)
    res = ", ".join(" ".join(name(f) for f in dims) for dims in layout.results)
    rule = f"{ops} -> {res}"
    # Shardy wants the special factors in the order the factors first appear in the rule.
    order = list(dict.fromkeys(re.findall(r"[A-Za-z_][A-Za-z_0-9]*", rule)))
    if reduction:
        kw["reduction_factors"] = tuple(sorted(reduction, key=order.index))
    if replicate:
        kw["need_replication_factors"] = tuple(sorted(replicate, key=order.index))
    return rule, kw


# Eager calls: one jitted op per (layout, key, DSJAX_* environment), reused across calls.
_EAGER: dict[Any, Callable[..., Any]] = {}
_EAGER_MAX = 256


def _is_eager(args: Sequence[Any]) -> bool:
    return not any(isinstance(a, jax.core.Tracer) for a in args)


def _env_key() -> tuple[tuple[str, str], ...]:
    # Kernel selection (DSJAX_DEEP_GEMM_KERNEL, ...) is read at trace time: a cached executable
    # must not outlive a change of it.
    return tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith("DSJAX_")))


def partitioned(layout: Layout, local: Callable[..., Any], *,
                partial: Callable[..., Any] | None = None,
                finish: Callable[..., Any] | None = None,
                vmap_rule: Callable[..., Any] | None = None,
                key: Any = None) -> Callable[..., Any]:
    """Wraps the per-device function ``local(*operands)`` as a partitioned op.

    Args:
        layout: the op's factors (one entry per operand and result of ``local``).
        local: runs the op on (local) arrays; returns one array or a tuple.
        partial: for ops with ``layout.reduce``: ``partial(*operands) -> float32`` partial
            product of the local K slice (no accumulator, no cast).
        finish: ``finish(summed, *operands) -> result``: the epilogue after the ``psum``
            (adds the accumulator, casts).
        vmap_rule: ``vmap_rule(axis_size, in_batched, *operands) -> (out, out_batched)``; by
            default the unpartitioned ``local`` is vmapped (a loop for the GEMMs).
        key: hashable; when given, it must determine ``local``, ``partial``, ``finish`` and
            ``vmap_rule`` completely (everything their closures capture). Eager calls (no
            tracer among the operands) then run one ``jax.jit`` of the op cached under
            ``(layout, key)`` instead of re-tracing and re-wrapping it on every call (about
            1 ms of Python per call); traced calls are unaffected.

    Returns:
        A function of the operands with ``local``'s results.
    """
    call = _partitioned(layout, local, partial, finish, vmap_rule)
    if key is None:
        return call

    def maybe_cached(*args: jax.Array) -> Any:
        if not _is_eager(args):
            return call(*args)
        k = (layout, key, _env_key())
        fn = _EAGER.get(k)
        if fn is None:
            if len(_EAGER) >= _EAGER_MAX:
                _EAGER.clear()
            fn = _EAGER[k] = jax.jit(call)
        return fn(*args)

    return maybe_cached


def _partitioned(layout: Layout, local: Callable[..., Any], partial: Callable[..., Any] | None,
                 finish: Callable[..., Any] | None,
                 vmap_rule: Callable[..., Any] | None) -> Callable[..., Any]:
    multi = len(layout.results) > 1

    def call(*args: jax.Array) -> Any:
        explicit = _explicit_specs(args)
        if explicit is not None:
            return _explicit_call(layout, explicit, args, local, partial, finish, multi)
        # custom_partitioning refuses bodies that capture constants: trace once and pass any as
        # operands. (None of ours captures one, and none should: jaxlib 0.11.2's compiler crashes
        # on such an extra operand inside shard_map; tests check the GEMMs' traces.)
        closed = jax.make_jaxpr(local)(*args)
        consts = tuple(jnp.asarray(c) for c in closed.consts)
        lay = layout
        if consts:
            extra = tuple(tuple(f"const{i}_{d}" for d in range(c.ndim))
                          for i, c in enumerate(consts))
            lay = dataclasses.replace(layout, operands=layout.operands + extra)
        n = len(args)

        def body(*xs: jax.Array) -> Any:
            out = jax.core.eval_jaxpr(closed.jaxpr, xs[n:], *xs[:n])
            return tuple(out) if multi else out[0]

        def drop(fn: Callable[..., Any] | None) -> Callable[..., Any] | None:
            return None if fn is None else (lambda *xs: fn(*xs[:n]))

        def drop_finish(total: jax.Array, *xs: jax.Array) -> Any:
            return finish(total, *xs[:n])  # type: ignore[misc]

        shapes = tuple(tuple(a.shape) for a in args + consts)
        op = _build(lay, shapes, body, drop(local), drop(partial),
                    drop_finish if finish is not None else None, multi)
        fn = jax.custom_batching.custom_vmap(lambda *xs: op(*xs, *consts))

        @fn.def_vmap
        def _rule(axis_size, in_batched, *xs):  # pylint: disable=unused-variable
            if vmap_rule is not None:
                return vmap_rule(axis_size, in_batched, *xs)
            out = jax.vmap(local, in_axes=tuple(0 if b else None for b in in_batched))(*xs)
            return out, jax.tree.map(lambda _: True, out)

        return fn(*args)

    return call


def _per_shard(layout: Layout, chosen: dict[str, tuple[str, ...]], local: Callable[..., Any],
               partial: Callable[..., Any] | None,
               finish: Callable[..., Any] | None) -> Callable[..., Any]:
    """What one device runs: ``local``, or partial product + psum over the K axes + epilogue."""
    k_axes = tuple(a for f in sorted(layout.reduce) for a in chosen.get(f, ()))
    if not k_axes:
        return local
    if partial is None or finish is None:
        raise AssertionError("a reduce factor was sharded for an op without a partial product")

    def lower(*xs: jax.Array) -> Any:
        return finish(jax.lax.psum(partial(*xs), k_axes), *xs)

    return lower


def _explicit_specs(args: Sequence[jax.Array]) -> tuple[Any, list] | None:
    """(mesh, per-operand specs over its Explicit axes) when an operand is sharded over an
    Explicit mesh axis (``jax.sharding.AxisType.Explicit``: shardings are part of the types, so
    the op must give its results sharded types at trace time); else None."""
    mesh, specs, found = None, [], False
    for a in args:
        sh = getattr(jax.typeof(a), "sharding", None)
        m = getattr(sh, "mesh", None)
        if m is None or getattr(m, "empty", True):
            specs.append(None)
            continue
        kinds = dict(zip(m.axis_names, m.axis_types))
        spec = tuple(tuple(x for x in _axes(e) if kinds.get(x) == jax.sharding.AxisType.Explicit)
                     for e in tuple(sh.spec) + (None,) * (a.ndim - len(sh.spec)))
        if any(spec):
            if mesh is not None and m != mesh:
                return None  # mixed meshes: let jit report it
            mesh, found = m, True
        specs.append(spec)
    return (mesh, specs) if found else None


def _explicit_call(layout: Layout, explicit: tuple[Any, list], args: Sequence[jax.Array],
                   local: Callable[..., Any], partial: Callable[..., Any] | None,
                   finish: Callable[..., Any] | None, multi: bool) -> Any:
    """Explicit axes: the same plan, run as a ``shard_map`` chosen at trace time."""
    mesh, specs = explicit
    shapes = tuple(tuple(a.shape) for a in args)
    chosen = plan(layout, mesh, shapes, specs)

    def spec(dims: Dims) -> P:
        return P(*[(chosen.get(f) or None) for f in dims])

    in_specs = tuple(spec(d) for d in layout.operands)
    out_specs = tuple(spec(d) for d in layout.results)
    # Operands the plan shards differently (a straddled block, a K that must stay whole) are
    # resharded here, visibly in the types; the rest pass through untouched.
    args = tuple(jax.sharding.reshard(a, s) for a, s in zip(args, in_specs))
    fn = jax.shard_map(_per_shard(layout, chosen, local, partial, finish), mesh=mesh,
                       in_specs=in_specs, out_specs=out_specs if multi else out_specs[0],
                       axis_names=set(a for a, t in zip(mesh.axis_names, mesh.axis_types)
                                      if t == jax.sharding.AxisType.Explicit))
    return fn(*args)


def _build(layout: Layout, shapes: tuple[tuple[int, ...], ...], body: Callable[..., Any],
           local: Callable[..., Any], partial: Callable[..., Any] | None,
           finish: Callable[..., Any] | None, multi: bool) -> Callable[..., Any]:
    """custom_partitioning of ``body`` (global shapes); ``local`` etc. run per shard."""
    op = custom_partitioning(body)

    def part(mesh, arg_shapes, result_shape):
        specs = [_spec(a.sharding, len(a.shape), mesh) for a in arg_shapes]
        chosen = plan(layout, mesh, shapes, specs)

        def sh(dims: Dims) -> NamedSharding:
            return NamedSharding(mesh, P(*[(chosen.get(f) or None) for f in dims]))

        arg_sh = tuple(sh(d) for d in layout.operands)
        res_sh = tuple(sh(d) for d in layout.results)
        lower = _per_shard(layout, chosen, local, partial, finish)
        return mesh, lower, (res_sh if multi else res_sh[0]), arg_sh

    rule, kw = sharding_rule(layout, shapes)
    # Undecoded: a sub-axis sharding must reach `part` (which ignores it), not fail in decoding.
    op.def_partition(partition=part, sharding_rule=rule, decode_shardings=False, **kw)
    return op


@functools.cache
def gemm_layout(kind: str, has_c: bool, n_blocked: bool = True) -> Layout:
    """The factors of the GEMM FFI calls (``kind``: dense | contiguous | masked | k_grouped)."""
    c = (("m", "n"),) if has_c else ()
    if kind == "dense":
        nb = ("nb",) if n_blocked else ("n",)
        return Layout(operands=(("m", "k"), ("m", "kb"), ("n", "k"), (*nb, "kb"), *c),
                      results=(("m", "n"),), free=frozenset({"m", "n"}),
                      reduce=frozenset({"k"}),
                      blocked={"k": "kb", **({"n": "nb"} if n_blocked else {})})
    if kind == "contiguous":
        return Layout(operands=(("m", "k"), ("m", "kb"), ("g", "n", "k"), ("g", "nb", "kb"),
                                ("m",)),
                      results=(("m", "n"),), free=frozenset({"m", "n"}),
                      reduce=frozenset({"k"}), blocked={"k": "kb", "n": "nb", "m": ""})
    if kind == "masked":
        return Layout(operands=(("g", "r", "k"), ("g", "r", "kb"), ("g", "n", "k"),
                                ("g", "nb", "kb"), ("g",)),
                      results=(("g", "r", "n"),), free=frozenset({"g", "n"}),
                      reduce=frozenset({"k"}), blocked={"k": "kb", "n": "nb"})
    if kind == "k_grouped":
        cc = (("g", "m", "n"),) if has_c else ()
        return Layout(operands=(("m", "k"), ("m", "kb"), ("n", "k"), ("n", "kb"), ("g",), *cc),
                      results=(("g", "m", "n"),), free=frozenset({"m", "n"}),
                      blocked={"k": "kb"})
    raise ValueError(f"unknown GEMM kind {kind!r}")


@functools.cache
def quant_layout(kind: str, ndim: int) -> Layout:
    """Factors of the quantizers: leading batch dims free, block dims in 128 steps."""
    lead = tuple(f"b{i}" for i in range(ndim - (1 if kind == "token" else 2)))
    if kind == "token":
        return Layout(operands=((*lead, "k"),), results=((*lead, "k"), (*lead, "kb")),
                      free=frozenset({*lead, "k"}), blocked={"k": "kb"})
    return Layout(operands=((*lead, "m", "n"),), results=((*lead, "m", "n"), (*lead, "mb", "nb")),
                  free=frozenset({*lead, "m", "n"}), blocked={"m": "mb", "n": "nb"})


