"""Schedule figures: one row per rank, one cell per op, FB pairs as split cells; the bench's simulation rows."""

from __future__ import annotations

import pytest
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from dsjax.dualpipe import dualpipe, one_f_one_b, plot_schedule, plot_schedules, simulate, zb1p


def _cells(ax):
    return [p for p in ax.patches if isinstance(p, Rectangle)]


def test_plot_schedule_draws_every_op(tmp_path):
    s = dualpipe(4, 8)
    path = tmp_path / "dp.png"
    fig = plot_schedule(s, path=str(path))
    assert isinstance(fig, Figure)
    assert path.stat().st_size > 10_000 and path.read_bytes()[:4] == b"\x89PNG"
    ax = fig.axes[0]
    n_ops = sum(len(ops) for ops in s.ranks)
    n_fb = sum(op.kind == "FB" for ops in s.ranks for op in ops)
    assert n_fb > 0
    # one cell per op, plus for each FB a second half-cell and the shared black border
    assert len(_cells(ax)) == n_ops + 2 * n_fb
    borders = [p for p in _cells(ax) if not p.get_fill()]
    assert len(borders) == n_fb
    assert [t.get_text() for t in ax.get_yticklabels()] == [f"rank {r}" for r in range(4)]
    tl = simulate(s)
    assert ax.get_xlim() == pytest.approx((0, tl.total))
    # the micro-batch number is written in every cell
    labels = [t.get_text() for t in ax.texts]
    assert len(labels) == n_ops + n_fb and set(labels) == {str(m) for m in range(8)}


def test_idle_time_is_left_blank():
    s = one_f_one_b(4, 4)
    tl = simulate(s)
    fig = plot_schedule(s, tl)
    ax = fig.axes[0]
    busy = {}
    for p in _cells(ax):
        row = int(p.get_y())
        busy[row] = busy.get(row, 0.0) + p.get_width()
    # drawn width per row = busy time; the rest of the row (the bubble) has no cell
    for r in range(4):
        assert busy[3 - r] == pytest.approx(tl.busy[r])
        assert tl.total - busy[3 - r] == pytest.approx(tl.bubble[r])


def test_plot_schedules_stacks_with_shared_axis():
    fig = plot_schedules([one_f_one_b(4, 8), zb1p(4, 8), dualpipe(4, 8)])
    assert len(fig.axes) == 3
    assert len({ax.get_xlim() for ax in fig.axes}) == 1
    with pytest.raises(ValueError, match="one entry per schedule"):
        plot_schedules([one_f_one_b(4, 8)], [])


def test_bench_simulation_rows():
    from dsjax.bench.dualpipe import _sim_records

    recs = _sim_records({"F": 1.0, "B": 2.0, "W": 1.0, "BI": 1.0, "FB": 3.0}, [(8, 20)])
    by = {r.implementation: r for r in recs}
    assert set(by) == {"gpipe", "1f1b", "zb1p", "dualpipe", "dualpipev"}
    assert by["1f1b"].extra["bubble_us"] == pytest.approx(21e6)
    assert by["dualpipe"].extra["bubble_us"] == pytest.approx(6e6)
    assert by["dualpipe"].median_s < by["zb1p"].median_s < by["1f1b"].median_s
