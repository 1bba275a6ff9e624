# halosync — the two commands a newcomer needs: `make run` and `make test`.
SHELL := /bin/bash
CARGO ?= cargo

.PHONY: all build build-all run test lint fmt unit services packages bench release clean raw account-create account-update scale usage onboard trickle subscription tenants

all: build

## Build every binary (debug).
build:
	$(CARGO) build --workspace --bins

## Build, declare the topology, start halo-sim and the workers against the
## local RabbitMQ and Redis, publish schemas/examples/valid, print the
## resulting HaloPSA customers. Ctrl-C stops everything cleanly.
run: build
	bash deploy/local/run.sh

## Everything CI checks: formatting, lints, unit and integration tests
## (the integration tests need RabbitMQ and Redis running locally).
test: packages services build-all lint check-deploy
	CARGO="$(CARGO)" bash deploy/local/test-parallel.sh

## Every target, tests included, in one build: the worker binaries the
## integration tests start are then built with the same (dev-dependency
## unified) features as the tests, so `cargo test` compiles nothing twice.
build-all:
	$(CARGO) build --workspace --all-targets

## Installs the Debian packages the tests need (deploy/local/debian-packages.txt).
packages:
	@bash deploy/local/install-packages.sh

## Fails loudly (never skips) when RabbitMQ or Redis is not running.
services:
	@bash deploy/local/check-services.sh

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

fmt:
	$(CARGO) fmt --all

## Throughput and memory figures (release build); not part of `make test`.
## `make bench` runs the default scenarios; name some to run only those,
## e.g. `make bench onboard` (one MSP onboarded at a HaloPSA budget;
## BENCH_ARGS="--customers 500 --budget 20/2" sizes it).
BENCH_SCENARIOS := $(filter raw account-create account-update scale usage onboard trickle subscription tenants,$(MAKECMDGOALS))
bench: services
	$(RELEASE_BUILD)
	./target/release/halosync-bench $(BENCH_ARGS) $(BENCH_SCENARIOS)

# Scenario names given after `bench` are arguments, not targets.
raw account-create account-update scale usage onboard trickle subscription tenants:
	@:

## The release build: the same command the Dockerfile runs.
release:
	$(RELEASE_BUILD)

clean:
	$(CARGO) clean

## Deployment files (Dockerfile, deploy/): Kubernetes manifests against the
## Kubernetes schemas, KEDA resources, the Compose file against the Compose
## specification, RabbitMQ definitions against the workers' topology, and the
## Dockerfile against RELEASE_BUILD and the workspace's binaries. Starts no
## container; the first run creates .venv-deploy (pinned PyPI packages).
RELEASE_BUILD = cargo build --release --locked --workspace --bins
.PHONY: check-deploy
check-deploy:
	RELEASE_BUILD='$(RELEASE_BUILD)' CARGO='$(CARGO)' bash deploy/checks/check-deploy.sh

## Longer fuzzing of everything that reads outside input (shared/tests/fuzz):
## FUZZ_CASES cases per property (make test runs 256). Debug build on
## purpose: overflow checks stay on, so an arithmetic overflow is a panic.
## A failure is shrunk and saved in shared/tests/fuzz/*.regressions.
FUZZ_CASES ?= 10000
.PHONY: fuzz
fuzz:
	PROPTEST_CASES=$(FUZZ_CASES) $(CARGO) test -p halosync-shared --test fuzz -- --test-threads=2
