"""Static execution plan of a schedule: ticks, buffer slots and per-rank int32 op tables.

The executor (:mod:`dsjax.dualpipe.executor`) runs every rank in lockstep "ticks": in one tick each
rank runs at most one op of its list, then the ranks exchange activations and gradients with their
neighbours. The tick of each op comes from :func:`dsjax.dualpipe.simulate.simulate` with unit op
times, so every rank keeps the schedule's order and an op runs once what it needs has arrived.

Buffers are allocated here, in Python, by interval colouring (optimal for intervals): a rank keeps

* ``res`` slots: the VJP residuals of a (stage, micro-batch) from its ``F`` until its ``B`` (or its
  ``W`` when the backward is split); the slot count equals the simulator's peak activations;
* ``ain`` slots: activations received and not yet consumed by their ``F``;
* ``gin`` slots: output gradients received, kept until the ``B`` (or until the ``W``: the weight
  gradient needs the output gradient again).

Every buffer has one extra "trash" slot (the last index) that absorbs writes of idle fields, so the
executor never branches on whether a field is used.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from dsjax.dualpipe.schedules import Op, Schedule, validate
from dsjax.dualpipe.simulate import simulate

KIND_CODE = {"idle": 0, "F": 1, "B": 2, "BI": 3, "W": 4, "FB": 5}
CODE_KIND = {v: k for k, v in KIND_CODE.items()}
DST_NONE, DST_DOWN, DST_UP, DST_SELF = 0, 1, 2, 3

FIELDS = (
    "kind",
    # forward half
    "f_slot", "f_stage", "f_mb", "f_from_input", "f_ain", "f_res", "f_last", "f_dst", "f_done",
    # backward half (B, BI, W)
    "b_slot", "b_stage", "b_mb", "b_res", "b_gin", "b_last", "b_dst", "b_acc",
    # where this tick's arrivals go
    "r_act_prev", "r_act_next", "r_grad_prev", "r_grad_next", "r_act_self", "r_grad_self",
)
FIELD = {name: i for i, name in enumerate(FIELDS)}


@dataclasses.dataclass(frozen=True)
class Plan:
    """Static tables of one schedule.

    Attributes:
        schedule: the schedule (forward-only when ``train`` is False).
        train: whether the plan includes backward work.
        ticks: number of lockstep ticks ``T``.
        table: int32 ``[pp, T, len(FIELDS)]``; column meanings in :data:`FIELDS`.
        num_res, num_ain, num_gin: real slots per buffer (the trash slot is extra).
        num_slots: local stage slots per rank (1, or 2 for the DualPipe family).
        stage_index: int32 ``[pp, num_slots]``: the stage held in each local slot.
        channels: which of ``act_down, act_up, grad_down, grad_up`` carry data at some tick.
    """

    schedule: Schedule
    train: bool
    ticks: int
    table: np.ndarray
    num_res: int
    num_ain: int
    num_gin: int
    num_slots: int
    stage_index: np.ndarray
    channels: tuple[str, ...]


def _colour(intervals: list[tuple[float, float, object]]) -> tuple[dict[object, int], int]:
    """Greedy colouring of half-open intervals ``[start, end)`` sorted by start: slot per key."""
    free: list[int] = []
    busy: list[tuple[float, int]] = []
    out: dict[object, int] = {}
    count = 0
    for start, end, key in sorted(intervals, key=lambda t: (t[0], t[1])):
        busy.sort()
        while busy and busy[0][0] <= start:
            free.append(busy.pop(0)[1])
        if free:
            free.sort()
            slot = free.pop(0)
        else:
            slot, count = count, count + 1
        out[key] = slot
        busy.append((end, slot))
    return out, count


def _direction(src: int, dst: int, what: str) -> int:
    if dst == src:
        return DST_SELF
    if dst == src + 1:
        return DST_DOWN
    if dst == src - 1:
        return DST_UP
    raise ValueError(f"DualPipe executor: {what} must move between neighbour ranks, got rank {src} -> "
                     f"rank {dst}")


def build_plan(schedule: Schedule, *, train: bool = True) -> Plan:
    """Builds the tables for ``schedule`` (its forward-only version when ``train`` is False)."""
    validate(schedule)
    if train and not schedule.has_backward:
        raise ValueError(f"DualPipe executor: schedule {schedule.name!r} has no backward ops; "
                         f"use forward mode for a forward-only schedule")
    sched = schedule if train else schedule.forward_only()
    S, n, pp = sched.num_stages, sched.num_microbatches, sched.pp
    L = max(len(st) for st in sched.rank_stages)
    for r, st in enumerate(sched.rank_stages):
        if len(st) != L:
            raise ValueError(f"DualPipe executor: every rank must hold the same number of stages, "
                             f"rank 0 holds {L}, rank {r} holds {len(st)}")
    stage_index = np.array([list(st) for st in sched.rank_stages], np.int32)
    slot_of = [{s: j for j, s in enumerate(st)} for st in sched.rank_stages]

    tl = simulate(sched, F=1.0, B=1.0, W=1.0, FB=1.0, BI=1.0, check=False)
    T = int(round(tl.total))
    tick: dict[tuple[str, int, int], int] = {}  # (elementary kind, stage, mb) -> tick
    where: dict[tuple[int, int], int] = sched.placement()
    for r, ev in enumerate(tl.events):
        for op, start, _ in ev:
            for p in op.parts():
                tick[(p.kind, p.stage, p.mb)] = int(round(start))

    def bwd_tick(s: int, m: int) -> tuple[int, str]:
        if ("B", s, m) in tick:
            return tick[("B", s, m)], "B"
        return tick[("BI", s, m)], "BI"

    def last_use(s: int, m: int) -> int:
        return tick[("W", s, m)] if ("W", s, m) in tick else tick[("B", s, m)]

    # buffer intervals per rank
    res_iv: list[list] = [[] for _ in range(pp)]
    ain_iv: list[list] = [[] for _ in range(pp)]
    gin_iv: list[list] = [[] for _ in range(pp)]
    for (s, m), r in where.items():
        tf = tick[("F", s, m)]
        if train:
            res_iv[r].append((tf, last_use(s, m) + 1, (s, m)))
        if s > 0:  # the input arrives at the end of the producer's tick, is read at this F
            ain_iv[r].append((tick[("F", s - 1, m)] + 0.5, tf + 0.5, (s, m)))
        if train and s < S - 1:
            tb_next, _ = bwd_tick(s + 1, m)
            gin_iv[r].append((tb_next + 0.5, last_use(s, m) + 0.5, (s, m)))
    res_slot, ain_slot, gin_slot = [], [], []
    num_res = num_ain = num_gin = 0
    for r in range(pp):
        a, c = _colour(res_iv[r]); res_slot.append(a); num_res = max(num_res, c)
        a, c = _colour(ain_iv[r]); ain_slot.append(a); num_ain = max(num_ain, c)
        a, c = _colour(gin_iv[r]); gin_slot.append(a); num_gin = max(num_gin, c)

    table = np.zeros((pp, T, len(FIELDS)), np.int32)
    # defaults: every slot field points at its buffer's trash slot
    for name, val in (("f_ain", num_ain), ("f_res", num_res), ("f_done", n), ("b_res", num_res),
                      ("b_gin", num_gin), ("b_acc", L), ("r_act_prev", num_ain), ("r_act_next", num_ain),
                      ("r_grad_prev", num_gin), ("r_grad_next", num_gin), ("r_act_self", num_ain),
                      ("r_grad_self", num_gin), ("f_stage", -1), ("b_stage", -1), ("f_mb", 0), ("b_mb", 0)):
        table[:, :, FIELD[name]] = val
    channels: set[str] = set()
    recv_act = {DST_DOWN: "r_act_prev", DST_UP: "r_act_next", DST_SELF: "r_act_self"}
    recv_grad = {DST_DOWN: "r_grad_prev", DST_UP: "r_grad_next", DST_SELF: "r_grad_self"}

    def put(r: int, t: int, **kv: int) -> None:
        for k, v in kv.items():
            table[r, t, FIELD[k]] = v

    for r, ev in enumerate(tl.events):
        for op, start, _ in ev:
            t = int(round(start))
            put(r, t, kind=KIND_CODE[op.kind])
            for p in op.parts():
                s, m = p.stage, p.mb
                if p.kind == "F":
                    last = s == S - 1
                    put(r, t, f_slot=slot_of[r][s], f_stage=s, f_mb=m, f_from_input=int(s == 0),
                        f_ain=ain_slot[r][(s, m)] if s > 0 else num_ain,
                        f_res=res_slot[r][(s, m)] if train else num_res,
                        f_last=int(last), f_done=m if last else n)
                    if not last:
                        dst = where[(s + 1, m)]
                        d = _direction(r, dst, f"the activation of stage {s} -> {s + 1}")
                        put(r, t, f_dst=d)
                        if d != DST_SELF:
                            channels.add("act_down" if d == DST_DOWN else "act_up")
                        table[dst, t, FIELD[recv_act[d]]] = ain_slot[dst][(s + 1, m)]
                else:
                    last = s == S - 1
                    put(r, t, b_slot=slot_of[r][s], b_stage=s, b_mb=m, b_res=res_slot[r][(s, m)],
                        b_gin=gin_slot[r][(s, m)] if not last else num_gin, b_last=int(last),
                        b_acc=slot_of[r][s] if p.kind in ("B", "W") else L)
                    if p.kind in ("B", "BI") and s > 0:
                        dst = where[(s - 1, m)]
                        d = _direction(r, dst, f"the gradient of stage {s} -> {s - 1}")
                        put(r, t, b_dst=d)
                        if d != DST_SELF:
                            channels.add("grad_down" if d == DST_DOWN else "grad_up")
                        table[dst, t, FIELD[recv_grad[d]]] = gin_slot[dst][(s - 1, m)]
    order = ("act_down", "act_up", "grad_down", "grad_up")
    return Plan(sched, train, T, table, num_res, num_ain, num_gin, L, stage_index,
                tuple(c for c in order if c in channels))


def ops_from_log(log: np.ndarray) -> list[list[Op]]:
    """Turns the executor's op log ``[pp, T, 5]`` (kind, f_stage, f_mb, b_stage, b_mb) into op lists."""
    out = []
    for rows in np.asarray(log):
        ops = []
        for code, fs, fm, bs, bm in rows.tolist():
            kind = CODE_KIND[code]
            if kind == "idle":
                continue
            if kind == "F":
                ops.append(Op("F", fs, fm))
            elif kind == "FB":
                ops.append(Op("FB", fs, fm, bs, bm))
            else:
                ops.append(Op(kind, bs, bm))
        out.append(ops)
    return out
