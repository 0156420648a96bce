#!/usr/bin/env bash
# Runs the CPU test suite under another Python / JAX than the project's pins, in a throwaway venv,
# the way a prebuilt GPU image would run it (e.g. the H200 image: Python 3.12, jax 0.11.2, no
# grain). Needs network access to PyPI. Not part of CI (about 10 minutes on 2 cores).
#   usage: [PYTHON=/path/to/python3.12] [JAX=0.11.2] [DIR=/tmp/dsjax-compat] scripts/compat_check.sh
#   (here: PYTHON=/root/.pyenv/versions/3.12.1/bin/python)
set -euo pipefail
PYTHON=${PYTHON:-python3.12}; JAX=${JAX:-0.11.2}; DIR=${DIR:-/tmp/dsjax-compat}
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
rm -rf "$DIR" && mkdir -p "$DIR/src"
"$PYTHON" -m venv "$DIR/venv"
PY="$DIR/venv/bin/python"
"$PY" -m pip install -q --upgrade pip
# Unpinned flax/optax/orbax (what pip pairs with that JAX); grain left out on purpose.
"$PY" -m pip install -q "jax==$JAX" "jaxlib==$JAX" flax optax orbax-checkpoint ml_dtypes numpy \
  matplotlib pybind11 scikit-build-core ninja pytest pytest-timeout hypothesis
(cd "$ROOT" && git archive HEAD) | tar -x -C "$DIR/src"
"$PY" -m pip install -q --no-build-isolation --no-deps "$DIR/src"
# Import the installed package, not the source tree (which has no native modules).
mv "$DIR/src/dsjax" "$DIR/src/dsjax_src"
"$PY" -m pip list 2>/dev/null | grep -iE "^(jax|jaxlib|flax|optax|numpy) "
cd "$DIR/src" && "$PY" -X faulthandler -m pytest -q -p no:cacheprovider --timeout 600 tests
