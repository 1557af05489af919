# Two commands take a fresh machine to a running system: `make run`, `make test`.
VENV        ?= .venv
PYTHON      ?= python3.11
# cpu, cuda or auto (cuda when nvidia-smi sees a GPU).
ENGINE      ?= auto
# Where the CPU build of torch comes from when no local wheel is found.
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
CONFIG      ?=
PYTEST_ARGS ?=

BIN := $(VENV)/bin
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export VLLM_CPU_NUM_OF_RESERVED_CPU ?= 0
export VLLM_CPU_KVCACHE_SPACE ?= 1

.PHONY: install run test unit protos lint loadtest bench clean

install:
	@VENV=$(VENV) PYTHON=$(PYTHON) ENGINE=$(ENGINE) TORCH_INDEX=$(TORCH_INDEX) ./deploy/install.sh

run: install
	$(BIN)/mss up $(if $(CONFIG),--config $(CONFIG))

test: install
	$(BIN)/python -m pytest $(PYTEST_ARGS)

unit: install
	$(BIN)/python -m pytest tests/unit $(PYTEST_ARGS)

protos: install
	$(BIN)/python -m protos.build

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy mss gateway controller replica scheduler loadtest tests deploy/grafana

loadtest: install
	$(BIN)/python -m loadtest.run_locust

bench: install
	$(BIN)/python -m loadtest.bench_replica
	$(BIN)/python -m loadtest.bench_gateway

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
