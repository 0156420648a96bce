"""Pipeline schedules as data: GPipe, 1F1B, ZB1P, DualPipe and DualPipeV, plus ``validate``.

A :class:`Schedule` is, per pipeline rank, the ordered list of operations that rank runs. The
generators follow the published schedules:

* GPipe (Huang et al., 2019): all forwards, then all backwards.
* 1F1B (PipeDream-Flush, Narayanan et al., 2021): ``pp - 1 - r`` warm-up forwards, then one
  forward / one backward alternation, then the cool-down backwards.
* ZB1P (ZB-H1 of "Zero Bubble Pipeline Parallelism", Qi et al., 2024): 1F1B with each backward
  split into the input-gradient part ``BI`` (on the critical path) and the weight-gradient part
  ``W`` (deferred, rank ``r`` by ``r`` positions, to fill the cool-down bubble).
* DualPipe (DeepSeek-V3 technical report; deepseek-ai/DualPipe ``dualpipe.py``): rank ``r`` holds
  stages ``r`` and ``pp-1-r``; the first half of the micro-batches enter at rank 0 and the second
  half at rank ``pp-1``; each rank runs DeepSeek's 8 steps (warm-up forwards, forward pairs,
  zero-bubble backwards, the overlapped forward&backward main loop, the cool-down with deferred
  weight gradients).
* DualPipeV (deepseek-ai/DualPipe ``dualpipev.py``, the "cut-in-half" variant): ``2·pp`` stages,
  rank ``r`` holds stages ``r`` and ``2·pp-1-r``; every micro-batch enters at rank 0, goes down to
  rank ``pp-1`` and comes back up.

Op kinds: ``F`` forward, ``B`` full backward, ``BI`` input-gradient backward, ``W`` weight-gradient
backward of an earlier ``BI``, ``FB`` a forward of one (stage, micro-batch) issued together with
the full backward of another so their compute and communication overlap.
"""

from __future__ import annotations

import dataclasses
from typing import Iterable, Sequence

KINDS = ("F", "B", "BI", "W", "FB")


@dataclasses.dataclass(frozen=True)
class Op:
    """One operation of one rank.

    Attributes:
        kind: ``"F"``, ``"B"``, ``"BI"``, ``"W"`` or ``"FB"``.
        stage: the stage (model chunk) of the op; for ``FB`` the stage of the forward half.
        mb: the micro-batch; for ``FB`` the micro-batch of the forward half.
        b_stage: ``FB`` only: the stage of the backward half (a full ``B``).
        b_mb: ``FB`` only: the micro-batch of the backward half.
    """

    kind: str
    stage: int
    mb: int
    b_stage: int | None = None
    b_mb: int | None = None

    def parts(self) -> tuple["Op", ...]:
        """The elementary ops: ``(F, B)`` for an ``FB``, ``(self,)`` otherwise."""
        if self.kind == "FB":
            return (Op("F", self.stage, self.mb), Op("B", self.b_stage, self.b_mb))
        return (self,)

    def __str__(self) -> str:
        if self.kind == "FB":
            return f"FB(s{self.stage}m{self.mb}|s{self.b_stage}m{self.b_mb})"
        return f"{self.kind}(s{self.stage}m{self.mb})"


@dataclasses.dataclass(frozen=True)
class Schedule:
    """Per-rank op lists of a pipeline schedule.

    Attributes:
        name: the generator's name (``"1f1b"``, ``"dualpipe"``, ...).
        pp: number of pipeline ranks.
        num_stages: number of model stages (``pp``, or ``2·pp`` for DualPipeV).
        num_microbatches: number of micro-batches of one step.
        rank_stages: per rank, the stages it holds, in local-slot order (slot 0 first). A stage may
            live on several ranks (DualPipe keeps two copies of every stage).
        ranks: per rank, the ops in execution order.
    """

    name: str
    pp: int
    num_stages: int
    num_microbatches: int
    rank_stages: tuple[tuple[int, ...], ...]
    ranks: tuple[tuple[Op, ...], ...]

    def placement(self) -> dict[tuple[int, int], int]:
        """Maps (stage, micro-batch) to the rank that runs its forward."""
        out: dict[tuple[int, int], int] = {}
        for r, ops in enumerate(self.ranks):
            for op in ops:
                for p in op.parts():
                    if p.kind == "F":
                        out[(p.stage, p.mb)] = r
        return out

    @property
    def has_backward(self) -> bool:
        return any(p.kind != "F" for ops in self.ranks for op in ops for p in op.parts())

    def forward_only(self) -> "Schedule":
        """The same schedule with all backward work removed (``FB`` becomes its ``F``)."""
        ranks = tuple(tuple(op.parts()[0] for op in ops if op.kind in ("F", "FB")) for ops in self.ranks)
        return dataclasses.replace(self, ranks=ranks)

    def describe(self) -> str:
        """One line per rank, e.g. ``rank 0: F(s0m0) F(s0m1) ...``."""
        return "\n".join(f"rank {r}: " + " ".join(map(str, ops)) for r, ops in enumerate(self.ranks))


def _check_positive(name: str, value: int, *, op: str) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{op}: {name} must be a positive int, got {value!r}")


def _linear(name: str, pp: int, n: int, ranks: list[list[Op]]) -> Schedule:
    return Schedule(name, pp, pp, n, tuple((r,) for r in range(pp)), tuple(tuple(o) for o in ranks))


def gpipe(pp: int, num_microbatches: int) -> Schedule:
    """GPipe: every rank runs all its forwards, then all its backwards (same micro-batch order).

    Stage ``r`` lives on rank ``r``. Peak activations: ``num_microbatches`` on every rank.
    """
    _check_positive("pp", pp, op="gpipe")
    _check_positive("num_microbatches", num_microbatches, op="gpipe")
    n = num_microbatches
    ranks = [[Op("F", r, m) for m in range(n)] + [Op("B", r, m) for m in range(n)] for r in range(pp)]
    return _linear("gpipe", pp, n, ranks)


def one_f_one_b(pp: int, num_microbatches: int) -> Schedule:
    """1F1B: ``min(pp-1-r, n)`` warm-up forwards, then F/B alternation, then cool-down backwards.

    Stage ``r`` lives on rank ``r``. Peak activations on rank ``r``: ``min(pp - r, n)``.
    """
    _check_positive("pp", pp, op="one_f_one_b")
    _check_positive("num_microbatches", num_microbatches, op="one_f_one_b")
    n = num_microbatches
    ranks = []
    for r in range(pp):
        warm = min(pp - 1 - r, n)
        ops = [Op("F", r, m) for m in range(warm)]
        for i in range(n - warm):
            ops += [Op("F", r, warm + i), Op("B", r, i)]
        ops += [Op("B", r, m) for m in range(n - warm, n)]
        ranks.append(ops)
    return _linear("1f1b", pp, n, ranks)


def zb1p(pp: int, num_microbatches: int) -> Schedule:
    """ZB1P (ZB-H1): 1F1B with every backward split into ``BI`` and a deferred ``W``.

    Rank ``r`` keeps 1F1B's ``pp-1-r`` warm-up forwards and 1F1B's order of forwards and input
    gradients, and defers each weight gradient until ``r`` newer ones are pending (the ``W`` of
    micro-batch ``i`` follows the ``BI`` of micro-batch ``i + r``); its last ``r`` weight gradients
    run at the end, while rank 0 finishes. Input gradients thus travel back one hop per ``B - W``
    instead of per ``B``, which is the zero-bubble gain. Every rank holds at most ``pp``
    activations (an activation lives until its ``W``). Stage ``r`` lives on rank ``r``. The bubble
    is ``(pp-1)(F+B-2W)`` under the conditions stated in :mod:`dsjax.dualpipe.simulate`.
    """
    _check_positive("pp", pp, op="zb1p")
    _check_positive("num_microbatches", num_microbatches, op="zb1p")
    n = num_microbatches
    ranks = []
    for r in range(pp):
        warm = min(pp - 1 - r, n)
        ops = [Op("F", r, m) for m in range(warm)]
        pending: list[int] = []

        def bi(m: int) -> None:
            ops.append(Op("BI", r, m))
            pending.append(m)
            if len(pending) > r:
                ops.append(Op("W", r, pending.pop(0)))

        for i in range(n - warm):
            ops.append(Op("F", r, warm + i))
            bi(i)
        for m in range(n - warm, n):
            bi(m)
        ops += [Op("W", r, m) for m in pending]
        ranks.append(ops)
    return _linear("zb1p", pp, n, ranks)


class _Rank:
    """Builds one rank's op list for the DualPipe family, mirroring DeepSeek's per-phase counters."""

    def __init__(self, phase_stage: tuple[int, int], phase_mb0: tuple[int, int]):
        self.stage = phase_stage
        self.mb0 = phase_mb0
        self.nf = [0, 0]
        self.nb = [0, 0]
        self.pending_w: list[tuple[int, int]] = []
        self.ops: list[Op] = []

    def _next_f(self, ph: int) -> tuple[int, int]:
        m = self.mb0[ph] + self.nf[ph]
        self.nf[ph] += 1
        return self.stage[ph], m

    def _next_b(self, ph: int) -> tuple[int, int]:
        m = self.mb0[ph] + self.nb[ph]
        self.nb[ph] += 1
        return self.stage[ph], m

    def f(self, ph: int) -> None:
        self.ops.append(Op("F", *self._next_f(ph)))

    def b(self, ph: int, zb: bool = False) -> None:
        s, m = self._next_b(ph)
        if zb:
            self.ops.append(Op("BI", s, m))
            self.pending_w.append((s, m))
        else:
            self.ops.append(Op("B", s, m))

    def w(self) -> None:
        s, m = self.pending_w.pop(0)  # DeepSeek's WeightGradStore is a FIFO
        self.ops.append(Op("W", s, m))

    def fb(self, ph_f: int, ph_b: int) -> None:
        fs, fm = self._next_f(ph_f)
        bs, bm = self._next_b(ph_b)
        self.ops.append(Op("FB", fs, fm, bs, bm))


def _eight_steps(rk: _Rank, ph0: int, half_ranks: int, h: int, chunks: int, middle: bool) -> None:
    """DeepSeek's 8 steps for one rank.

    Args:
        rk: the rank builder; phases are the builder's (0 or 1).
        ph0: the builder phase playing the code's "phase 0" (DualPipe swaps phases in the second
            half of the ranks).
        half_ranks: ranks on one side of the turning point (``pp/2`` for DualPipe, ``pp`` for V).
        h: distance of the rank from the pipeline's entry (``min(r, pp-1-r)`` or ``r``).
        chunks: micro-batches per direction.
        middle: the rank where the two directions meet (it does not overlap its first pair).
    """
    p0, p1 = ph0, 1 - ph0
    for _ in range((half_ranks - h - 1) * 2):  # step 1: nF0
        rk.f(p0)
    for _ in range(h + 1):  # step 2: nF0F1
        rk.f(p0)
        rk.f(p1)
    for _ in range(half_ranks - h - 1):  # step 3: nB1W1F1, zero bubble
        rk.b(p1, zb=True)
        rk.w()
        rk.f(p1)
    for i in range(chunks - 2 * half_ranks + h + 1):  # step 4, main loop: nF0B1F1B0
        if i == 0 and middle:
            rk.f(p0)  # DeepSeek does not overlap this first pair, it shortens the bubble
            rk.b(p1)
        else:
            rk.fb(p0, p1)
        rk.fb(p1, p0)
    for _ in range(half_ranks - h - 1):  # step 5: nB1F1B0
        rk.b(p1)
        rk.fb(p1, p0)
    zb = False
    for i in range(h + 1):  # step 6: nB1B0, the second half with zero bubble
        if i == (h + 1) // 2 and h % 2 == 1:
            zb = True
        rk.b(p1, zb=zb)
        if i == (h + 1) // 2 and h % 2 == 0:
            zb = True
        rk.b(p0, zb=zb)
    for _ in range(half_ranks - h - 1):  # step 7: nWB0
        rk.w()
        rk.b(p0, zb=True)
    for _ in range(h + 1):  # step 8: nW
        rk.w()
    assert not rk.pending_w


def dualpipe(pp: int, num_microbatches: int) -> Schedule:
    """DualPipe: bidirectional pipeline, two copies of every stage.

    Rank ``r`` holds stage ``r`` (slot 0) for the micro-batches ``0 .. n/2-1`` that enter at rank 0
    and stage ``pp-1-r`` (slot 1) for the micro-batches ``n/2 .. n-1`` that enter at rank ``pp-1``.

    Args:
        pp: pipeline ranks, even and >= 2.
        num_microbatches: ``n``, even and ``>= 2·pp``.
    """
    op = "dualpipe"
    _check_positive("pp", pp, op=op)
    _check_positive("num_microbatches", num_microbatches, op=op)
    if pp % 2:
        raise ValueError(f"{op}: pp must be even, got {pp}")
    n = num_microbatches
    if n % 2 or n < 2 * pp:
        raise ValueError(f"{op}: num_microbatches must be even and >= 2*pp = {2 * pp}, got {n}")
    half = n // 2
    ranks = []
    for r in range(pp):
        rk = _Rank((r, pp - 1 - r), (0, half))
        second = r >= pp // 2
        _eight_steps(rk, int(second), pp // 2, min(r, pp - 1 - r), half, r in (pp // 2 - 1, pp // 2))
        ranks.append(tuple(rk.ops))
    return Schedule("dualpipe", pp, pp, n, tuple((r, pp - 1 - r) for r in range(pp)), tuple(ranks))


def dualpipev(pp: int, num_microbatches: int) -> Schedule:
    """DualPipeV: the "cut-in-half" DualPipe; ``2·pp`` stages in a V, one copy of each.

    Rank ``r`` holds stage ``r`` (slot 0, on the way down) and stage ``2·pp-1-r`` (slot 1, on the way
    back up); every micro-batch enters and leaves at rank 0.

    Args:
        pp: pipeline ranks, >= 1.
        num_microbatches: ``n >= 2·pp``.
    """
    op = "dualpipev"
    _check_positive("pp", pp, op=op)
    _check_positive("num_microbatches", num_microbatches, op=op)
    n = num_microbatches
    if n < 2 * pp:
        raise ValueError(f"{op}: num_microbatches must be >= 2*pp = {2 * pp}, got {n}")
    ranks = []
    for r in range(pp):
        rk = _Rank((r, 2 * pp - 1 - r), (0, 0))
        _eight_steps(rk, 0, pp, r, n, r == pp - 1)
        ranks.append(tuple(rk.ops))
    return Schedule("dualpipev", pp, 2 * pp, n, tuple((r, 2 * pp - 1 - r) for r in range(pp)), tuple(ranks))


SCHEDULES = {"gpipe": gpipe, "1f1b": one_f_one_b, "zb1p": zb1p, "dualpipe": dualpipe, "dualpipev": dualpipev}


def make_schedule(name: str, pp: int, num_microbatches: int) -> Schedule:
    """Builds a schedule by name: one of ``gpipe, 1f1b, zb1p, dualpipe, dualpipev``."""
    if name not in SCHEDULES:
        raise ValueError(f"make_schedule: name must be one of {', '.join(SCHEDULES)}, got {name!r}")
    return SCHEDULES[name](pp, num_microbatches)


def dependencies(op: Op, num_stages: int) -> list[tuple[str, int, int]]:
    """What an elementary op waits for, as ``(kind, stage, mb)``; ``"B*"`` is a ``B`` or a ``BI``."""
    s, m = op.stage, op.mb
    if op.kind == "F":
        return [("F", s - 1, m)] if s > 0 else []
    if op.kind in ("B", "BI"):
        deps = [("F", s, m)]
        if s < num_stages - 1:
            deps.append(("B*", s + 1, m))
        return deps
    if op.kind == "W":
        return [("BI", s, m)]
    raise ValueError(f"dependencies: op must be elementary, got {op}")


def validate(schedule: Schedule) -> None:
    """Checks that a schedule is complete and can run; raises ``ValueError`` saying what is wrong.

    Checks: ``len(ranks) == len(rank_stages) == pp``; kinds, stages and micro-batches in range; each
    op's stage held by its rank; every (stage, micro-batch) has exactly one ``F``; either no op
    of the schedule is a backward (a forward-only schedule) or every (stage, micro-batch) has
    exactly one ``B``, or one ``BI`` and one ``W``, on the rank of its ``F``; the two halves of
    an ``FB`` are independent; and the dependencies can all be met (no deadlock), found by running
    the schedule with unit op times.
    """
    from dsjax.dualpipe.simulate import simulate  # the deadlock check is a simulation

    name = f"validate({schedule.name})"
    S, n, pp = schedule.num_stages, schedule.num_microbatches, schedule.pp
    if len(schedule.ranks) != pp or len(schedule.rank_stages) != pp:
        raise ValueError(f"{name}: ranks and rank_stages must have pp={pp} entries, got "
                         f"{len(schedule.ranks)} and {len(schedule.rank_stages)}")
    counts: dict[tuple[str, int, int], list[int]] = {}
    for r, ops in enumerate(schedule.ranks):
        for op in ops:
            if op.kind not in KINDS:
                raise ValueError(f"{name}: rank {r}: op kind must be one of {KINDS}, got {op.kind!r}")
            if op.kind == "FB":
                if op.b_stage is None or op.b_mb is None:
                    raise ValueError(f"{name}: rank {r}: {op.kind} op needs b_stage and b_mb, got {op}")
                f, b = op.parts()
                if (b.stage, b.mb) == (f.stage, f.mb) or ("F", f.stage, f.mb) in dependencies(b, S):
                    raise ValueError(f"{name}: rank {r}: the halves of {op} depend on each other")
            for p in op.parts():
                if not (0 <= p.stage < S) or not (0 <= p.mb < n):
                    raise ValueError(f"{name}: rank {r}: {op} must have stage in [0, {S}) and "
                                     f"micro-batch in [0, {n})")
                if p.stage not in schedule.rank_stages[r]:
                    raise ValueError(f"{name}: rank {r}: {op} uses stage {p.stage}, but the rank "
                                     f"holds stages {schedule.rank_stages[r]}")
                counts.setdefault((p.kind, p.stage, p.mb), []).append(r)
    backward = schedule.has_backward
    for s in range(S):
        for m in range(n):
            f = counts.get(("F", s, m), [])
            if len(f) != 1:
                raise ValueError(f"{name}: (stage {s}, micro-batch {m}) must have exactly one F, "
                                 f"got {len(f)} (ranks {f})")
            if not backward:
                continue
            b, bi, w = (counts.get((k, s, m), []) for k in ("B", "BI", "W"))
            if not ((len(b) == 1 and not bi and not w) or (not b and len(bi) == 1 and len(w) == 1)):
                raise ValueError(f"{name}: (stage {s}, micro-batch {m}) must have one B, or one BI "
                                 f"and one W; got {len(b)} B, {len(bi)} BI, {len(w)} W")
            if any(rr != f[0] for rr in b + bi + w):
                raise ValueError(f"{name}: the backward of (stage {s}, micro-batch {m}) must run on "
                                 f"rank {f[0]} (its F), got ranks {b + bi + w}")
    simulate(schedule, F=1.0, B=1.0, W=1.0, FB=1.0, check=False)  # raises on deadlock


def rank_stage_slots(schedule: Schedule) -> list[dict[int, int]]:
    """Per rank, stage -> local slot index."""
    return [{s: j for j, s in enumerate(st)} for st in schedule.rank_stages]


def stage_copies(schedule: Schedule) -> dict[int, list[tuple[int, int]]]:
    """Per stage, the (rank, slot) pairs holding a copy of its parameters."""
    out: dict[int, list[tuple[int, int]]] = {s: [] for s in range(schedule.num_stages)}
    for r, st in enumerate(schedule.rank_stages):
        for j, s in enumerate(st):
            out[s].append((r, j))
    return out


def iter_parts(ops: Iterable[Op]) -> Iterable[Op]:
    for op in ops:
        yield from op.parts()


__all__: Sequence[str] = ("Op", "Schedule", "gpipe", "one_f_one_b", "zb1p", "dualpipe", "dualpipev",
                          "make_schedule", "validate", "dependencies", "SCHEDULES")
