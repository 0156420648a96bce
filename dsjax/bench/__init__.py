"""Benchmarks: ``python -m dsjax.bench NAME [--quick] [--json FILE]`` (NAME = a bench or ``all``).

Every bench times all available implementations on the same shapes in one process (warm-up,
median of at least 5 timed runs with ``block_until_ready``) and reports ratios to the reference.
Bench modules are discovered in this package; see ``dsjax/bench/_harness.py``.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Callable

from dsjax.bench._harness import Record, fill_ratios, format_table, record, time_fn, write_json

__all__ = ["Record", "available", "fill_ratios", "format_table", "record", "run", "time_fn", "write_json"]

# Bench modules that could not be imported here, with the reason (reported by the CLI).
UNAVAILABLE: dict[str, str] = {}

# Benches listed first run first under `all`; the rest follow in module order.
_ORDER = ("per_token_cast_to_fp8", "per_block_cast_to_fp8")


def available() -> dict[str, Callable[[bool], list[Record]]]:
    """All benches, {name: run(quick) -> records}, discovered from the modules of this package."""
    found: dict[str, Callable[[bool], list[Record]]] = {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
        if info.name.startswith("_"):
            continue
        try:
            mod = importlib.import_module(f"{__name__}.{info.name}")
        except ImportError as e:  # e.g. an optional package missing on this machine
            UNAVAILABLE[info.name] = f"{type(e).__name__}: {e}"
            continue
        found.update(getattr(mod, "BENCHES", {}))
    ordered = {k: found[k] for k in _ORDER if k in found}
    ordered.update({k: v for k, v in found.items() if k not in ordered})
    return ordered


def run(name: str, *, quick: bool = False) -> list[Record]:
    """Runs one bench (or 'all') and returns its records with ratios filled in."""
    benches = available()
    if name != "all" and name not in benches:
        raise ValueError(f"unknown bench {name!r}; choose one of: all, {', '.join(benches)}")
    names = list(benches) if name == "all" else [name]
    out: list[Record] = []
    for n in names:
        out.extend(fill_ratios(benches[n](quick)))
    return out
