"""Argument validation with messages that name the argument, the expected and the given."""

from __future__ import annotations

from typing import Any, Iterable

import jax.numpy as jnp
import numpy as np


def dtype_name(dtype: Any) -> str:
    return np.dtype(dtype).name


def check_array(name: str, x: Any, *, op: str) -> None:
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        raise TypeError(f"{op}: {name} must be an array, got {type(x).__name__}")


def check_dtype(name: str, x: Any, allowed: Iterable[Any], *, op: str) -> None:
    check_array(name, x, op=op)
    allowed = tuple(np.dtype(a) for a in allowed)
    if np.dtype(x.dtype) not in allowed:
        want = " or ".join(a.name for a in allowed)
        raise TypeError(f"{op}: {name} must have dtype {want}, got {dtype_name(x.dtype)}")


def check_rank(name: str, x: Any, *, op: str, exact: int | None = None, at_least: int | None = None,
               layout: str = "") -> None:
    check_array(name, x, op=op)
    r = len(x.shape)
    lay = f" {layout}" if layout else ""
    if exact is not None and r != exact:
        raise ValueError(f"{op}: {name} must have rank {exact}{lay}, got shape {tuple(x.shape)}")
    if at_least is not None and r < at_least:
        raise ValueError(f"{op}: {name} must have rank >= {at_least}{lay}, got shape {tuple(x.shape)}")


def check_shape(name: str, x: Any, expected: tuple[int, ...], *, op: str, layout: str = "") -> None:
    check_array(name, x, op=op)
    if tuple(x.shape) != tuple(expected):
        lay = f" {layout}" if layout else ""
        raise ValueError(f"{op}: {name} must have shape {tuple(expected)}{lay}, got {tuple(x.shape)}")


FLOAT_INPUTS = (jnp.float32, jnp.bfloat16, jnp.float16)
