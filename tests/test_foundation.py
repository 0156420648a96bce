"""Foundation: native registration, backends(), implementation choice, the bench harness."""

from __future__ import annotations

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

import dsjax
from dsjax._src import dispatch, ffi
from dsjax.bench import _harness
from dsjax.deep_gemm import per_token_cast_to_fp8


def test_backends_report():
    b = dsjax.backends()
    assert set(b) == {"reference", "cpu", "cuda", "reasons"}
    assert b["reference"] is True
    for name in ("cpu", "cuda"):
        assert isinstance(b[name], bool)
        # Every unusable implementation comes with a sentence saying why.
        assert b[name] or (isinstance(b["reasons"].get(name), str) and len(b["reasons"][name]) > 10)


def test_cpu_module_is_built_and_registers_targets():
    # The project's build always produces the CPU module; a missing one is a broken install.
    mod = ffi.cpu_module()
    assert mod.reason is None, mod.reason
    assert "dsjax_deep_gemm_per_token_cast_to_fp8" in mod.targets
    assert "dsjax_deep_gemm_per_block_cast_to_fp8" in mod.targets
    assert all(t.startswith("dsjax_") for t in mod.targets)


def test_cuda_reason_on_cpu_machine():
    if jax.default_backend() == "gpu":
        pytest.skip("this machine has a GPU; the reason is only given where CUDA cannot run")
    reason = ffi.cuda_unavailable_reason()
    assert reason is not None and ("GPU" in reason or "built" in reason)


def test_auto_picks_cpu_ffi_on_cpu(monkeypatch):
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    assert dispatch.choose("auto", op="t") == "cpu"
    assert dispatch.choose("auto", op="t", has=("reference",)) == "reference"


def test_env_var_overrides_auto(monkeypatch):
    monkeypatch.setenv(dispatch.ENV_VAR, "reference")
    assert dispatch.choose("auto", op="t") == "reference"
    assert dispatch.choose("cpu", op="t") == "cpu"  # an explicit choice wins over the variable
    monkeypatch.setenv(dispatch.ENV_VAR, "cuda")
    with pytest.raises(ValueError, match=r"t: DSJAX_IMPLEMENTATION=cuda cannot run here: "):
        dispatch.choose("auto", op="t")
    monkeypatch.setenv(dispatch.ENV_VAR, "fastest")
    with pytest.raises(ValueError, match="DSJAX_IMPLEMENTATION must be one of"):
        dispatch.choose("auto", op="t")


def test_explicit_choice_that_cannot_run_says_why(monkeypatch):
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    if jax.default_backend() != "gpu":
        with pytest.raises(ValueError, match=r"per_token_cast_to_fp8: implementation='cuda' cannot run here: .+"):
            per_token_cast_to_fp8(jnp.ones((2, 128)), implementation="cuda")
    with pytest.raises(ValueError, match=r"implementation must be one of .*got 'fast'"):
        per_token_cast_to_fp8(jnp.ones((2, 128)), implementation="fast")
    with pytest.raises(ValueError, match=r"t has no 'cuda' implementation \(it has: cpu, reference\)"):
        dispatch.choose("cuda", op="t", has=("reference", "cpu"))


def test_float_attributes_are_passed_as_f32():
    import numpy as np

    assert isinstance(ffi._attr(0.5), np.float32)
    assert ffi._attr(True) is True and ffi._attr(3) == 3


def test_native_handler_returns_error_instead_of_crashing():
    # Bypass the Python validation: the handler itself must reject inconsistent shapes.
    x = jnp.ones((4, 256), jnp.float32)
    bad = (jax.ShapeDtypeStruct((4, 256), jnp.float8_e4m3fn), jax.ShapeDtypeStruct((4, 3), jnp.float32))
    with pytest.raises(Exception, match="inconsistent shapes"):
        jax.block_until_ready(ffi.call("dsjax_deep_gemm_per_token_cast_to_fp8", bad, x, use_ue8m0=False))
    with pytest.raises(Exception, match="x must be float32, bfloat16 or float16, got int32"):
        jax.block_until_ready(ffi.call(
            "dsjax_deep_gemm_per_token_cast_to_fp8",
            (jax.ShapeDtypeStruct((4, 256), jnp.float8_e4m3fn), jax.ShapeDtypeStruct((4, 2), jnp.float32)),
            jnp.ones((4, 256), jnp.int32), use_ue8m0=False))


def test_harness_median_ratio_and_table(tmp_path):
    calls = []

    def fn(x):
        calls.append(1)
        return x

    t = _harness.time_fn(fn, jnp.ones(3), warmup=2, repeats=5)
    assert len(calls) == 7 and t >= 0
    recs = [_harness.record("b", "s", "reference", 2e-3, nbytes=4e6),
            _harness.record("b", "s", "cpu", 1e-3, nbytes=4e6, flops=2e9)]
    recs = _harness.fill_ratios(recs)
    assert recs[0].vs_reference == pytest.approx(1.0) and recs[1].vs_reference == pytest.approx(2.0)
    assert recs[1].gbps == pytest.approx(4.0) and recs[1].tflops == pytest.approx(2.0)
    table = _harness.format_table(recs)
    assert "2.00x" in table and "median_us" in table
    path = tmp_path / "out.json"
    _harness.write_json(recs, str(path), {"jax": jax.__version__})
    data = json.loads(path.read_text())
    keys = {"bench", "shape", "implementation", "median_s", "gbps", "tflops", "vs_reference"}
    assert all(keys <= set(r) for r in data) and data[1]["vs_reference"] == pytest.approx(2.0)


def test_bench_cli_runs_quantizer_bench(tmp_path):
    out = tmp_path / "q.json"
    proc = subprocess.run(
        [sys.executable, "-m", "dsjax.bench", "per_block_cast_to_fp8", "--quick", "--json", str(out)],
        capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(out.read_text())
    impls = {r["implementation"] for r in data}
    assert {"reference", "cpu"} <= impls
    assert all(r["median_s"] > 0 for r in data)
    proc = subprocess.run([sys.executable, "-m", "dsjax.bench", "nonexistent"], capture_output=True, text=True)
    assert proc.returncode != 0 and "unknown bench" in proc.stderr


def test_cuda_module_built_where_nvcc_is_present():
    import os
    import shutil

    if not shutil.which("nvcc") or os.environ.get("DSJAX_CUDA", "AUTO").upper() == "OFF":
        pytest.skip("no nvcc on PATH (or DSJAX_CUDA=OFF): the CUDA module is not expected here")
    mod = ffi.cuda_module()
    assert mod.module is not None, mod.reason
    assert "dsjax_deep_gemm_per_token_cast_to_fp8" in mod.targets
    assert mod.module.compiled_arch() == "sm_90a"
