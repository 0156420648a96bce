"""DualPipe in JAX: pipeline schedules as data, a simulator, schedule plots and a shard_map executor.

``schedules`` (GPipe, 1F1B, ZB1P, DualPipe, DualPipeV, ``validate``), ``simulate`` (timeline, bubbles,
memory), ``plot`` (matplotlib figures, imported on first use), ``plan`` + ``executor`` (``DualPipe``).
"""

from typing import Any

from dsjax.dualpipe.executor import DualPipe, StepResult
from dsjax.dualpipe.plan import Plan, build_plan, ops_from_log
from dsjax.dualpipe.schedules import (SCHEDULES, Op, Schedule, dualpipe, dualpipev, gpipe, make_schedule,
                                      one_f_one_b, validate, zb1p)
from dsjax.dualpipe.simulate import Timeline, bubble_table, simulate

__all__ = ["Op", "Schedule", "SCHEDULES", "gpipe", "one_f_one_b", "zb1p", "dualpipe", "dualpipev",
           "make_schedule", "validate", "simulate", "Timeline", "bubble_table", "DualPipe", "StepResult",
           "Plan", "build_plan", "ops_from_log", "plot_schedule", "plot_schedules"]


def __getattr__(name: str) -> Any:
    # matplotlib is only needed for figures: import it when a plot function is first asked for
    if name in ("plot_schedule", "plot_schedules"):
        from dsjax.dualpipe import plot

        return getattr(plot, name)
    raise AttributeError(f"module 'dsjax.dualpipe' has no attribute {name!r}")
