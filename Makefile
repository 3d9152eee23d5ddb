# sapiens-train: `make demo` and `make test` do all set-up on a fresh machine.
#
# torch is installed first, pinned, so that pip does not pull a multi-GB CUDA build by accident.
# On a GPU machine choose the CUDA build of your driver, e.g.:
#   make install TORCH="torch==2.6.0" TORCH_INDEX=https://download.pytorch.org/whl/cu124
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.13.0
TORCH_INDEX ?=
STAMP := $(VENV)/.installed

.PHONY: help install demo test test-fast lint format clean

help:  ## list targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)  ## create .venv and install the package with its dependencies

demo: $(STAMP)  ## generate SynthHumans, pretrain a small ViT with MAE, fine-tune the four tasks, print metrics
	WANDB_MODE=$${WANDB_MODE:-offline} $(BIN)/python -m experiments.demo

test: $(STAMP)  ## run the whole test suite (starts a local Slurm cluster when possible)
	$(BIN)/python -m pytest -q

test-fast: $(STAMP)  ## the suite without end-to-end and Slurm tests
	$(BIN)/python -m pytest -q -m "not slow and not slurm"

lint: $(STAMP)  ## ruff check and format check
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)  ## apply ruff fixes and formatting
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:  ## remove generated data, runs and caches (keeps .venv)
	rm -rf datasets runs outputs .pytest_cache .ruff_cache
