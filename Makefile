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
	@$(PY) -m kubedistill_testing.helm build >/dev/null

demo: venv
	$(VENV)/bin/kubedistill run examples/quickstart/job.yaml --local --workdir .work/quickstart

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

test: venv controlplane lint
	$(VENV)/bin/pytest

unit: venv
	$(VENV)/bin/pytest tests/unit

bench: venv controlplane
	@set -e; for b in bench/*.py; do echo "== $$b"; $(PY) $$b; done

crds: venv
	$(VENV)/bin/kubedistill crds --out crds/
	$(PY) charts/kubedistill/hack/sync-crds.py

clean:
	rm -rf .work
