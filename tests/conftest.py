"""Test setup: 8 host CPU devices (so shard_map, EP and pipeline code run for real), gpu marker."""

import os

# Must happen before JAX initializes its backends.
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
    os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=8").strip()

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_enable_x64", False)


# grain is a dependency of dsjax, but the GPU check may run in an image without it (no network):
# there the data-loader tests cannot even be collected, so they are left out, loudly.
collect_ignore_glob: list[str] = []
try:
    import grain  # noqa: F401
except ImportError as _e:  # pragma: no cover - only on machines without grain
    collect_ignore_glob.append("test_io_*.py")
    print(f"dsjax conftest: grain is not importable ({_e}); tests/test_io_*.py not collected")


def _gpu_skip_reason() -> str | None:
    from dsjax._src import ffi

    return ffi.cuda_unavailable_reason()


def pytest_collection_modifyitems(config, items):
    reason = None
    checked = False
    for item in items:
        if "gpu" in item.keywords:
            if not checked:
                reason, checked = _gpu_skip_reason(), True
            if reason is not None:
                item.add_marker(pytest.mark.skip(reason=f"needs the CUDA implementation: {reason}"))
