# The two quickstart commands, and the few more a developer wants.
#   make serve   set up the serving install (no torch) and serve the default model
#   make test    set up the full install (CPU torch, training, dev tools) and run every test
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
MODELS ?= models
DEFAULT_MODEL ?= shakespeare-word
PORT ?= 50051
METRICS_PORT ?= 9464

.PHONY: serve test lint proto default-model char-model bench setup-serve setup-dev

$(BIN)/python:
	$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "rnnlm needs Python 3.11 or newer"'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

setup-serve: $(BIN)/python
	$(BIN)/pip install --quiet -e .

# torch==2.13.0 first: it is the CPU build, and the train extra's range accepts it.
setup-dev: $(BIN)/python
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[train,dev]'

serve: setup-serve
	$(BIN)/rnnlm serve --models $(MODELS) --default-model $(DEFAULT_MODEL) \
		--port $(PORT) --metrics-port $(METRICS_PORT)

test: setup-dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest -q

lint: setup-dev
	$(BIN)/ruff check . && $(BIN)/ruff format --check . && $(BIN)/mypy server rnnlm/client.py

proto: setup-dev
	PYTHON=$(BIN)/python bash scripts/gen_proto.sh

# Rebuild the shipped default bundle (see README, "The default model").
default-model: setup-dev
	bash scripts/build_default_model.sh

# Rebuild the shipped character-level bundle (30 minutes of training).
char-model: setup-dev
	bash scripts/build_char_model.sh

bench: setup-dev
	$(BIN)/rnnlm bench --out benchmarks/results
