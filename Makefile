# The project's two commands (README "Quick start"):
#   make run    set up everything (venv, packages, native build) and run the main job:
#               prepare the embedded dataset, train the tiny DeepSeek-V3, generate from it
#   make test   set up everything and run the test suite
# Plus: make demo (backends + quantizer bench), make bench (every bench, --quick),
#       make gpu-check OUT=dir (on a Hopper machine with JAX+CUDA installed, no network).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.dsjax-installed
# Native sources: a change rebuilds the extension modules (incrementally, in build/).
NATIVE := $(shell find ffi io -type f 2>/dev/null) CMakeLists.txt pyproject.toml
BUILD_DEPS := "scikit-build-core>=0.10" "pybind11>=2.12" "ninja>=1.11" "jax==0.10.2" "jaxlib==0.10.2"
OUT ?= gpu_out

.PHONY: run demo test bench gpu-check clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(STAMP): $(PY) $(NATIVE)
	$(PY) -m pip install -q $(BUILD_DEPS)
	$(PY) -m pip install -q --no-build-isolation -e ".[test]"
	touch $(STAMP)

DATA ?= data/tokens
RUN  ?= runs/tiny
PROMPTS := --prompt "def " --prompt "import numpy as np" --prompt "class Tensor(object):"

run: $(STAMP)
	@[ -d $(DATA) ] || $(VENV)/bin/dsjax prepare --out $(DATA)
	rm -rf $(RUN)
	$(VENV)/bin/dsjax train --preset tiny --data $(DATA) --out $(RUN)
	$(VENV)/bin/dsjax generate --ckpt $(RUN) $(PROMPTS)

demo: $(STAMP)
	$(VENV)/bin/dsjax demo

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) -m dsjax.bench all --quick

gpu-check:
	bash scripts/gpu_check.sh $(OUT)

clean:
	rm -rf build $(VENV)
