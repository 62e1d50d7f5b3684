# Two entry points: `make demo` and `make test`; both build .venv through `make setup`.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_PIN := torch==2.13.0
DEMO_OUT ?= demo_out
DATA ?= ../shared/data
BIN := $(VENV)/bin

.PHONY: setup demo test lint clean

setup: $(VENV)/.installed

# torch first and pinned (a CPU wheel on the build machines); an existing torch, e.g. a site's
# CUDA build, is kept because the project only asks for a range.
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q $(TORCH_PIN)
	$(PIP) install -q -e ".[dev]"
	touch $@

# The main job end to end on the bundled real data (read in place, never copied).
demo: setup
	$(BIN)/hmgdm-client build-graphs $(DATA)/slides/cmu-1-small-region.svs \
		$(DATA)/slides/tcga-cr-7395-01a-01-ts1.svs --out $(DEMO_OUT)/slides --workers 2
	$(BIN)/hmgdm-client build-graphs $(DATA)/kather2016_tiles --mpp 0.495 --out $(DEMO_OUT)/kather

test: setup
	$(VENV)/bin/python -m pytest -q

lint: setup
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

clean:
	rm -rf $(DEMO_OUT) .pytest_cache
