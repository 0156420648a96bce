"""Test setup: 8 host CPU devices (so shard_map, EP and pipeline code run for real), gpu marker."""

import os

# Must happen before JAX initializes its backends.
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
    os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=8").strip()

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_enable_x64", False)


# grain and nbclient are dependencies of the project, but the GPU check may run in a prebuilt image
# without them (no network). There the tests that need them cannot even be collected, so they are
# left out, loudly. In CI and in the project's own venv every module below is installed.
_NEEDS = {"grain": ("test_io_*.py", "test_train_*.py"), "nbclient": ("test_notebooks.py",),
          "nbformat": ("test_notebooks.py",), "orbax.checkpoint": ("test_train_*.py",)}
collect_ignore_glob: list[str] = []
for _mod, _globs in _NEEDS.items():
    try:
        __import__(_mod)
    except ImportError as _e:  # pragma: no cover - only on machines without the package
        collect_ignore_glob.extend(g for g in _globs if g not in collect_ignore_glob)
        print(f"dsjax conftest: {_mod} is not importable ({_e}); not collecting {', '.join(_globs)}")


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
