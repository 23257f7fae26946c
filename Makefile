# Two entry points (see README): `make quickstart` and `make test`. Each sets up .venv first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch first, pinned: PyPI gives a CUDA build on a GPU machine, and pip finds the local CPU wheel
# where one is provided; the package's own `torch>=2.4` then installs nothing more.
TORCH ?= torch==2.13.0

.PHONY: setup quickstart test lint browser clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[all,dev]"
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

clean:
	rm -rf $(VENV) runs
