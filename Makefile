# Batch Norm at Test Time: the two set-up commands are `make book` and `make test`.
# Everything runs through .venv/bin/python, so nothing depends on PATH.

PYTHON_SYSTEM ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# axe-core (npm, pinned in tools/axe/package-lock.json), injected into every page by the
# browser test (tests/test_browser.py).
AXE    := tools/axe/node_modules/axe-core/axe.min.js
# jupyter-book has no `python -m` entry point; this is what its console script runs.
JB     := $(PY) -c 'import sys; from jupyter_book.cli.main import main; sys.exit(main())'

# Notebooks listed in _toc.yml (evaluated when a recipe runs, once .venv exists).
NOTEBOOKS = $$($(PY) tools/notebooks.py)

# Single pytest run: unit, property, notebook-tooling and book tests from tests/,
# plus nbval (strict: stored outputs must match) on every notebook in _toc.yml.
# --nbval only collects .ipynb files; the .py tests run as usual.
PYTEST_ARGS ?=
NBVAL_ARGS := --nbval --nbval-current-env --nbval-cell-timeout=600

.PHONY: venv book test outputs exercises lab bench clean

venv: $(STAMP) $(AXE)

# Re-installs only when requirements.txt or pyproject.toml change.
$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON_SYSTEM) -m venv $(VENV)
	$(PY) -m pip install -r requirements.txt
	$(PY) -m pip install -e ".[course]"  # the library and the course extra (pinned above)
	$(PY) -m pip check
	touch $@

# Re-installs only when the lock file changes; `npm ci` installs exactly what it pins.
$(AXE): tools/axe/package-lock.json
	npm ci --prefix tools/axe --ignore-scripts --no-audit --no-fund
	touch $@

book: $(STAMP)
	$(JB) build -W -n --keep-going --builder html .
	@echo "HTML in _build/html (open _build/html/index.html)"

test: $(STAMP) $(AXE)
	$(PY) -m pytest -p no:cacheprovider $(PYTEST_ARGS) tests $(NOTEBOOKS) $(NBVAL_ARGS)

outputs: $(STAMP)
	$(PY) tools/execute_notebooks.py

exercises: $(STAMP)
	$(PY) tools/make_exercises.py

# Learners: open the learners' copies in JupyterLab, with .venv as the kernel. JupyterLab is
# installed into .venv on first use (it is not needed to build or test the book); the copies
# are written on first use only, so a second `make lab` keeps your answers.
JUPYTERLAB := jupyterlab==4.6.6
lab: $(STAMP)
	$(PY) -c 'import jupyterlab' 2>/dev/null || $(PY) -m pip install $(JUPYTERLAB)
	test -d exercises || $(PY) tools/make_exercises.py
	$(PY) -m jupyterlab $(if $(filter 0,$(shell id -u)),--allow-root) exercises/

# bnkit vs PyTorch (one thread, and two in their own column), CS231n's and d2l's batch norm and
# the floor (a copy, a read-only pass), in alternating rounds kept only while the rest of the
# machine is quiet (below half a core; a busy machine makes it wait up to --max-wait seconds per
# comparison, then it reports the quietest rounds and says so). Prints a Markdown table, writes
# benchmarks/results.json (median, IQR and rounds kept per figure) and machine.json, and lists
# the figures that moved by more than their spread since the stored run as unstable.
# BENCH_ARGS=--suite-times also times nbval on each chapter and a book build (minutes more).
BENCH_ARGS ?=
bench: $(STAMP)
	$(PY) benchmarks/bench.py $(BENCH_ARGS)

clean:
	rm -rf _build exercises .pytest_cache .hypothesis
	find . -name __pycache__ -not -path './$(VENV)/*' -prune -exec rm -rf {} +
	find . -name .ipynb_checkpoints -not -path './$(VENV)/*' -prune -exec rm -rf {} +
