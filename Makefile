# `make train` and `make test` set everything up first; `make setup` is idempotent and does nothing
# when requirements, setup.py and the csrc sources are unchanged.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
# The machine's CPU torch wheel lives here when present; pip then never reaches for a CUDA build.
FIND_LINKS := $(if $(wildcard /opt/wheels),--find-links /opt/wheels,)
STAMP := $(VENV)/.installed

.PHONY: setup train test test-fast native-test bench doctor gpu-check clean

setup: $(STAMP)

# The native extension (aegan_fast._C) is rebuilt when any csrc source changes.
NATIVE_SRC := $(wildcard csrc/*.cpp csrc/*.h csrc/cuda/*.cu csrc/cuda/*.cuh csrc/cuda/*.cpp csrc/cuda/*.h)

$(STAMP): requirements.txt constraints.txt setup.py pyproject.toml $(NATIVE_SRC)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q $(FIND_LINKS) -c constraints.txt -r requirements.txt
	$(PIP) install -q $(FIND_LINKS) -c constraints.txt --no-build-isolation --no-deps -e .
	@$(PY) -c "import torch, aegan_fast._C" || { echo "make setup: the native extension aegan_fast._C did not build" >&2; exit 1; }
	touch $(STAMP)

train: setup
	$(PY) -m aegan_fast.train $(ARGS)

# The full suite, what CI runs (.ci/run): every pytest tier, then the native build and its C++ tests.
test: setup
	$(PY) -m pytest -q tests
	$(MAKE) --no-print-directory native-test

# The fast tier: every module in under 3 minutes on two cores (no slow, bench or build tests).
test-fast: setup
	$(PY) -m pytest -q -m "not slow and not bench and not build" tests

# csrc as plain CMake libraries with the C++ kernel tests (ctest), and csrc/cuda/*.cu compiled by nvcc
# for sm_80/sm_90 when a CUDA compiler is found (CMakeLists.txt).
native-test:
	@if command -v cmake >/dev/null; then \
	  cmake -S . -B build/cmake -DCMAKE_BUILD_TYPE=Release && \
	  cmake --build build/cmake -j2 && \
	  ctest --test-dir build/cmake --output-on-failure; \
	else \
	  echo "cmake not found: skipping the CMake build and ctest" >&2; \
	fi

# The suite: one table, one bench/results/<date>-<host>.json (ARGS=--quick for ~2 minutes). Each
# bench script also runs alone, timed by the same harness: $(PY) -m bench.bench_train_step --help
bench: setup
	$(PY) -m bench $(ARGS)

# One prepared check for a lent GPU machine (bench/gpu_check.py): it uses that machine's own torch and
# installs nothing, so it does not depend on setup; the report lands in bench/results/.
GPU_PYTHON ?= $(if $(wildcard $(PY)),$(PY),python3)
gpu-check:
	$(GPU_PYTHON) -m bench.gpu_check $(ARGS)

doctor: setup
	$(PY) -m aegan_fast.doctor

clean:
	rm -rf build *.egg-info $(VENV)
