"""Choosing an implementation: ``implementation="auto" | "cuda" | "cpu" | "reference"``.

``auto`` picks the CUDA FFI when the default JAX backend is an NVIDIA GPU and the CUDA module is
built for it, the CPU FFI when the default backend is the CPU and the CPU module is built, and the
pure-JAX reference otherwise (e.g. on TPU). The environment variable ``DSJAX_IMPLEMENTATION``
replaces ``auto`` everywhere, for A/B runs. An explicit choice that cannot run raises ValueError and
says why.
"""

from __future__ import annotations

import os
from typing import Collection, Literal

import jax

from dsjax._src import ffi

Implementation = Literal["auto", "cuda", "cpu", "reference"]
IMPLEMENTATIONS: tuple[str, ...] = ("auto", "cuda", "cpu", "reference")
ENV_VAR = "DSJAX_IMPLEMENTATION"


def current_platform() -> str:
    """Platform that un-placed computations run on: 'cpu', 'gpu', 'tpu', ..."""
    dev = jax.config.jax_default_device
    if dev is not None:
        return dev.platform if hasattr(dev, "platform") else str(dev)
    return jax.default_backend()


def unavailable_reason(impl: str, op: str, has: Collection[str]) -> str | None:
    """None when `impl` can run `op` here, else a sentence saying why not."""
    if impl == "reference":
        return None
    if impl not in has:
        return f"{op} has no {impl!r} implementation (it has: {', '.join(sorted(has))})"
    platform = current_platform()
    if impl == "cpu":
        reason = ffi.cpu_unavailable_reason()
        if reason is None and platform != "cpu":
            reason = (f"the default JAX backend is {platform!r}; the CPU FFI runs on the CPU backend "
                      "(use jax.default_device(jax.devices('cpu')[0]))")
        return reason
    if impl == "cuda":
        reason = ffi.cuda_unavailable_reason()
        if reason is None and platform != "gpu":
            reason = f"the default JAX backend is {platform!r}, not an NVIDIA GPU"
        return reason
    return f"unknown implementation {impl!r}"


def choose(implementation: str, *, op: str, has: Collection[str] = ("reference", "cpu", "cuda")) -> str:
    """Resolves ``implementation`` for one op to 'cuda', 'cpu' or 'reference'.

    Args:
        implementation: the user's choice; 'auto' honours ``DSJAX_IMPLEMENTATION``.
        op: the public op's name, for error messages.
        has: the implementations this op provides.

    Raises:
        ValueError: unknown name, or an explicit choice that cannot run here (the message says why).
    """
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(
            f"{op}: implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
    source = "implementation"
    if implementation == "auto":
        env = os.environ.get(ENV_VAR, "").strip()
        if env and env != "auto":
            if env not in IMPLEMENTATIONS:
                raise ValueError(f"{ENV_VAR} must be one of {IMPLEMENTATIONS}, got {env!r}")
            implementation, source = env, f"{ENV_VAR}={env}"
    if implementation != "auto":
        reason = unavailable_reason(implementation, op, has)
        if reason is not None:
            raise ValueError(f"{op}: {source}={implementation!r} cannot run here: {reason}"
                             if source == "implementation" else
                             f"{op}: {source} cannot run here: {reason}")
        return implementation
    platform = current_platform()
    if platform == "gpu" and unavailable_reason("cuda", op, has) is None:
        return "cuda"
    if platform == "cpu" and unavailable_reason("cpu", op, has) is None:
        return "cpu"
    return "reference"
