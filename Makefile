# Two commands do all the set-up on a fresh machine:
#   make demo   -> venv, dependencies, the compiled extension, then the main job (python -m snp_fast.demo)
#   make test   -> the same set-up, then the test suite (what CI runs)
#   make lint   -> ruff (config in pyproject.toml); make test-all -> the whole suite, slow tests included
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
export CUDA_HOME ?= $(if $(wildcard /usr/local/cuda/bin/nvcc),/usr/local/cuda,)
export TORCH_CUDA_ARCH_LIST ?= 9.0
EXT_SOURCES := $(wildcard csrc/*.cpp csrc/*.h csrc/cpu/*.cpp csrc/cpu/*.h csrc/cuda/*.cu csrc/cuda/*.cuh) setup.py pyproject.toml

.PHONY: setup demo test test-all lint bench clean
setup: $(VENV)/.deps $(VENV)/.ext

$(VENV)/.deps: requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-dev.txt
	touch $@

# editable install, built against the torch above (no build isolation, like flash-attn)
$(VENV)/.ext: $(VENV)/.deps $(EXT_SOURCES)
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $@

demo: setup
	$(PY) -m snp_fast.demo

test: setup
	$(PY) -m pytest tests -q -m "not slow"

# the whole suite, slow tests included (the full timm sweep: tens of minutes on 2 cores)
test-all: setup
	$(PY) -m pytest tests -q

lint: $(VENV)/.deps
	$(PY) -m ruff check .

bench: setup
	$(PY) -m pytest benchmarks -q --benchmark-only

clean:
	rm -rf build dist *.egg-info snp_fast/_C*.so .pytest_cache .benchmarks
