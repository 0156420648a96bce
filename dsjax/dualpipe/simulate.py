"""Discrete-event simulation of a pipeline schedule: timeline, bubbles, activation and parameter memory.

Model: every rank runs its ops in the schedule's order, one at a time; an op starts when its rank
is free and every op it depends on has finished (plus ``comm`` when the producer ran on another
rank). Op durations: ``F``, ``B`` (full backward), ``W`` (weight-gradient part), ``BI = B - W``
(input-gradient part), ``FB`` (a forward and a full backward issued together; ``F + B`` unless
given). This is the model of DualPipe's comparison table (deepseek-ai/DualPipe README): identical
stages, no communication time.

Under that model the simulator reproduces the table (tested in ``tests/test_dualpipe_simulate.py``
for ``pp`` in {4, 6, 8}); "bubble" is the largest per-rank bubble:

* 1F1B: ``(pp-1)(F+B)`` on every rank, for all times; peak activations ``pp`` (rank 0); 1 stage.
* ZB1P: ``(pp-1)(F+B-2W)`` on every rank when ``W <= F`` and ``2W <= B`` (a deferred ``W`` fits in
  each wait it is meant to fill); peak activations ``pp``; 1 stage.
* DualPipe: ``(PP/2-1)(F&B+B-3W)`` with ``PP = pp`` when ``B = F + W`` (the input-gradient part
  takes as long as a forward, the usual assumption behind the table), ``W <= F`` and
  ``max(F, B) <= F&B <= F + B``; peak activations ``PP+1`` (every rank); 2 stages per rank.
* DualPipeV: the same formula with ``PP = 2·pp`` stages on ``PP/2`` ranks, under the same
  conditions; peak activations ``PP+1``; 2 stages per rank (DeepSeek's README reports parameters
  per device relative to a ``PP``-rank 1F1B, hence 2x for both).

Outside those conditions the simulated bubble differs from the closed forms (e.g. DualPipe with
``W > F``); the simulator is then the answer, not the formula.

Bubble of a rank = makespan - the time the rank spends in ops.
"""

from __future__ import annotations

import dataclasses

from dsjax.dualpipe.schedules import Op, Schedule, dependencies


@dataclasses.dataclass
class Timeline:
    """Result of :func:`simulate`.

    Attributes:
        events: per rank, ``(op, start, end)`` in execution order.
        total: makespan (end of the last op).
        busy: per rank, time spent in ops.
        bubble: per rank, ``total - busy``.
        peak_activations: per rank, the most (stage, micro-batch) activations held at once: an
            activation is held from the start of its ``F`` until the end of its ``B`` (or ``W``
            when the backward is split); in stage-micro-batch units.
        parameters: per rank, the number of stages (parameter copies) it holds: 1 for 1F1B, 2 for
            DualPipe and DualPipeV (DeepSeek's "Parameter" column).
    """

    events: list[list[tuple[Op, float, float]]]
    total: float
    busy: list[float]
    bubble: list[float]
    peak_activations: list[int]
    parameters: list[int]

    @property
    def max_bubble(self) -> float:
        return max(self.bubble)

    @property
    def bubble_ratio(self) -> float:
        """Idle fraction of the whole pipeline: ``sum(bubble) / (pp * total)``."""
        return sum(self.bubble) / (len(self.bubble) * self.total) if self.total > 0 else 0.0


def op_duration(op: Op, F: float, B: float, W: float, FB: float | None, BI: float | None = None) -> float:
    return {"F": F, "B": B, "BI": B - W if BI is None else BI, "W": W, "FB": F + B if FB is None else FB}[op.kind]


def peak_activations(ops: list[Op] | tuple[Op, ...]) -> int:
    """Largest number of activations one rank holds, given its op order (F adds, B / W frees)."""
    live = peak = 0
    for op in ops:
        for p in op.parts():
            if p.kind == "F":
                live += 1
                peak = max(peak, live)
        for p in op.parts():
            if p.kind in ("B", "W"):
                live -= 1
    return peak


def simulate(schedule: Schedule, *, F: float = 1.0, B: float = 2.0, W: float = 1.0, FB: float | None = None,
             comm: float = 0.0, BI: float | None = None, check: bool = True) -> Timeline:
    """Runs ``schedule`` on the timing model above.

    Args:
        schedule: the schedule; ``check=True`` runs :func:`validate` on it first.
        F, B, W: forward, full-backward and weight-gradient times of one chunk (``0 <= W <= B``).
        FB: time of an overlapped ``FB`` pair; ``None`` means ``F + B`` (no overlap gain).
        comm: time added between an op and a dependent op on another rank.
        BI: time of an input-gradient-only backward; ``None`` means ``B - W``. (The executor's
            lockstep plan uses unit times for every op, which needs ``BI`` set apart from ``B``.)

    Returns:
        The :class:`Timeline`. Raises ``ValueError`` if the schedule deadlocks.
    """
    if not 0 <= W <= B:
        raise ValueError(f"simulate: W must be in [0, B={B}], got {W}")
    if min(F, B, comm) < 0 or (FB is not None and FB < 0):
        raise ValueError(f"simulate: F, B, FB and comm must be >= 0, got F={F} B={B} FB={FB} comm={comm}")
    if check:
        from dsjax.dualpipe.schedules import validate
        validate(schedule)
    S = schedule.num_stages
    pp = schedule.pp
    done: dict[tuple[str, int, int], tuple[float, int]] = {}  # (kind, s, m) -> (end, rank)
    pos = [0] * pp
    free = [0.0] * pp
    events: list[list[tuple[Op, float, float]]] = [[] for _ in range(pp)]
    remaining = sum(len(o) for o in schedule.ranks)
    while remaining:
        progressed = False
        for r in range(pp):
            while pos[r] < len(schedule.ranks[r]):
                op = schedule.ranks[r][pos[r]]
                start = free[r]
                ready = True
                for part in op.parts():
                    for kind, s, m in dependencies(part, S):
                        hit = done.get((kind, s, m))
                        if hit is None and kind == "B*":
                            hit = done.get(("B", s, m)) or done.get(("BI", s, m))
                        if hit is None:
                            ready = False
                            break
                        end, where = hit
                        start = max(start, end + (comm if where != r else 0.0))
                    if not ready:
                        break
                if not ready:
                    break
                end = start + op_duration(op, F, B, W, FB, BI)
                for part in op.parts():
                    done[(part.kind, part.stage, part.mb)] = (end, r)
                events[r].append((op, start, end))
                free[r] = end
                pos[r] += 1
                remaining -= 1
                progressed = True
        if not progressed:
            stuck = "; ".join(f"rank {r} waits at {schedule.ranks[r][pos[r]]}" for r in range(pp)
                              if pos[r] < len(schedule.ranks[r]))
            raise ValueError(f"{schedule.name}: the schedule deadlocks: {stuck}")
    total = max(free) if pp else 0.0
    busy = [sum(e - s for _, s, e in ev) for ev in events]
    return Timeline(
        events=events,
        total=total,
        busy=busy,
        bubble=[total - b for b in busy],
        peak_activations=[peak_activations(ops) for ops in schedule.ranks],
        parameters=[len(st) for st in schedule.rank_stages],
    )


def bubble_table(pp: int, num_microbatches: int, *, F: float = 1.0, B: float = 2.0, W: float = 1.0,
                 FB: float | None = None) -> list[dict[str, object]]:
    """DualPipe's comparison table, simulated: one row per schedule that accepts ``(pp, n)``.

    Each row: ``schedule``, ``bubble`` (the largest per-rank bubble), ``bubble_ratio``,
    ``parameters`` (stages per rank, max), ``activations`` (max over ranks), ``total``.
    """
    from dsjax.dualpipe.schedules import SCHEDULES

    rows = []
    for name, gen in SCHEDULES.items():
        try:
            sched = gen(pp, num_microbatches)
        except ValueError:
            continue
        tl = simulate(sched, F=F, B=B, W=W, FB=FB)
        rows.append({"schedule": name, "bubble": tl.max_bubble, "bubble_ratio": tl.bubble_ratio,
                     "parameters": max(tl.parameters), "activations": max(tl.peak_activations),
                     "total": tl.total})
    return rows
