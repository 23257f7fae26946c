# Two entry points (see README): `make quickstart` and `make test`. Each sets up .venv first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch first, pinned: PyPI gives a CUDA build on a GPU machine, and pip finds the local CPU wheel
# where one is provided; the package's own `torch>=2.4` then installs nothing more.
TORCH ?= torch==2.13.0

.PHONY: setup quickstart test lint browser clean lock

# Every other package comes at the version in constraints.txt, the set CI passed with, so a fresh
# clone installs exactly what was tested (torch's own dependencies included).
LOCK := constraints.txt

$(BIN)/.installed: pyproject.toml $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -c $(LOCK) pip setuptools
	$(BIN)/python -m pip install -q -c $(LOCK) "$(TORCH)"
	$(BIN)/python -m pip install -q -c $(LOCK) -e ".[all,dev]"
	touch $@

setup: $(BIN)/.installed

quickstart: setup
	$(BIN)/medvl quickstart --out runs/quickstart

# The web-demo test drives Debian's chromium through Playwright (never a browser Playwright downloads).
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    (apt-get update -qq && apt-get install -y -qq chromium >/dev/null) || echo "chromium install failed: browser tests will skip"; \
	  else echo "chromium not installed (needs root): browser tests will skip"; fi; }

test: setup browser
	$(BIN)/ruff check medvl tests benchmarks
	$(BIN)/pytest -q

# Refresh the lock: resolve today's newest versions allowed by pyproject.toml in a scratch venv and
# write them to constraints.txt. Run `make test` afterwards and commit the file only if it passes.
lock:
	rm -rf .lock-venv
	$(PYTHON) -m venv .lock-venv
	.lock-venv/bin/python -m pip install -q --upgrade pip setuptools
	.lock-venv/bin/python -m pip install -q "$(TORCH)"
	.lock-venv/bin/python -m pip install -q -e ".[all,dev]"
	{ head -n 2 $(LOCK); .lock-venv/bin/python -m pip freeze --all --exclude-editable | grep -iv '^torch=='; } > $(LOCK).new
	mv $(LOCK).new $(LOCK)
	rm -rf .lock-venv

# GMAI-VL's claim on real SLAKE: train questions only vs. + annotation-guided data (docs/slake-experiment.md).
.PHONY: slake-experiment
slake-experiment: setup
	$(BIN)/python benchmarks/slake_experiment.py --size full --out runs/slake-experiment --test

clean:
	rm -rf $(VENV) runs
