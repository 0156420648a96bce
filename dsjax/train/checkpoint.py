"""Orbax checkpoints of a training run, and finding the latest one.

Layout under ``<out>/checkpoints``::

    step_00000050/model/   orbax StandardCheckpointer: nnx.state(model) as a pure dict
    step_00000050/opt/     the optimizer state (AdamW moments, step count)
    step_00000050/extra/   the EPLB load tracker
    step_00000050/run.json step, loss history; written last, so a checkpoint without it is
                           incomplete (e.g. the run was killed while saving) and is ignored

Restoring takes the *current* (freshly initialized, placed) state as the target, so arrays come
back with the shardings of this run.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from typing import Any

from dsjax.train import UsageError

_STEP_DIR = re.compile(r"^step_(\d{8})$")


def _checkpointer():
    import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
    return ocp.StandardCheckpointer()


def checkpoint_dir(out: str) -> str:
    return os.path.join(out, "checkpoints")


def list_checkpoints(out: str) -> list[tuple[int, str]]:
    """Complete checkpoints ``(step, path)`` of a run directory, oldest first."""
    root = checkpoint_dir(out)
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        m = _STEP_DIR.match(name)
        path = os.path.join(root, name)
        if m and os.path.exists(os.path.join(path, "run.json")):
            found.append((int(m.group(1)), path))
    return sorted(found)


def latest_checkpoint(out: str) -> str:
    """Path of the newest complete checkpoint. Raises UsageError when there is none."""
    found = list_checkpoints(out)
    if not found:
        raise UsageError(f"no checkpoint in {checkpoint_dir(out)} (train first: dsjax train --out {out})")
    return found[-1][1]


def save(out: str, step: int, items: dict[str, Any], run_info: dict[str, Any], *, keep: int = 2) -> str:
    """Saves pytrees ``items`` (name -> pure pytree of arrays) and ``run_info`` as step ``step``;
    keeps the newest ``keep`` checkpoints."""
    path = os.path.join(checkpoint_dir(out), f"step_{step:08d}")
    if os.path.exists(path):  # an incomplete or superseded save of the same step
        shutil.rmtree(path)
    os.makedirs(path)
    ckptr = _checkpointer()
    for name, tree in items.items():
        ckptr.save(os.path.abspath(os.path.join(path, name)), tree)
    ckptr.wait_until_finished()
    tmp = os.path.join(path, ".run.json.tmp")
    with open(tmp, "w") as f:
        json.dump(run_info, f)
    os.replace(tmp, os.path.join(path, "run.json"))
    for _, old in list_checkpoints(out)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return path


def restore(path: str, name: str, target: Any) -> Any:
    """Restores item ``name`` of checkpoint ``path`` with ``target``'s structure, shapes,
    dtypes and shardings (``target`` holds arrays, e.g. the freshly initialized state)."""
    import jax  # pylint: disable=import-outside-toplevel
    import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel

    item = os.path.abspath(os.path.join(path, name))
    if not os.path.isdir(item):
        raise UsageError(f"checkpoint {path} has no {name!r} item")
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    return _checkpointer().restore(item, abstract)


def read_run_info(path: str) -> dict[str, Any]:
    with open(os.path.join(path, "run.json")) as f:
        return json.load(f)
