# The two commands a newcomer needs: `make demo` (train, export, serve) and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
RUN_DIR ?= runs/demo

.PHONY: install demo test test-all lint compare-ml100k clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first and pinned: this CPU wheel installs from local disk; an unpinned torch pulls GBs of CUDA
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[train,serve,dev]'
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

test-all: $(STAMP)
	$(PY) -m pytest -q

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy

# The main job, as far as it exists today: train DIN on the synthetic log with planted interests.
demo: $(STAMP)
	$(PY) -m training.train --dataset synthetic --model din --out $(RUN_DIR)

compare-ml100k: $(STAMP)
	$(PY) -m training.compare --dataset ml-100k --data-dir $(or $(DATA_DIR),../shared/data/ml-100k) \
		--models base,din,dien --out runs/compare-ml100k

clean:
	rm -rf $(VENV) runs .cache
