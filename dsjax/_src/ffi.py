"""Loading the native modules, registering their XLA FFI targets, and the one `ffi_call` helper.

Every custom call in dsjax goes through :func:`call`, so a change of JAX's FFI API is a change to
this file only. Targets are registered once, lazily, the first time anything asks for them.
"""

from __future__ import annotations

import functools
import importlib
from dataclasses import dataclass
from typing import Any, Sequence

import jax
import numpy as np


@dataclass(frozen=True)
class NativeModule:
    """What loading one native module gave: the module, or why it is unusable."""

    name: str
    module: Any | None
    reason: str | None  # None when usable
    targets: tuple[str, ...] = ()


@functools.cache
def _load(name: str, platform: str) -> NativeModule:
    try:
        mod = importlib.import_module(f"dsjax.{name}")
    except ImportError as e:
        hint = (
            "the CUDA module is built only where nvcc is found at install time "
            "(DSJAX_CUDA=ON forces it)"
            if platform == "CUDA"
            else "reinstall dsjax (pip install .) so that CMake builds it"
        )
        return NativeModule(name, None, f"dsjax.{name} is not built or failed to load ({e}); {hint}")
    targets = dict(mod.registrations())
    for target, capsule in targets.items():
        jax.ffi.register_ffi_target(target, capsule, platform=platform)
    return NativeModule(name, mod, None, tuple(sorted(targets)))


def cpu_module() -> NativeModule:
    """The CPU twin module (`dsjax._ffi_cpu`), its targets registered with XLA:CPU."""
    return _load("_ffi_cpu", "cpu")


def cuda_module() -> NativeModule:
    """The CUDA module (`dsjax._ffi_cuda`), its targets registered with XLA:CUDA."""
    return _load("_ffi_cuda", "CUDA")


def _has_platform(platform: str) -> bool:
    try:
        return len(jax.devices(platform)) > 0
    except RuntimeError:
        return False


@functools.cache
def cuda_unavailable_reason() -> str | None:
    """None when the CUDA implementation can run here, else why not."""
    mod = cuda_module()
    if mod.reason is not None:
        return mod.reason
    if not _has_platform("gpu"):
        return "no GPU visible to JAX (jax.devices('gpu') is empty; install jax[cuda13] on a GPU machine)"
    dev = jax.devices("gpu")[0]
    cc = getattr(dev, "compute_capability", None)
    if cc is None:
        return f"the GPU ({dev.device_kind}) is not an NVIDIA CUDA device"
    if not str(cc).startswith("9.0"):
        return (f"the CUDA kernels are compiled for sm_90a (Hopper, compute capability 9.0); "
                f"this GPU ({dev.device_kind}) has compute capability {cc}")
    return None


def cpu_unavailable_reason() -> str | None:
    """None when the CPU FFI implementation can run here, else why not."""
    return cpu_module().reason


def backends() -> dict[str, Any]:
    """Which implementations are usable in this process.

    Returns:
        ``{"reference": True, "cpu": bool, "cuda": bool, "reasons": {name: why not}}``; ``reasons``
        holds a human-readable sentence for every implementation that is not usable.
    """
    reasons = {}
    cpu = cpu_unavailable_reason()
    if cpu is not None:
        reasons["cpu"] = cpu
    cuda = cuda_unavailable_reason()
    if cuda is not None:
        reasons["cuda"] = cuda
    return {"reference": True, "cpu": cpu is None, "cuda": cuda is None, "reasons": reasons}


def _attr(value: Any) -> Any:
    # A Python float would become an f64 attribute and fail at run time against an f32 binding.
    if isinstance(value, float):
        return np.float32(value)
    return value


def call(
    target: str,
    result_shape_dtypes: Sequence[jax.ShapeDtypeStruct] | jax.ShapeDtypeStruct,
    *args: Any,
    vmap_method: str = "sequential",
    **attrs: Any,
) -> Any:
    """Calls one dsjax FFI target (registered on every platform it was built for).

    Args:
        target: the FFI target name, ``dsjax_<component>_<op>``.
        result_shape_dtypes: one or a sequence of ``jax.ShapeDtypeStruct``.
        *args: array operands.
        vmap_method: how the call batches under ``jax.vmap`` (see ``jax.ffi.ffi_call``).
        **attrs: static attributes; Python floats are passed as float32.
    """
    cpu_module()  # loading registers the targets, once
    cuda_module()
    fn = jax.ffi.ffi_call(target, result_shape_dtypes, vmap_method=vmap_method)
    res = fn(*args, **{k: _attr(v) for k, v in attrs.items()})
    # Inside jax.shard_map an FFI call's results are typed as varying over no manual mesh axis,
    # which custom_vjp's type check and collectives reject; a per-device kernel's results vary
    # wherever its operands do.
    vma = set().union(*(varying_axes(a) for a in args)) if args else set()
    if not vma:
        return res

    def fix(r: Any) -> Any:
        return vary_to(r, vma)

    return type(res)(fix(r) for r in res) if isinstance(res, (tuple, list)) else fix(res)


def varying_axes(x: Any) -> set:
    """Mesh axes over which ``x`` varies inside ``jax.shard_map`` (empty outside)."""
    aval = jax.typeof(x)
    mat = getattr(aval, "manual_axis_type", None)
    if mat is not None:
        return set(getattr(mat, "varying", ()) or ())
    return set(getattr(aval, "vma", None) or ())


def vary_to(x: Any, axes: Any) -> Any:
    """``x`` cast to vary over every mesh axis of ``axes`` (only the missing ones are cast;
    a no-op outside ``jax.shard_map`` or when nothing is missing)."""
    missing = tuple(sorted(set(axes) - varying_axes(x), key=str))
    return jax.lax.pcast(x, missing, to="varying") if missing else x
