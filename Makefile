# Two commands: `make demo` (set up + a real local distillation) and `make test` (set up + the whole suite).
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
export PYTHONUNBUFFERED := 1

.PHONY: venv controlplane demo test lint unit bench crds clean

venv:
	@scripts/bootstrap.sh

controlplane: venv
	@$(PY) -m kubedistill_testing.cluster build
	@$(PY) -m kubedistill_testing.kueue build >/dev/null
	@$(PY) -m kubedistill_testing.helm build >/dev/null

demo: venv
	$(VENV)/bin/kubedistill run examples/quickstart/job.yaml --local --workdir .work/quickstart

# --no-cache: ruff's cache keys on each file, not on which first-party modules exist, so a cached run
# can pass an import order that a fresh clone rejects.
lint: venv
	$(VENV)/bin/ruff check --no-cache .
	$(VENV)/bin/ruff format --no-cache --check .
	$(VENV)/bin/mypy

# Each phase announces itself: a cold first run builds for ~36 minutes on 2 idle cores before any test
# starts (measured: bootstrap 14.5, control plane 11, Kueue 5, helm 2.7).
test:
	@echo "== make test 1/4: python environment (.venv)"; scripts/bootstrap.sh
	@echo "== make test 2/4: test control plane and helm (built once per machine)"; $(MAKE) --no-print-directory controlplane
	@echo "== make test 3/4: lint (ruff, ruff format, mypy)"; $(MAKE) --no-print-directory lint
	@echo "== make test 4/4: the test suite"; $(VENV)/bin/pytest

unit: venv
	$(VENV)/bin/pytest tests/unit

# Each benchmark's output is kept in .work/bench/; report.py prints one table of their ratios at the end
# (and fails when a benchmark did).
bench: venv controlplane
	@set -o pipefail; mkdir -p .work/bench; rm -f .work/bench/*.out; status=0; \
	for b in bench/[a-z]*.py; do [ $$b = bench/report.py ] && continue; \
	  echo "== $$b"; $(PY) $$b 2>&1 | tee .work/bench/$$(basename $$b .py).out || status=1; done; \
	$(PY) bench/report.py .work/bench/*.out && exit $$status

crds: venv
	$(VENV)/bin/kubedistill crds --out crds/
	$(PY) charts/kubedistill/hack/sync-crds.py

clean:
	rm -rf .work
