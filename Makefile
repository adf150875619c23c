# One Makefile for the monorepo. `make help` lists the targets.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PROJECTS := $(sort $(notdir $(patsubst %/dvc.yaml,%,$(wildcard projects/*/dvc.yaml))))
# the setup stamp is keyed on pyproject.toml's content: editing it reinstalls, nothing else does
SETUP_KEY := $(shell sha256sum pyproject.toml | cut -c1-16)
STAMP := $(VENV)/.setup-$(SETUP_KEY)
export PYTHONHASHSEED := 0
# stages call `python -m ...`: make that the venv's python
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
PIP_QUIET := 2>&1 | { grep -v "Location .* is ignored" || true; }

.PHONY: help setup test test-slow lint reproduce bench exp data clean check-project

help:  ## list targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/' | expand -t 14
	@echo "projects: $(PROJECTS)"

setup: $(STAMP)  ## create .venv and install the project editable with dev extras (no-op when up to date)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip $(PIP_QUIET)
	$(PY) -m pip install --quiet -e '.[dev]' $(PIP_QUIET)
	@rm -f $(VENV)/.setup-*
	@touch $@
	@echo "setup: installed into $(VENV) (key $(SETUP_KEY))"

test: setup  ## default tests (CPU, no network), then Triton-interpreter tests in their own process
	$(PY) -m pytest -q tests
	TRITON_INTERPRET=1 $(PY) -m pytest -q -m interpret tests || [ $$? -eq 5 ]

test-slow: setup  ## the slow tests (training smoke tests, ddp)
	$(PY) -m pytest -q -m slow tests

lint: setup  ## pre-commit (ruff check, ruff format, hygiene) on all files
	$(VENV)/bin/pre-commit run --all-files

check-project:
	@if [ -z "$(PROJECT)" ] || [ ! -f projects/$(PROJECT)/dvc.yaml ]; then \
	  echo "error: PROJECT='$(PROJECT)' is not a project; valid names: $(PROJECTS)" >&2; exit 2; fi

reproduce: check-project setup  ## make reproduce PROJECT=<name>: data, dvc repro of the pipeline, results table
	$(VENV)/bin/dvc repro projects/$(PROJECT)/dvc.yaml
	@$(PY) -m core.utils.show_results projects/$(PROJECT)/README.md

bench: check-project setup  ## make bench PROJECT=<name>: the project's benchmark stage
	$(VENV)/bin/dvc repro --single-item projects/$(PROJECT)/dvc.yaml:$(PROJECT)-bench --force

exp: check-project setup  ## make exp PROJECT=<p> VARIANT=<v>: projects/<p>/variants/<v>.yaml as a DVC experiment
	@if [ -z "$(VARIANT)" ]; then echo "error: VARIANT is empty; variants: $$(ls projects/$(PROJECT)/variants 2>/dev/null | sed 's/.yaml//')" >&2; exit 2; fi
	$(PY) -m core.engine.variants $(PROJECT) $(VARIANT)

data: setup  ## the shared data stages
	$(VENV)/bin/dvc repro dvc.yaml

clean:  ## remove caches and build leftovers (keeps .venv, data and the DVC cache)
	rm -rf .pytest_cache .ruff_cache build *.egg-info
	find . -name __pycache__ -type d -prune -not -path './.venv/*' -exec rm -rf {} +
