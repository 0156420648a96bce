"""PNG plots of a training run: the loss curve and the per-EP-rank expert load before and after
EPLB rebalancing (matplotlib, Agg backend; written next to the checkpoints)."""

from __future__ import annotations

import os
from typing import Any


def write_all(history: dict[str, Any], out: str) -> list[str]:
    """Writes ``loss.png`` and (after at least one rebalance) ``expert_load.png`` to ``out``.

    Returns the paths written. Raises ImportError with a one-line install hint when matplotlib
    is missing (plots are part of the job, never skipped silently).
    """
    try:
        import matplotlib
    except ImportError as e:  # pragma: no cover - matplotlib is installed with the extras
        raise ImportError("dsjax train: the plots need matplotlib (pip install matplotlib)") from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
    import numpy as np  # pylint: disable=import-outside-toplevel

    paths = []
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.6))
    ax[0].plot(history["step"], history["loss"], label="total")
    ax[0].plot(history["step"], history["lm"], label="next token")
    ax[0].plot(history["step"], history["mtp"], label="MTP (t+2)", alpha=0.7)
    ax[0].set_xlabel("step")
    ax[0].set_ylabel("cross-entropy (nats/byte)")
    ax[0].set_title("training loss")
    ax[0].legend()
    ax[1].plot(history["step"], history["imbalance"], color="tab:red")
    ax[1].set_xlabel("step")
    ax[1].set_ylabel("max / mean tokens per EP rank")
    ax[1].set_title("expert-parallel load imbalance")
    fig.tight_layout()
    paths.append(os.path.join(out, "loss.png"))
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    if history.get("rebalances"):
        rec = history["rebalances"][-1]
        before, after = np.asarray(rec["rank_load_before"]), np.asarray(rec["rank_load_after"])
        layers, ranks = before.shape
        fig, axes = plt.subplots(1, layers, figsize=(3.2 * layers, 3.2), squeeze=False)
        x = np.arange(ranks)
        for layer, a in enumerate(axes[0]):
            a.bar(x - 0.2, before[layer], 0.4, label="experts in place")
            a.bar(x + 0.2, after[layer], 0.4, label=f"EPLB ({rec['replicas']} replicas)")
            names = rec.get("layers") or []
            a.set_title(f"MoE {names[layer]}" if layer < len(names) else f"MoE layer {layer}")
            a.set_xlabel("EP rank")
            a.set_xticks(x)
        axes[0][0].set_ylabel(f"tokens, steps {rec.get('first_step', 1)}-{rec['step']}")
        axes[0][0].legend(fontsize=8)
        fig.suptitle(f"expert load per EP rank: imbalance {rec['imbalance_before']:.2f} -> "
                     f"{rec['imbalance_after']:.2f}")
        fig.tight_layout()
        paths.append(os.path.join(out, "expert_load.png"))
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    return paths


def write_schedule(schedule, out: str) -> str:
    """Writes ``pipeline_schedule.png``: the run's pipeline schedule, one row per ``pp`` rank
    (:func:`dsjax.dualpipe.plot_schedule`, op lengths from the simulator's defaults). Returns the path."""
    from dsjax.dualpipe.plot import plot_schedule  # pylint: disable=import-outside-toplevel
    path = os.path.join(out, "pipeline_schedule.png")
    plot_schedule(schedule, path=path)
    return path
