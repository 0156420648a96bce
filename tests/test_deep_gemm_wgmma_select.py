"""Selection of the WGMMA GEMM's configuration (CPU only: nothing here runs a kernel).

``DSJAX_DEEP_GEMM_WGMMA_CONFIG`` parsing and its error, the per-shape heuristic of
``choose_wgmma_config`` on DeepGEMM's shapes, that the CUDA lowering carries the chosen name as
the target's ``config`` attribute (exported for CUDA on the CPU), and that the Python table of
configurations matches the one compiled into the CUDA module (``kConfigs`` in
``ffi/deep_gemm/sm90/fp8_gemm_wgmma.cu``).
"""

from __future__ import annotations

import pathlib
import re

import jax
import jax.numpy as jnp
import pytest

from dsjax import deep_gemm as dg
from dsjax.deep_gemm import _gemm_ffi

CFG_ENV = _gemm_ffi.WGMMA_CONFIG_ENV
ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("value,want", [
    (None, None), ("", None), ("auto", None), (" AUTO\n", None), ("b128x160", "b128x160"),
    (" B128x192_MC2 ", "b128x192_mc2"), ("b64x64", "b64x64")])
def test_selected_config(monkeypatch, value, want):
    if value is None:
        monkeypatch.delenv(CFG_ENV, raising=False)
    else:
        monkeypatch.setenv(CFG_ENV, value)
    assert _gemm_ffi.selected_wgmma_config() == want


def test_bad_config_raises_naming_variable_choices_and_value(monkeypatch):
    monkeypatch.setenv(CFG_ENV, "b256x256")
    with pytest.raises(ValueError, match=r"DSJAX_DEEP_GEMM_WGMMA_CONFIG must be 'auto' or one of "
                                         r"'b64x64', 'b64x128', .*'b128x192_mc2' \(unset means "
                                         r"'auto'\), got 'b256x256'"):
        _gemm_ffi.selected_wgmma_config()
    # ...and through the public op before anything runs, whichever kernel is selected.
    a = (jnp.zeros((4, 128), jnp.float8_e4m3fn), jnp.ones((4, 1), jnp.float32))
    b = (jnp.zeros((8, 128), jnp.float8_e4m3fn), jnp.ones((1, 1), jnp.float32))
    with pytest.raises(ValueError, match="got 'b256x256'"):
        dg.fp8_gemm_nt(a, b, implementation="cpu")


@pytest.mark.parametrize("kind,m,n,groups,sms,want", [
    # The target shape: 32 x {56, 45, 38} tiles for BLOCK_N {128, 160, 192} on 132 SMs
    # -> waves * (BLOCK_N + 32) = {14*160, 11*192, 10*224} = {2240, 2112, 2240}: 160, in a
    # cluster.
    ("dense", 4096, 7168, 1, 132, "b128x160_mc2"),
    # 32 x {17, 14, 11} tiles: 5*160 = 800, 4*192 = 768, 3*224 = 672.
    ("dense", 4096, 2112, 1, 132, "b128x192_mc2"),
    # 32 x {17, 14, 11} tiles on 200 SMs: 3 waves each: tie, the widest.
    ("dense", 4096, 2112, 1, 200, "b128x192_mc2"),
    # Less than one wave of 128x128 tiles: the narrowest tile, no cluster.
    ("dense", 128, 7168, 1, 132, "b128x128"),
    ("dense", 256, 4096, 1, 132, "b128x128"),
    # Decode-sized m: 64-row tiles, 64 wide while 128-wide tiles leave SMs idle.
    ("dense", 64, 2112, 1, 132, "b64x64"),
    ("dense", 1, 7168, 1, 132, "b64x64"),
    ("masked", 64, 7168, 4, 132, "b64x128"),
    # Grouped layouts never get a cluster configuration.
    # 256 x {32, 26, 22} tiles: {63, 51, 43} waves -> {10080, 9792, 9632}.
    ("contiguous", 32768, 4096, 1, 132, "b128x192"),
    ("masked", 1024, 4096, 1, 132, "b128x128"),
    ("masked", 256, 7168, 4, 132, "b128x160"),
    # Few SMs (a MIG slice): {112, 90, 76} waves -> {17920, 17280, 17024}: the widest.
    ("dense", 4096, 7168, 1, 16, "b128x192_mc2"),
])
def test_heuristic_choices(kind, m, n, groups, sms, want):
    assert _gemm_ffi.choose_wgmma_config(kind, m, n, groups, sms=sms) == want


@pytest.mark.parametrize("kind", ["dense", "contiguous", "masked"])
def test_heuristic_always_names_a_compiled_config(kind):
    for m in (1, 63, 64, 65, 128, 129, 1000, 4096, 20000):
        for n in (1, 127, 128, 300, 2112, 7168, 24576):
            name = _gemm_ffi.choose_wgmma_config(kind, m, n, 3 if kind == "masked" else 1,
                                                 sms=132)
            cfg = _gemm_ffi.WGMMA_CONFIGS[name]
            assert cfg.cluster == 1 or kind == "dense"
            assert (cfg.block_m == 64) == (m <= 64)


def test_forced_config_overrides_heuristic(monkeypatch):
    monkeypatch.setenv(CFG_ENV, "b128x192")
    assert _gemm_ffi.wgmma_config("dense", 1, 64) == "b128x192"
    monkeypatch.setenv(CFG_ENV, "auto")
    assert _gemm_ffi.wgmma_config("dense", 1, 64) == "b64x64"


def _exported_configs(kind: str, m: int, n: int, k: int) -> list[tuple[str, str]]:
    """(target, config attribute) of each dsjax custom call in the CUDA lowering of one GEMM."""
    spec = lambda *s, dt=jnp.float32: jax.ShapeDtypeStruct(s, dt)  # noqa: E731
    kb, nb = -(-k // 128), -(-n // 128)
    g = () if kind == "dense" else (2,)
    lead_a = (2,) if kind == "masked" else ()
    a = (spec(*lead_a, m, k, dt=jnp.float8_e4m3fn), spec(*lead_a, m, kb))
    b = (spec(*g, n, k, dt=jnp.float8_e4m3fn), spec(*g, nb, kb))
    rows = spec(2 if kind == "masked" else m, dt=jnp.int32)

    def f(a, b, rows):
        if kind == "contiguous":
            return _gemm_ffi.m_grouped_contiguous(a, b, rows, jnp.bfloat16)
        if kind == "masked":
            return _gemm_ffi.m_grouped_masked(a, b, rows, jnp.bfloat16)
        return _gemm_ffi.fp8_gemm_nt(a, b, None, jnp.bfloat16, False)

    names = [*_gemm_ffi.WGMMA_TARGETS, *_gemm_ffi.WGMMA_TARGETS.values()]
    checks = [jax.export.DisabledSafetyCheck.custom_call(t) for t in names]
    text = jax.export.export(jax.jit(f), platforms=["cuda"], disabled_checks=checks)(
        a, b, rows).mlir_module()
    out = []
    for line in text.splitlines():
        call = re.search(r"custom_call @(dsjax_deep_gemm_\w+)\(", line)
        if call:
            cfg = re.search(r'config = "(\w+)"', line)
            out.append((call.group(1), cfg.group(1) if cfg else None))
    return out


@pytest.mark.parametrize("forced,kind,m,n,k,want", [
    (None, "dense", 4096, 7168, 256, "b128x160_mc2"),
    (None, "dense", 32, 2112, 256, "b64x64"),
    ("b128x128_grid", "dense", 4096, 7168, 256, "b128x128_grid"),
    (None, "contiguous", 512, 4096, 256, "b128x128"),
    ("b128x160_mc2", "contiguous", 512, 4096, 256, "b128x160_mc2"),  # runs b128x160 (C++)
    (None, "masked", 64, 7168, 256, "b64x64"),
])
def test_lowering_carries_config(monkeypatch, forced, kind, m, n, k, want):
    monkeypatch.setenv(_gemm_ffi.KERNEL_ENV, "wgmma")
    if forced is None:
        monkeypatch.delenv(CFG_ENV, raising=False)
    else:
        monkeypatch.setenv(CFG_ENV, forced)
    monkeypatch.setattr(_gemm_ffi, "num_sms", lambda: 132)
    calls = _exported_configs(kind, m, n, k)
    assert calls == [(_gemm_ffi.WGMMA_TARGETS[{
        "dense": _gemm_ffi.DENSE_TARGET, "contiguous": _gemm_ffi.CONTIGUOUS_TARGET,
        "masked": _gemm_ffi.MASKED_TARGET}[kind]], want)]


def test_mma_lowering_has_no_config(monkeypatch):
    monkeypatch.setenv(_gemm_ffi.KERNEL_ENV, "mma")
    monkeypatch.setenv(CFG_ENV, "b128x192")
    assert _exported_configs("dense", 256, 256, 256) == [(_gemm_ffi.DENSE_TARGET, None)]


def test_python_table_matches_compiled_table():
    # The names the CUDA handler accepts, and each one's tile and cluster, as instantiated.
    src = (ROOT / "ffi/deep_gemm/sm90/fp8_gemm_wgmma.cu").read_text()
    table = re.search(r"kConfigs\[\] = \{(.*?)\n\};", src, re.S).group(1)
    entries = re.findall(r'\{"(\w+)", (\w+), (\w+)\}', table)
    assert [e[0] for e in entries] == list(_gemm_ffi.WGMMA_CONFIGS)
    launchers = {}
    for path in (ROOT / "ffi/deep_gemm/sm90").glob("wgmma_configs_*.cu"):
        for fn, cons, bn, cl, pers in re.findall(
                r"ffi::Error (\w+)\(const WgmmaProblem& w\) \{\s*return LaunchConfig<Config<(\d+), "
                r"(\d+), (\d+)>>\(w, (true|false)\);", path.read_text()):
            launchers[fn] = (64 * int(cons), int(bn), int(cl), pers == "true")
    for name, dense, grouped in entries:
        cfg = _gemm_ffi.WGMMA_CONFIGS[name]
        assert launchers[dense] == (cfg.block_m, cfg.block_n, cfg.cluster, cfg.persistent), name
        # The grouped layouts run the same tile and grid without the cluster.
        assert launchers[grouped] == (cfg.block_m, cfg.block_n, 1, cfg.persistent), name
