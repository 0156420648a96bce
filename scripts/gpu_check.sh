#!/usr/bin/env bash
# dsjax GPU check, for a Hopper (sm_90) machine that already has JAX with CUDA, pybind11, CMake and
# ninja, and no network. Builds the native modules in place (no build isolation, no downloads),
# runs the GPU tests and every bench, and writes all outputs to OUTDIR. Budget: under 8 minutes.
#   usage: scripts/gpu_check.sh OUTDIR        (or: make gpu-check OUT=OUTDIR)
set -uo pipefail
OUT="${1:-gpu_out}"
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
ROOT="$PWD"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1
exec > >(tee "$OUT/gpu_check.log") 2>&1

echo "# dsjax gpu check $(date -u +%FT%TZ)"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
"$PY" -c "import jax; print('jax', jax.__version__, jax.devices())"

start=$(date +%s)
BUDGET=${GPU_CHECK_BUDGET_S:-450}  # seconds for build + tests + benches, leaving margin under 8 minutes
BUILD="$ROOT/build/gpu-check"
PYBIND_DIR=$("$PY" -m pybind11 --cmakedir)
GEN=""; command -v ninja >/dev/null && GEN="-G Ninja"
cmake -S "$ROOT" -B "$BUILD" $GEN -DCMAKE_BUILD_TYPE=Release -DDSJAX_CUDA=ON \
  -DPython_EXECUTABLE="$(command -v "$PY")" -Dpybind11_DIR="$PYBIND_DIR" > "$OUT/build.log" 2>&1 \
  && cmake --build "$BUILD" -j "$(nproc)" >> "$OUT/build.log" 2>&1
rc_build=$?
echo "build rc=$rc_build ($(( $(date +%s) - start )) s); log in $OUT/build.log"
tail -20 "$OUT/build.log"
[ $rc_build -eq 0 ] || exit 1
# In-place: the freshly built modules next to the Python sources (ignored by git).
find "$BUILD" -maxdepth 2 -name "_*.so" -exec cp {} "$ROOT/dsjax/" \;
# ...removed again on exit, so that they never shadow a later pip/editable install.
trap 'rm -f "$ROOT"/dsjax/_ffi_cpu*.so "$ROOT"/dsjax/_ffi_cuda*.so "$ROOT"/dsjax/_io*.so' EXIT
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
"$PY" -c "import dsjax, json; print(json.dumps(dsjax.backends(), indent=1))" | tee "$OUT/backends.json"

# The opt-in WGMMA GEMM has never run before its first GPU session: smoke each of its
# configurations in its own process with a short timeout (a fault poisons a CUDA context and a
# hang would eat the session), dense (more tiles than SMs, tails), contiguous and masked. The
# processes run side by side (no preallocation; each problem is tiny) so that the smoke costs one
# process start-up, not nine. Failed configurations are left out of the WGMMA tests and bench
# rows; the check then fails.
WGMMA_CONFIGS=$("$PY" -c "from dsjax.deep_gemm._gemm_ffi import WGMMA_CONFIGS; print(' '.join(WGMMA_CONFIGS))")
# Registers / stack of each WGMMA kernel as built here (the setmaxnreg splits assume REG:168 for
# the 128-row configurations; see ffi/deep_gemm/sm90/NOTES.md).
if command -v cuobjdump >/dev/null; then
  cuobjdump -res-usage $(find "$BUILD" -maxdepth 2 -name "_ffi_cuda*.so" | head -1) 2>&1 | grep -A1 Fp8GemmWgmma \
    | grep -o "ConfigILi[0-9]*ELi[0-9]*ELi[0-9]\|REG:[0-9]* STACK:[0-9]*" | paste - - \
    | tee "$OUT/wgmma_res_usage.txt"
fi
cat > "$OUT/wgmma_smoke.py" <<'PYEOF'
import os, jax, jax.numpy as jnp, numpy as np
from dsjax import deep_gemm as dg
from dsjax._src.testing import calc_diff
cfg = os.environ["DSJAX_DEEP_GEMM_WGMMA_CONFIG"]
def ok(name, got, want, zero=None):
    got = np.asarray(got, np.float64); want = np.asarray(want, np.float64)
    diff = calc_diff(got, want); bad = bool(zero is not None and got[zero].any())
    print(f"wgmma smoke {cfg} {name}: calc_diff={diff:.2e}{' NONZERO PADDING' if bad else ''}", flush=True)
    assert diff < 1e-3 and not bad, (cfg, name, diff)
key = iter(jax.random.split(jax.random.PRNGKey(sum(map(ord, cfg))), 16))
rnd = lambda *s: jax.random.normal(next(key), s)
for m, n, k in [(2100, 2176, 256), (200, 300, 1040), (65, 129, 16)]:  # 17 / 33 M tiles: odd (cluster tail), several per CTA
    a, b = dg.per_token_cast_to_fp8(rnd(m, k)), dg.per_block_cast_to_fp8(rnd(n, k))
    run = lambda i: dg.fp8_gemm_nt(a, b, out_dtype=jnp.float32, implementation=i)
    ok(f"dense {m}x{n}x{k}", run("cuda"), run("reference"))
k = 528; bg = dg.per_block_cast_to_fp8(rnd(3, 330, k))
mi = jnp.asarray([1] * 128 + [-1] * 100 + [2] * 156, jnp.int32)  # group 0 empty
a = dg.per_token_cast_to_fp8(rnd(mi.size, k))
run = lambda i: dg.m_grouped_fp8_gemm_nt_contiguous(a, bg, mi, out_dtype=jnp.bfloat16, implementation=i)
ok("contiguous", run("cuda"), run("reference"), np.asarray(mi) < 0)
am = dg.per_token_cast_to_fp8(rnd(3, 192, k)); mm = jnp.asarray([192, 0, 70], jnp.int32)
run = lambda i: dg.m_grouped_fp8_gemm_nt_masked(am, bg, mm, 192, out_dtype=jnp.float32, implementation=i)
got, want = run("cuda"), run("reference")
ok("masked", got, want)
assert not np.asarray(got)[1].any() and not np.asarray(got)[2, 70:].any(), "masked rows not zero"
print(f"wgmma smoke {cfg}: PASS", flush=True)
PYEOF
declare -A SMOKE_PID
for cfg in $WGMMA_CONFIGS; do
  DSJAX_DEEP_GEMM_KERNEL=wgmma DSJAX_DEEP_GEMM_WGMMA_CONFIG=$cfg XLA_PYTHON_CLIENT_PREALLOCATE=false \
    timeout 60 "$PY" "$OUT/wgmma_smoke.py" > "$OUT/wgmma_smoke_$cfg.txt" 2>&1 &
  SMOKE_PID[$cfg]=$!
done
WGMMA_OK=(); WGMMA_BAD=()
for cfg in $WGMMA_CONFIGS; do
  wait "${SMOKE_PID[$cfg]}"; rc=$?
  if [ $rc -eq 0 ]; then WGMMA_OK+=("$cfg"); else WGMMA_BAD+=("$cfg"); echo "wgmma smoke $cfg: FAIL rc=$rc" >> "$OUT/wgmma_smoke_$cfg.txt"; fi
  cat "$OUT/wgmma_smoke_$cfg.txt" >> "$OUT/wgmma_smoke.txt"
done
grep -E "PASS|FAIL|Error|error" "$OUT/wgmma_smoke.txt" | tail -40
rc_smoke=$([ ${#WGMMA_BAD[@]} -eq 0 ] && echo 0 || echo 1)
echo "wgmma smoke: ok=[${WGMMA_OK[*]-}] failed=[${WGMMA_BAD[*]-}] ($(( $(date +%s) - start )) s)"
export DSJAX_BENCH_WGMMA_CONFIGS
DSJAX_BENCH_WGMMA_CONFIGS=$(IFS=,; echo "${WGMMA_OK[*]-}")
[ ${#WGMMA_OK[@]} -gt 0 ] || export DSJAX_BENCH_SKIP_WGMMA=1

# GPU tests: the WGMMA file in its own process (a kernel fault there cannot take the other
# components' tests with it), minus the matrix tests of failed configurations.
timeout 200 "$PY" -m pytest -q -m gpu -p no:cacheprovider --junitxml="$OUT/pytest_gpu.xml" \
  --ignore=tests/test_deep_gemm_wgmma_gpu.py tests 2>&1 | tee "$OUT/pytest_gpu.txt"
rc_test=${PIPESTATUS[0]}
echo "pytest -m gpu rc=$rc_test ($(( $(date +%s) - start )) s)"
rc_wgmma=1
if [ ${#WGMMA_OK[@]} -gt 0 ]; then
  DESELECT=()
  for cfg in ${WGMMA_BAD[@]+"${WGMMA_BAD[@]}"}; do
    DESELECT+=(--deselect "tests/test_deep_gemm_wgmma_gpu.py::test_wgmma_config_matrix[$cfg]")
  done
  left=$(( BUDGET - ($(date +%s) - start) - 90 ))  # keep 90 s for the deep_gemm bench
  [ $left -gt 150 ] && left=150; [ $left -lt 30 ] && left=30
  timeout "$left" "$PY" -m pytest -q -m gpu -p no:cacheprovider --junitxml="$OUT/pytest_wgmma.xml" \
    ${DESELECT[@]+"${DESELECT[@]}"} tests/test_deep_gemm_wgmma_gpu.py 2>&1 | tee "$OUT/pytest_wgmma.txt"
  rc_wgmma=${PIPESTATUS[0]}
fi
echo "pytest -m gpu (wgmma) rc=$rc_wgmma ($(( $(date +%s) - start )) s)"
[ $rc_smoke -eq 0 ] && [ $rc_wgmma -eq 0 ] || rc_test=1

# Each bench on its own, so that one slow bench cannot take the others' time: the GPU kernels'
# benches first at full size (deep_gemm first: its M=4096 N=7168 K=16384 row is the issue's
# acceptance number), then the CPU-side ones (solver, schedules, reader, training) quick.
rc_bench=0
AVAILABLE=" $("$PY" -c "from dsjax.bench import available; print(' '.join(available()))") "
run_bench() {  # name [--quick]
  local name=$1; shift
  case "$AVAILABLE" in *" $name "*) ;; *) echo "bench $name: not available here"; return;; esac
  local left=$(( BUDGET - ($(date +%s) - start) ))
  if [ $left -lt 20 ]; then echo "bench $name: skipped, time budget spent"; rc_bench=1; return; fi
  timeout "$left" "$PY" -m dsjax.bench "$name" "$@" --json "$OUT/bench_$name.json" 2>&1 | tee -a "$OUT/bench.txt"
  [ ${PIPESTATUS[0]} -eq 0 ] || rc_bench=1
}
for name in deep_gemm per_token_cast_to_fp8 per_block_cast_to_fp8 flash_mla deep_ep; do run_bench "$name"; done
for name in $AVAILABLE; do
  case " per_token_cast_to_fp8 per_block_cast_to_fp8 deep_gemm flash_mla deep_ep " in
    *" $name "*) ;;
    *) run_bench "$name" --quick;;
  esac
done
"$PY" - "$OUT" <<'PYEOF'
import glob, json, os, sys
out = sys.argv[1]
recs = []
for p in sorted(glob.glob(os.path.join(out, "bench_*.json"))):
    recs.extend(json.load(open(p)))
json.dump(recs, open(os.path.join(out, "bench_all.json"), "w"), indent=1)
print(f"# {len(recs)} bench records in {out}/bench_all.json")
PYEOF
echo "# done in $(( $(date +%s) - start )) s: build=$rc_build tests=$rc_test benches=$rc_bench"
[ $rc_test -eq 0 ] && [ $rc_bench -eq 0 ]
