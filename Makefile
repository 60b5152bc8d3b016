# Continuum — common tasks. `make test` is the test command CI runs.
SWIFT ?= swift
CONTINUUM_DEBUG := .build/debug/continuum
CONTINUUM_RELEASE := .build/release/continuum

.PHONY: setup deps build release fetch-model test run bench fixtures clean

## Install system packages (Debian) the build and tests need: OpenBLAS,
## PostgreSQL's server binaries (the tests and `continuum serve` start a private
## cluster), and pip for fetching the model (whatever python3 is on PATH).
deps:
	@SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	if ! dpkg -s libopenblas-dev >/dev/null 2>&1; then \
		$$SUDO apt-get update -q && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q libopenblas-dev; \
	fi; \
	if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 && ! command -v initdb >/dev/null 2>&1; then \
		$$SUDO apt-get update -q && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q postgresql; \
	fi; \
	if ! python3 -m pip --version >/dev/null 2>&1; then \
		$$SUDO apt-get update -q && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q python3-pip; \
	fi

build: deps
	$(SWIFT) build

release: deps
	$(SWIFT) build -c release

## Fetch the default model (SmolLM2-135M-Instruct Q4_1) and verify its SHA-256.
fetch-model: build
	$(CONTINUUM_DEBUG) fetch-model

setup: deps fetch-model

## Set up, build optimised, and chat with the default model once.
run: setup release
	$(CONTINUUM_RELEASE) generate --chat --prompt "$${PROMPT:-Explain in two sentences why the sky is blue.}" --max-tokens 128

## Run every test (needs the model: fetched first): the CLI contract checks,
## then swift test.
test: setup
	scripts/cli-smoke.sh $(CONTINUUM_DEBUG)
	$(SWIFT) test

## Engine vs llama.cpp (needs `pip install llama-cpp-python`).
bench: setup release
	scripts/bench-vs-llamacpp

## Regenerate the reference fixtures (needs torch, transformers, tokenizers, gguf).
fixtures: fetch-model
	scripts/make-fixtures.py

clean:
	rm -rf .build
