"""Mesh shapes for the main job: ``"pp=2,ep=4"`` strings, and simulated CPU devices.

The default run simulates 8 CPU devices (``--xla_force_host_platform_device_count``), which must
be set before JAX initializes its backends; :func:`ensure_host_devices` does that when the user
gave no device-count flag of their own.
"""

from __future__ import annotations

import os

from dsjax.train import UsageError

AXES = ("pp", "dp", "ep")
_FLAG = "--xla_force_host_platform_device_count"


def parse_mesh(spec: str) -> dict[str, int]:
    """Parses ``"pp=2,ep=4"`` into ``{"pp": 2, "dp": 1, "ep": 4}`` (axes in :data:`AXES` order;
    ``pp`` pipeline stages, ``dp`` data parallelism, ``ep`` expert parallelism; omitted axes are 1).

    Raises:
        UsageError: unknown axis, repeated axis, a size that is not a positive integer, or a
            malformed entry; the message quotes the offending part.
    """
    sizes: dict[str, int] = {}
    for part in spec.split(","):
        name, eq, value = part.strip().partition("=")
        name = name.strip()
        if not eq or not name:
            raise UsageError(f"--mesh: expected entries like pp=2,dp=1,ep=4, got {part.strip()!r} in {spec!r}")
        if name not in AXES:
            raise UsageError(f"--mesh: unknown axis {name!r} (axes: {', '.join(AXES)}), in {spec!r}")
        if name in sizes:
            raise UsageError(f"--mesh: axis {name!r} given twice in {spec!r}")
        try:
            size = int(value)
        except ValueError:
            size = 0
        if size < 1:
            raise UsageError(f"--mesh: size of {name!r} must be a positive integer, got {value.strip()!r}")
        sizes[name] = size
    if "ep" not in sizes:
        raise UsageError(f"--mesh: an 'ep' axis is required (expert parallelism), got {spec!r}")
    return {a: sizes.get(a, 1) for a in AXES}


def ensure_host_devices(n: int = 8) -> None:
    """Asks XLA:CPU for ``n`` devices unless XLA_FLAGS already sets a count (call before JAX
    creates its backends; later calls have no effect, which :func:`make_mesh` then reports)."""
    flags = os.environ.get("XLA_FLAGS", "")
    if _FLAG not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} {_FLAG}={n}".strip()


def make_mesh(sizes: dict[str, int]):
    """A ``jax.sharding.Mesh`` with axes ``("pp", "dp", "ep")`` over the first pp·dp·ep devices.

    Raises:
        UsageError: the mesh needs more devices than JAX has.
    """
    import jax  # pylint: disable=import-outside-toplevel
    import numpy as np  # pylint: disable=import-outside-toplevel

    shape = tuple(sizes.get(a, 1) for a in AXES)
    need = int(np.prod(shape))
    devices = jax.devices()
    if need > len(devices):
        raise UsageError(f"--mesh {','.join(f'{a}={sizes.get(a, 1)}' for a in AXES)} needs {need} devices, "
                         f"JAX has {len(devices)} ({devices[0].platform}); on CPU set XLA_FLAGS="
                         f"{_FLAG}={need}")
    return jax.sharding.Mesh(np.array(devices[:need]).reshape(shape), AXES)
