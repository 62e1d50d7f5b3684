# Two entry points: `make demo` and `make test`; both build .venv through `make setup`.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_PIN := torch==2.13.0
DEMO_OUT ?= demo_out

.PHONY: setup demo test lint bench clean

setup: $(VENV)/.installed

# torch first and pinned (a CPU wheel on the build machines); an existing torch, e.g. a site's
# CUDA build, is kept because the project only asks for a range.
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q $(TORCH_PIN)
	$(PIP) install -q -e ".[dev]"
	touch $@

demo: setup
	$(VENV)/bin/python -m client.demo --out $(DEMO_OUT)

test: setup
	$(VENV)/bin/python -m pytest -q

lint: setup
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

clean:
	rm -rf $(DEMO_OUT) .pytest_cache
