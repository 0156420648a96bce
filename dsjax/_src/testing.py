"""Numerics helpers shared by tests and benches."""

from __future__ import annotations

from typing import Any

import numpy as np


def calc_diff(x: Any, y: Any) -> float:
    """DeepSeek's similarity-based error: ``1 - 2·Σxy / Σ(x² + y²)``, in float64.

    0 for identical inputs; about ``mean((x - y)²) / mean(x²)`` for small relative errors, so
    1e-3 corresponds to roughly 3% RMS relative error. Used by DeepGEMM's tests for FP8 GEMMs.
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    denom = float((x * x + y * y).sum())
    if denom == 0.0:
        return 0.0
    return float(1.0 - 2.0 * (x * y).sum() / denom)


def fp8_bytes(x: Any) -> np.ndarray:
    """The raw uint8 encoding of a float8 array (for bit-exact comparisons)."""
    return np.asarray(x).view(np.uint8)
