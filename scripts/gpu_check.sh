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

timeout 240 "$PY" -m pytest -q -m gpu -p no:cacheprovider --junitxml="$OUT/pytest_gpu.xml" tests \
  2>&1 | tee "$OUT/pytest_gpu.txt"
rc_test=${PIPESTATUS[0]}
echo "pytest -m gpu rc=$rc_test ($(( $(date +%s) - start )) s)"

# Each bench on its own, so that one slow bench cannot take the others' time: the GPU kernels'
# benches first at full size, then the CPU-side ones (solver, schedules, reader, training) quick.
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
for name in per_token_cast_to_fp8 per_block_cast_to_fp8 deep_gemm flash_mla deep_ep; do run_bench "$name"; done
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
