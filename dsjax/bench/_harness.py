"""Bench harness: time every implementation on the same shapes in one process, report ratios.

A bench module in ``dsjax/bench/`` (any ``<name>.py`` not starting with ``_``) defines
``BENCHES: dict[str, Callable[[bool], list[Record]]]``; the callable takes ``quick`` and returns
one :class:`Record` per (shape, implementation). Records of one shape share a ``shape`` string and
``vs_reference`` is filled by :func:`fill_ratios` (reference time / this time).
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import time
from typing import Any, Callable, Iterable

import jax


@dataclasses.dataclass
class Record:
    bench: str
    shape: str
    implementation: str
    median_s: float
    gbps: float | None = None
    tflops: float | None = None
    vs_reference: float | None = None
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        extra = d.pop("extra")
        d.update(extra)
        return d


def implementations() -> list[str]:
    """The implementations a bench should time here: always the reference, plus the CPU FFI on
    the CPU backend and the CUDA FFI on an NVIDIA GPU when their modules are usable."""
    from dsjax._src import ffi

    usable = ffi.backends()
    platform = jax.default_backend()
    out = ["reference"]
    if usable["cpu"] and platform == "cpu":
        out.append("cpu")
    if usable["cuda"] and platform == "gpu":
        out.append("cuda")
    return out


def time_fn(fn: Callable[..., Any], *args: Any, warmup: int = 2, repeats: int = 5,
            min_time_s: float = 0.0) -> float:
    """Median wall time of ``fn(*args)`` in seconds, each call blocked until its result is ready.

    Args:
        fn: usually a jitted function; the warm-up calls compile it.
        warmup: untimed calls first.
        repeats: timed calls (at least 5 for a median worth quoting).
        min_time_s: keep timing past ``repeats`` until this much time was spent (noisy machines).
    """
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    start_all = time.perf_counter()
    while len(times) < max(repeats, 1) or (time.perf_counter() - start_all) < min_time_s:
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
        if len(times) > 1000:
            break
    return statistics.median(times)


def record(bench: str, shape: str, impl: str, median_s: float, *, nbytes: float | None = None,
           flops: float | None = None, **extra: Any) -> Record:
    """Builds a Record, deriving GB/s and TFLOP/s from byte and flop counts when given."""
    gbps = nbytes / median_s / 1e9 if nbytes is not None and median_s > 0 else None
    tflops = flops / median_s / 1e12 if flops is not None and median_s > 0 else None
    return Record(bench, shape, impl, median_s, gbps, tflops, None, dict(extra))


def fill_ratios(records: Iterable[Record], baseline: str = "reference") -> list[Record]:
    """Sets vs_reference = baseline time / this time for records sharing (bench, shape)."""
    records = list(records)
    base = {(r.bench, r.shape): r.median_s for r in records if r.implementation == baseline}
    for r in records:
        b = base.get((r.bench, r.shape))
        r.vs_reference = b / r.median_s if b is not None and r.median_s > 0 else None
    return records


def _fmt(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def format_table(records: list[Record]) -> str:
    """Plain-text table: bench, shape, implementation, median µs, GB/s, TFLOP/s, × reference."""
    extra_keys: list[str] = []
    for r in records:
        for k in r.extra:
            if k not in extra_keys:
                extra_keys.append(k)
    head = ["bench", "shape", "implementation", "median_us", "GB/s", "TFLOP/s", "vs_reference"] + extra_keys
    rows = [head]
    for r in records:
        row = [r.bench, r.shape, r.implementation, _fmt(r.median_s * 1e6, ".1f"), _fmt(r.gbps, ".2f"),
               _fmt(r.tflops, ".3f"), _fmt(r.vs_reference, ".2f") + ("x" if r.vs_reference else "")]
        for k in extra_keys:
            v = r.extra.get(k)
            row.append("-" if v is None else (format(v, ".4g") if isinstance(v, float) else str(v)))
        rows.append(row)
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = []
    for j, row in enumerate(rows):
        lines.append("| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |")
        if j == 0:
            lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def write_json(records: list[Record], path: str, meta: dict[str, Any] | None = None) -> None:
    """Writes a JSON list of records; `meta` (date, JAX version, device) is attached to each."""
    with open(path, "w") as f:
        json.dump([r.to_json() | ({"meta": meta} if meta else {}) for r in records], f, indent=1)
