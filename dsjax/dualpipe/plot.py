"""Schedule figures in the style of DualPipe's README (deepseek-ai/DualPipe, ``images/schedules.png``).

One row per rank, time to the right; each op is a coloured cell labelled with its micro-batch;
an ``FB`` pair is drawn as one cell split in two (forward on top, backward below) inside a single
black border, as DeepSeek marks "mutually overlapped" chunks; idle time stays white. Micro-batches
travelling in the reverse direction (DualPipe's second half) use darker shades.
"""

from __future__ import annotations

from typing import Sequence

from matplotlib.figure import Figure
from matplotlib.patches import Patch, Rectangle

from dsjax.dualpipe.schedules import Op, Schedule
from dsjax.dualpipe.simulate import Timeline, simulate

# (forward direction, reverse direction) colours per elementary kind
COLORS = {
    "F": ("#f6c89f", "#e0904f"),
    "B": ("#9fd8c8", "#4fa58f"),
    "BI": ("#b8d8f0", "#5f9fd0"),
    "W": ("#d8c8ec", "#9f80c8"),
}


def _reverse(schedule: Schedule, op: Op) -> bool:
    """Whether the op's micro-batch runs against rank order at this stage (DualPipe's 2nd half)."""
    if schedule.name == "dualpipe":
        return op.mb >= schedule.num_microbatches // 2
    if schedule.name == "dualpipev":
        return op.stage >= schedule.pp
    return False


def _cell(ax, schedule: Schedule, op: Op, x: float, y: float, w: float, h: float, fontsize: float) -> None:
    color = COLORS[op.kind][int(_reverse(schedule, op))]
    ax.add_patch(Rectangle((x, y), w, h, facecolor=color, edgecolor="white", linewidth=0.4))
    if w * 72 > 3:  # skip labels that cannot fit
        ax.text(x + w / 2, y + h / 2, str(op.mb), ha="center", va="center", fontsize=fontsize)


def draw_schedule(ax, schedule: Schedule, timeline: Timeline | None = None, *, title: str | None = None,
                  fontsize: float = 6.0) -> Timeline:
    """Draws ``schedule`` on a matplotlib ``Axes``; returns the timeline it drew.

    Args:
        ax: the axes.
        schedule: the schedule.
        timeline: a :func:`~dsjax.dualpipe.simulate.simulate` result; simulated with the default
            times (``F=1, B=2, W=1``) when ``None``.
        title: axes title; defaults to the schedule's name, size and largest bubble.
    """
    tl = timeline if timeline is not None else simulate(schedule)
    pp = schedule.pp
    for r, events in enumerate(tl.events):
        y = pp - 1 - r
        for op, start, end in events:
            w = end - start
            if op.kind == "FB":
                f, b = op.parts()
                _cell(ax, schedule, f, start, y + 0.5, w, 0.45, fontsize * 0.85)
                _cell(ax, schedule, b, start, y + 0.05, w, 0.45, fontsize * 0.85)
                ax.add_patch(Rectangle((start, y + 0.05), w, 0.9, fill=False, edgecolor="black", linewidth=0.8))
            else:
                _cell(ax, schedule, op, start, y + 0.05, w, 0.9, fontsize)
    ax.set_xlim(0, tl.total)
    ax.set_ylim(0, pp)
    ax.set_yticks([pp - 1 - r + 0.5 for r in range(pp)], [f"rank {r}" for r in range(pp)], fontsize=fontsize + 1)
    ax.set_xlabel("time", fontsize=fontsize + 1)
    ax.tick_params(axis="x", labelsize=fontsize)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    if title is None:
        title = (f"{schedule.name} (pp={pp}, {schedule.num_microbatches} micro-batches): "
                 f"bubble {tl.max_bubble:g}, peak activations {max(tl.peak_activations)}")
    ax.set_title(title, fontsize=fontsize + 2, loc="left")
    return tl


def _legend(fig: Figure, schedules: Sequence[Schedule]) -> None:
    kinds = {p.kind for s in schedules for ops in s.ranks for op in ops for p in op.parts()}
    handles = [Patch(facecolor=COLORS[k][0], label={"F": "forward", "B": "backward", "BI": "backward (input)",
                                                   "W": "backward (weights)"}[k]) for k in ("F", "B", "BI", "W") if k in kinds]
    if any(_reverse(s, op) for s in schedules for ops in s.ranks for op in ops):
        handles.append(Patch(facecolor=COLORS["F"][1], label="reverse direction (darker)"))
    if any(op.kind == "FB" for s in schedules for ops in s.ranks for op in ops):
        handles.append(Patch(facecolor="white", edgecolor="black", label="overlapped F&B pair"))
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=7, frameon=False)


def plot_schedule(schedule: Schedule, timeline: Timeline | None = None, path: str | None = None, *,
                  F: float = 1.0, B: float = 2.0, W: float = 1.0, FB: float | None = None) -> Figure:
    """Figure of one schedule (one row per rank), optionally saved to ``path`` (PNG, SVG, PDF...).

    Args:
        schedule: the schedule to draw.
        timeline: its simulated timeline; if ``None`` it is simulated with ``F, B, W, FB``.
        path: where to save the figure; nothing is written when ``None``.

    Returns:
        The matplotlib ``Figure`` (not attached to pyplot, so nothing pops up; Jupyter displays it).
    """
    return plot_schedules([schedule], [timeline] if timeline is not None else None, path, F=F, B=B, W=W, FB=FB)


def plot_schedules(schedules: Sequence[Schedule], timelines: Sequence[Timeline] | None = None,
                   path: str | None = None, *, F: float = 1.0, B: float = 2.0, W: float = 1.0,
                   FB: float | None = None, width: float = 12.0, dpi: int = 150) -> Figure:
    """Several schedules stacked on a shared time axis (like DualPipe's README figure)."""
    if timelines is not None and len(timelines) != len(schedules):
        raise ValueError(f"plot_schedules: timelines must have one entry per schedule ({len(schedules)}), "
                         f"got {len(timelines)}")
    tls = list(timelines) if timelines is not None else [simulate(s, F=F, B=B, W=W, FB=FB) for s in schedules]
    heights = [s.pp * 0.28 + 0.6 for s in schedules]
    fig = Figure(figsize=(width, sum(heights) + 0.5), layout="constrained")
    axes = fig.subplots(len(schedules), 1, sharex=True, squeeze=False, height_ratios=heights)[:, 0]
    for ax, s, tl in zip(axes, schedules, tls):
        draw_schedule(ax, s, tl)
    xmax = max(tl.total for tl in tls)
    for ax in axes:
        ax.set_xlim(0, xmax)
    _legend(fig, schedules)
    fig.get_layout_engine().set(rect=(0, 0.4 / fig.get_figheight(), 1, 1 - 0.4 / fig.get_figheight()))
    if path is not None:
        fig.savefig(path, dpi=dpi)
    return fig


def readme_figure(path: str) -> Figure:
    """1F1B, ZB1P and DualPipe at (pp=8, 20 micro-batches), ``F=1, B=2, W=1``, as in DualPipe's README.

    ``docs/dualpipe_8_20.png`` is made by
    ``python -c "from dsjax.dualpipe.plot import readme_figure; readme_figure('docs/dualpipe_8_20.png')"``.
    """
    from dsjax.dualpipe.schedules import dualpipe, one_f_one_b, zb1p

    return plot_schedules([one_f_one_b(8, 20), zb1p(8, 20), dualpipe(8, 20)], path=path, dpi=110)

