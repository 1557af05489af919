# Two commands take a fresh machine to a running system: `make run`, `make test`.
VENV        ?= .venv
PYTHON      ?= python3.11
# cpu, cuda or auto (cuda when nvidia-smi sees a GPU).
ENGINE      ?= auto
# Where the CPU build of torch comes from when no local wheel is found.
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
CONFIG      ?=
PYTEST_ARGS ?=
# checkov (the manifest scanner the tests run) pins packages the engine needs
# newer, so it has a venv of its own.
CHECKOV_VENV    ?= .venv-checkov
CHECKOV_VERSION ?= 3.3.30

BIN := $(VENV)/bin
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export VLLM_CPU_NUM_OF_RESERVED_CPU ?= 0
export VLLM_CPU_KVCACHE_SPACE ?= 1

.PHONY: install checkov run test unit protos lint loadtest bench clean

install:
	@VENV=$(VENV) PYTHON=$(PYTHON) ENGINE=$(ENGINE) TORCH_INDEX=$(TORCH_INDEX) ./deploy/install.sh

checkov: $(CHECKOV_VENV)/bin/checkov

$(CHECKOV_VENV)/bin/checkov:
	$(PYTHON) -m venv $(CHECKOV_VENV)
	$(CHECKOV_VENV)/bin/python -m pip install --disable-pip-version-check -q "checkov==$(CHECKOV_VERSION)"

run: install
	$(BIN)/mss up $(if $(CONFIG),--config $(CONFIG))

test: install checkov
	$(BIN)/python -m pytest $(PYTEST_ARGS)

unit: install checkov
	$(BIN)/python -m pytest tests/unit $(PYTEST_ARGS)

protos: install
	$(BIN)/python -m protos.build

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy mss gateway controller replica scheduler loadtest tests deploy/grafana deploy/kubernetes

loadtest: install
	$(BIN)/python -m loadtest.run_locust

bench: install
	$(BIN)/python -m loadtest.bench_replica
	$(BIN)/python -m loadtest.bench_gateway

clean:
	rm -rf $(VENV) $(CHECKOV_VENV) .pytest_cache .mypy_cache .ruff_cache
