# The two README commands: `make demo` and `make test`. Each creates .venv and installs what it needs.
# `make docs` builds the documentation site into site/ (offline, strict: any warning fails the build).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
PYTEST_WORKERS ?= 2
# pip's per-package lines go to the screen as they come (the full log to .venv/pip.log); pipefail keeps its status
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -c
PIP_PROGRESS := sed -un -e '/^\(Collecting\|Processing\|Installing collected\|Successfully installed\|ERROR\)/{s/^\(.\{100\}\).*/\1 .../;s/^/  pip: /;p}'

.PHONY: install test test-slow demo docs bench results clean

$(PY):
	@echo "==> creating the virtual environment $(VENV) with $(PYTHON) and upgrading pip"
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(STAMP): $(PY) pyproject.toml
	@echo "==> installing degenjax (editable) with its dependencies (jax, jaxlib, flax, optax, numpyro, matplotlib,"
	@echo "    scikit-learn, ...) and the dev extra (pytest, mkdocs, arviz, ...) into $(VENV): 1-3 minutes the first"
	@echo "    time; one line per package below, the full pip log in $(VENV)/pip.log"
	@$(PY) -m pip install -e '.[dev]' 2>&1 | tee $(VENV)/pip.log | $(PIP_PROGRESS) \
		|| (echo "pip failed; the end of $(VENV)/pip.log:"; tail -n 40 $(VENV)/pip.log; exit 1)
	$(PY) -c "import degenjax" && rm -f $(VENV)/.installed-* && touch $(STAMP)
	@echo "==> installed degenjax $$($(PY) -c 'import degenjax; print(degenjax.__version__)') into $(VENV)"

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q -n $(PYTEST_WORKERS) tests

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow tests

demo: $(STAMP)
	@echo "==> degenjax quickstart: train an MLP on scikit-learn's digits, then its degeneracy report (a few minutes)"
	$(VENV)/bin/degenjax quickstart --out demo-report

docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 DISABLE_MKDOCS_2_WARNING=true $(VENV)/bin/mkdocs build --strict --site-dir site

bench: $(STAMP)
	@echo "==> installing the bench extra (torch, devinterp, transformers: the baselines) into $(VENV)"
	@$(PY) -m pip install -e '.[bench]' 2>&1 | tee $(VENV)/pip-bench.log | $(PIP_PROGRESS)
	$(PY) benchmarks/grams.py && $(PY) benchmarks/eigen.py && $(PY) benchmarks/basis.py && $(PY) benchmarks/llc.py

# benchmarks/RESULTS.md (current figures) and history.md (every run), regenerated from benchmarks/results.jsonl
results:
	$(PYTHON) benchmarks/_results.py render

clean:
	rm -rf $(VENV) demo-report site
