# Two commands for a fresh machine (Python >= 3.10, nothing else):
#   make run    creates .venv, installs fedjax_med, runs the default heart-disease experiment
#   make test   creates .venv with the test extra, runs the pytest suite (not the slow tier)
#   make test-all  the same with the slow tier (experiment smokes, multi-process runs)
#   make docs   installs the docs extra, builds the API reference and guides into site/
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
OUT    ?= results/heart_disease
# Test files run in 2 processes (pytest-xdist; a file stays in one process, so its
# module fixtures run once). WORKERS=0 runs serially.
WORKERS ?= 2

.PHONY: run test test-all docs clean check-python

check-python:
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else "fedjax_med needs Python >= 3.10, found " + sys.version.split()[0])'

$(VENV)/.created: | check-python
	$(PYTHON) -m venv $(VENV)
	@touch $@

$(VENV)/.installed: $(VENV)/.created pyproject.toml
	$(PY) -m pip install --quiet -e .
	@touch $@

$(VENV)/.installed-test: $(VENV)/.created pyproject.toml
	$(PY) -m pip install --quiet -e '.[test]'
	@touch $@ $(VENV)/.installed

$(VENV)/.installed-docs: $(VENV)/.created pyproject.toml
	$(PY) -m pip install --quiet -e '.[docs]'
	@touch $@ $(VENV)/.installed

run: $(VENV)/.installed
	$(PY) experiments/heart_disease.py --out $(OUT)

# make test: the tier CI runs, without the tests marked slow (pyproject.toml's markers);
# make test-all: every test, the slow tier included (about 3x longer).
XDIST = $(if $(filter 0,$(WORKERS)),,-n $(WORKERS) --dist loadfile)

test: $(VENV)/.installed-test
	$(PY) -m pytest -q $(XDIST) -m "not slow"

test-all: $(VENV)/.installed-test
	$(PY) -m pytest -q $(XDIST)

# Strict: a warning (broken link, unresolved cross-reference, unparsable docstring
# section) fails the build. NO_MKDOCS_2_WARNING silences mkdocs-material's banner.
docs: $(VENV)/.installed-docs
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict

clean:
	rm -rf $(VENV) results .pytest_cache
