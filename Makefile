# mifa: `make help` lists the targets.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
STAMP   = $(VENV)/.installed
export HF_HUB_OFFLINE = 1
export RAY_USAGE_STATS_ENABLED = 0

.PHONY: help setup demo test test-fast smoke lint bench clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml constraints/cpu.txt scripts/install-face-models.sh
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints/cpu.txt -e ".[test]"
	PYTHON=$(BIN)/python bash scripts/install-face-models.sh
	touch $(STAMP)

setup: $(STAMP) ## create .venv, install mifa + test extras (CPU torch), fetch the offline face models, chromium
	@bash scripts/install-browser.sh

demo: setup ## build the demo data set (manifests/demo.yaml) into out/demo
	$(BIN)/mifa build manifests/demo.yaml

test: setup ## run the whole test suite
	$(BIN)/python -m pytest -q

test-fast: setup ## the tests that start no Ray and run no whole build
	$(BIN)/python -m pytest -q -m "not slow"

smoke: setup ## a tiny build through Ray, then verify it
	$(BIN)/mifa build manifests/demo.yaml --out out/smoke --fresh --set identities.count=2 --set identities.samples_per_identity=2
	$(BIN)/mifa verify out/smoke

bench: setup ## generation throughput (tiny model on CPU, full size on a GPU)
	$(BIN)/python benchmarks/generate.py

clean: ## remove build outputs (not the venv)
	rm -rf out .pytest_cache
