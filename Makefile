# Two commands do all set-up on a fresh machine: `make up` and `make test`.
# Everything heavy is cached outside the clone (pip's wheel cache, ~/.cache/llmstream for
# Kafka jars) or in ignored folders (.venv), so a second run is fast.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin
TOOLS_BIN := $(or $(LLMSTREAM_CACHE_DIR),$(or $(XDG_CACHE_HOME),$(HOME)/.cache)/llmstream)/bin
# protoc plugins (mypy-protobuf) and buf live in the venv; kustomize and grpcurl in TOOLS_BIN.
export PATH := $(abspath $(VENV))/bin:$(TOOLS_BIN):$(PATH)
PROTOS := $(shell find proto -name '*.proto')
# llama.cpp builds from source here (no binary wheel): these flags skip what we don't use.
export CMAKE_ARGS ?= -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_CURL=OFF
export CMAKE_BUILD_PARALLEL_LEVEL ?= 2

.PHONY: system-deps tools up test down status deps proto js-deps vllm litellm prometheus lint typecheck buflint pytest unit bench chaos clean readme-config

# ENGINE=vllm|synthetic|llamacpp picks the model server's engine (default: LLMSTREAM_ENGINE).
# PROMETHEUS=1 also starts a local Prometheus with the alerting rules (docs/operations.md).
up: deps proto $(if $(filter vllm,$(ENGINE)),vllm) $(if $(PROMETHEUS),prometheus)
	$(if $(PROMETHEUS),$(BIN)/llmstream infra up --with-prometheus &&) $(BIN)/llmstream up $(if $(ENGINE),--engine $(ENGINE))

test: deps proto vllm litellm prometheus js-deps
	$(BIN)/llmstream infra up
	@# -k: report every failing check in one run, not just the first.
	$(MAKE) --no-print-directory -k lint typecheck buflint pytest

down:
	$(BIN)/llmstream infra down

status:
	$(BIN)/llmstream infra status

deps: $(VENV)/.installed system-deps tools

system-deps:
	@deploy/local/system-deps.sh

tools:
	@deploy/local/tools.sh

$(VENV)/.installed: pyproject.toml
	@command -v python3 >/dev/null || { echo "python3 not found: install Python 3.11+" >&2; exit 1; }
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev,llamacpp]' || { echo "pip install failed: PyPI must be reachable (llama-cpp-python builds from source, ~7 min cold)" >&2; exit 1; }
	touch $@

proto: llmstream/v1/.generated

# The official openai JavaScript SDK that tests/integration/test_openai_*.py run with node
# (those tests skip when node is not installed); `npm ci` again when the lock file changes.
js-deps: tests/js/node_modules/.package-lock.json

tests/js/node_modules/.package-lock.json: tests/js/package-lock.json
	@if command -v npm >/dev/null; then cd tests/js && npm ci --no-audit --no-fund; \
	else echo "node/npm not installed: the OpenAI JavaScript SDK tests will be skipped" >&2; fi

# The vLLM engine's own virtualenv (~6 GiB, ~2.5 min cold; the main one stays lean) and
# SmolLM2-135M-Instruct converted for it into the cache dir (~30 s, once; checked by its stamp).
VLLM_VENV ?= .venv-vllm
vllm: $(VLLM_VENV)/.installed
	@$(VLLM_VENV)/bin/python deploy/local/convert_smollm2.py

$(VLLM_VENV)/.installed: deploy/local/vllm.sh pyproject.toml
	@VLLM_VENV=$(VLLM_VENV) deploy/local/vllm.sh
	touch $@

# Generated code goes to llmstream/v1/ (git-ignored): never edit it by hand.
llmstream/v1/.generated: $(PROTOS) $(VENV)/.installed
	rm -rf llmstream/v1
	$(PY) -m grpc_tools.protoc -Iproto --python_out=. --grpc_python_out=. --mypy_out=. --mypy_grpc_out=. $(PROTOS)
	touch llmstream/v1/__init__.py $@

lint:
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	@# Layers: tooling -> services (independent of each other) -> runtime core (pyproject.toml).
	$(BIN)/lint-imports

typecheck:
	$(BIN)/mypy

buflint:
	$(BIN)/buf lint

pytest:
	$(BIN)/pytest -q -p no:cacheprovider -rxs

unit: deps proto
	$(BIN)/pytest -q -p no:cacheprovider tests/unit

# Debian's Prometheus (with promtool) when missing: the alert-rule tests and --with-prometheus.
prometheus:
	@deploy/local/prometheus.sh

# The LiteLLM proxy for `llmstream bench litellm` (side by side with llmstream), in its own
# virtualenv: its dependency pins must not touch the main one.
LITELLM_VENV ?= .venv-litellm
litellm: $(LITELLM_VENV)/.installed

$(LITELLM_VENV)/.installed: deploy/local/litellm.sh
	@LITELLM_VENV=$(LITELLM_VENV) deploy/local/litellm.sh
	touch $@

bench: deps proto litellm
	$(BIN)/llmstream infra up
	$(BIN)/llmstream bench --profile --litellm-venv $(LITELLM_VENV)

# Fault injection (~11 min, 3 brokers): on a private Kafka/PostgreSQL/Redis instance of its
# own (the shared one is never touched); prints the table of README's Reliability section.
chaos: deps proto
	$(BIN)/llmstream chaos

clean:
	rm -rf llmstream/v1 .mypy_cache .ruff_cache .pytest_cache

# Rewrites README's configuration table from llmstream/config.py (a unit test checks they match).
readme-config: deps
	$(BIN)/llmstream config --update-readme README.md
