# Two entry points: `make demo` and `make test`; both build .venv through `make setup`.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_PIN := torch==2.13.0
DEMO_OUT ?= demo_out
DATA ?= ../shared/data
BIN := $(VENV)/bin
# pytest-xdist workers, handed two tests at a time, longest first (tests/conftest.py), so the
# long real-process tests run side by side.
TEST_WORKERS ?= 2

.PHONY: setup demo readme-images test lint clean

setup: $(VENV)/.installed

# torch first and pinned (a CPU wheel on the build machines); an existing torch, e.g. a site's
# CUDA build, is kept because the project only asks for a range.
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q $(TORCH_PIN)
	$(PIP) install -q -e ".[dev]"
	@# The compose file is validated by the tests with a compose CLI; Debian ships v1.
	@if ! command -v docker-compose >/dev/null && ! docker compose version >/dev/null 2>&1; then \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
			apt-get update -qq && apt-get install -y -qq docker-compose >/dev/null; \
		else echo "note: install docker compose (or docker-compose) for tests/test_docker_static.py"; fi; \
	fi
	@# A real headless browser renders `hmgdm-server report` pages in the tests.
	@if ! command -v chromium >/dev/null && ! command -v chromium-browser >/dev/null; then \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
			(apt-get update -qq && apt-get install -y -qq chromium >/dev/null) \
				|| echo "note: chromium did not install; tests/server/test_report.py skips its browser check"; \
		else echo "note: install chromium for the browser check of tests/server/test_report.py"; fi; \
	fi
	touch $@

# The main job end to end on the bundled real data (read in place, never copied):
# a whole-slide image to tile graphs (QC pictures, its entities as QuPath GeoJSON), then 3 simulated hospitals pretrain H-MGDM together on
# real lung H&E images and the federated encoder is evaluated with a patient-grouped probe,
# fine-tuned federated (head only) and explained on one image; then federated survival on
# real TCGA-LUSC clinical data, tissue source sites as hospitals.
demo: setup
	$(BIN)/hmgdm-client build-graphs $(DATA)/slides/cmu-1-small-region.svs --out $(DEMO_OUT)/wsi
	$(BIN)/hmgdm-client export cmu-1-small-region --graphs $(DEMO_OUT)/wsi \
		--out $(DEMO_OUT)/wsi/cmu-1-small-region.geojson --color-by "Haematoxylin OD mean" \
		--png $(DEMO_OUT)/wsi/cmu-1-small-region_geojson.png
	@# 1,800 small tiles: QC pictures of each would cost minutes and ~300 MB; the WSI has them.
	$(BIN)/hmgdm-client build-graphs $(DATA)/lc25000_lung --mpp 1.0 --config configs/demo.toml \
		--out $(DEMO_OUT)/lung --workers 2 --no-qc
	$(BIN)/hmgdm-server simulate --graphs $(DEMO_OUT)/lung --sites 3 --config configs/demo.toml \
		--out $(DEMO_OUT)/federated
	$(BIN)/hmgdm-client evaluate classify --graphs $(DEMO_OUT)/lung \
		--checkpoint $(DEMO_OUT)/federated/run/final.pt --labels $(DATA)/lc25000_lung/labels.csv \
		--id-column path --patient-column group_id --out $(DEMO_OUT)/eval_lung
	$(BIN)/hmgdm-server finetune --graphs $(DEMO_OUT)/lung --labels $(DATA)/lc25000_lung/labels.csv \
		--checkpoint $(DEMO_OUT)/federated/run/final.pt --task classification --sites 3 \
		--config configs/demo.toml --id-column path --patient-column group_id \
		--out $(DEMO_OUT)/finetune_lung
	$(BIN)/hmgdm-client explain lung_aca/lungaca1000 --graphs $(DEMO_OUT)/lung \
		--checkpoint $(DEMO_OUT)/finetune_lung/run/finetuned.pt --out $(DEMO_OUT)/explain/lungaca1000.png
	$(BIN)/hmgdm-server survival-clinical $(DATA)/tcga_survival/tcga_lusc_survival.csv \
		--out $(DEMO_OUT)/survival_lusc
	$(BIN)/hmgdm-server report $(DEMO_OUT)/federated/run

# The README's figures, copied from a demo run (never drawn by hand).
readme-images: demo
	mkdir -p docs/img
	cp $(DEMO_OUT)/eval_lung/confusion.png docs/img/lc25000_confusion.png
	cp $(DEMO_OUT)/survival_lusc/run/km.png docs/img/tcga_lusc_km.png
	cp $(DEMO_OUT)/explain/lungaca1000.png docs/img/lc25000_explain.png
	cp $(DEMO_OUT)/wsi/qc/cmu-1-small-region.png docs/img/cmu_qc.png
	cp $(DEMO_OUT)/wsi/cmu-1-small-region_geojson.png docs/img/cmu_geojson.png

test: setup
	$(VENV)/bin/python -m pytest -q -n $(TEST_WORKERS) --dist load --maxschedchunk 2

lint: setup
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

clean:
	rm -rf $(DEMO_OUT) .pytest_cache
