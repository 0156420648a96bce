"""The simulator reproduces DualPipe's comparison table under the conditions it states."""

from __future__ import annotations

import itertools

import pytest

from dsjax.dualpipe import dualpipe, dualpipev, gpipe, one_f_one_b, simulate, zb1p
from dsjax.dualpipe.simulate import bubble_table

PPS = (4, 6, 8)
# (F, B, W) grid; conditions are filtered per formula below.
GRID = [t for t in itertools.product((0.5, 1.0, 1.5, 2.0), (1.0, 2.0, 3.0, 4.0), (0.25, 0.5, 1.0, 1.5)) if t[2] <= t[1]]
EPS = 1e-9  # the simulator adds and subtracts a few dozen floats of these magnitudes


@pytest.mark.parametrize("pp", PPS)
def test_1f1b_bubble_activations_parameters(pp):
    for F, B, W in GRID:
        tl = simulate(one_f_one_b(pp, 2 * pp + 1), F=F, B=B, W=W)
        assert tl.bubble == pytest.approx([(pp - 1) * (F + B)] * pp, abs=EPS)
    assert tl.peak_activations == [pp - r for r in range(pp)]  # max PP, on rank 0
    assert tl.parameters == [1] * pp


@pytest.mark.parametrize("pp", PPS)
def test_zb1p_bubble_under_its_conditions(pp):
    checked = 0
    for F, B, W in GRID:
        if W <= F and 2 * W <= B:
            tl = simulate(zb1p(pp, 3 * pp), F=F, B=B, W=W)
            assert tl.bubble == pytest.approx([(pp - 1) * (F + B - 2 * W)] * pp, abs=EPS), (F, B, W)
            checked += 1
    assert checked >= 20
    assert max(tl.peak_activations) == pp and tl.parameters == [1] * pp


def test_zb1p_formula_needs_its_conditions():
    # W > F: a deferred W no longer fits in the wait it fills, the bubble exceeds the formula
    pp, F, B, W = 4, 0.5, 2.0, 1.0
    assert simulate(zb1p(pp, 12), F=F, B=B, W=W).max_bubble > (pp - 1) * (F + B - 2 * W) + 0.1


def _dualpipe_cases():
    for F, W in itertools.product((0.5, 1.0, 1.5, 2.0), (0.25, 0.5, 1.0)):
        if W > F:
            continue
        B = F + W
        for fb in (max(F, B), 0.5 * (max(F, B) + F + B), F + B):
            yield F, B, W, fb


@pytest.mark.parametrize("pp", PPS)
@pytest.mark.parametrize("name", ["dualpipe", "dualpipev"])
def test_dualpipe_family_bubble_activations_parameters(pp, name):
    gen, PP = (dualpipe, pp) if name == "dualpipe" else (dualpipev, 2 * pp)
    sched = gen(pp, 2 * pp + 4)
    n_cases = 0
    for F, B, W, fb in _dualpipe_cases():
        tl = simulate(sched, F=F, B=B, W=W, FB=fb)
        assert tl.max_bubble == pytest.approx((PP / 2 - 1) * (fb + B - 3 * W), abs=EPS), (F, B, W, fb)
        n_cases += 1
    assert n_cases >= 25
    assert max(tl.peak_activations) == PP + 1
    assert tl.parameters == [2] * pp


def test_dualpipe_formula_needs_w_le_f():
    pp, F, W = 4, 0.5, 1.0
    B, fb = F + W, F + W + 0.2
    got = simulate(dualpipe(pp, 8), F=F, B=B, W=W, FB=fb).max_bubble
    assert abs(got - (pp / 2 - 1) * (fb + B - 3 * W)) > 0.1


def test_gpipe_holds_all_microbatches():
    tl = simulate(gpipe(4, 6), F=1, B=2, W=1)
    assert tl.peak_activations == [6] * 4
    assert tl.bubble == pytest.approx([3 * 3.0] * 4)


def test_timeline_respects_order_and_dependencies():
    s = dualpipe(4, 8)
    tl = simulate(s, F=1.0, B=2.0, W=0.5, FB=2.5, comm=0.3)
    ends = {}
    for r, ev in enumerate(tl.events):
        assert [e[0] for e in ev] == list(s.ranks[r])  # one event per op, in schedule order
        for (_, s0, e0), (_, s1, _) in zip(ev, ev[1:]):
            assert s1 >= e0 - EPS
        for op, a, b in ev:
            for p in op.parts():
                ends[(p.kind, p.stage, p.mb)] = (b, r, a)
    for (kind, st, m), (_, r, start) in ends.items():
        if kind == "F" and st > 0:
            end_prev, r_prev, _ = ends[("F", st - 1, m)]
            assert start >= end_prev + (0.3 if r_prev != r else 0.0) - EPS
    assert tl.total == pytest.approx(max(b for b, _, _ in ends.values()))


def test_comm_time_grows_the_bubble():
    s = one_f_one_b(4, 8)
    assert simulate(s, comm=0.5).max_bubble > simulate(s).max_bubble


def test_bad_times_rejected():
    with pytest.raises(ValueError, match="W must be in"):
        simulate(one_f_one_b(2, 2), B=1.0, W=2.0)
    with pytest.raises(ValueError, match="must be >= 0"):
        simulate(one_f_one_b(2, 2), F=-1.0)


def test_bubble_table_rows():
    rows = {r["schedule"]: r for r in bubble_table(8, 20, F=1.0, B=2.0, W=1.0, FB=3.0)}
    assert set(rows) == {"gpipe", "1f1b", "zb1p", "dualpipe", "dualpipev"}
    assert rows["1f1b"]["bubble"] == pytest.approx(7 * 3.0)
    assert rows["zb1p"]["bubble"] == pytest.approx(7 * 1.0)
    assert rows["dualpipe"]["bubble"] == pytest.approx(3 * 2.0)
    assert rows["dualpipe"]["activations"] == 9 and rows["dualpipe"]["parameters"] == 2
