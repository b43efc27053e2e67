# Two commands do all the set-up: `make demo` and `make test` create the environment when it is
# missing, install, and run. VENV=/path/to/env reuses another environment (its torch is kept).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
RUN ?= runs/demo
CORPUS ?=

.PHONY: install test test-slow demo lint bench scale clean

$(VENV)/.cocomix-installed: pyproject.toml scripts/install.sh
	PYTHON=$(PYTHON) bash scripts/install.sh $(VENV)
	touch $@

install: $(VENV)/.cocomix-installed

test: install
	$(PY) -m pytest

test-slow: install
	$(PY) -m pytest -m slow

demo: install
	$(PY) -m recipes.demo --run $(RUN) --tensorboard $(if $(CORPUS),--corpus $(CORPUS))

lint: install
	$(PY) -m ruff check .

bench: install
	$(PY) bench/store.py
	$(PY) bench/stage1.py --json bench/results/stage1.json
	$(PY) bench/sae_speed.py
	$(PY) bench/extract.py --json bench/results/extract.json
	$(PY) bench/train.py
	$(PY) bench/manifest.py --json bench/results/manifest.json
	$(PY) bench/scale_model.py  # docs/scaling.md: the scaling model from the JSON files above

# Only the benches the scaling model reads, then docs/scaling.md's tables regenerated (fails while an
# input is missing). GPU figures: bench/results/h200-2026.json, or a GPU run saved as *-gpu.json there.
scale: install
	$(PY) bench/stage1.py --json bench/results/stage1.json
	$(PY) bench/manifest.py --json bench/results/manifest.json
	$(PY) bench/extract.py --json bench/results/extract.json
	$(PY) bench/scale_model.py --strict --update docs/scaling.md

clean:
	rm -rf $(RUN) .pytest_cache
