.DEFAULT_GOAL := help
SHELL := /bin/bash

.PHONY: help setup demo test lint format bench

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-8s %s\n", $$1, $$2}'

setup: ## create or reuse the cached environment and build the Rust extension
	@bash scripts/env.sh

demo: ## the main job: FreeKV on CPU (SmolLM2) answers from a document over its budget, next to dense
	@bash scripts/demo.sh

test: ## the whole test suite (what CI runs)
	@bash scripts/test.sh

lint: ## formatters in check mode, linters, mypy and the import contracts
	@source scripts/env.sh && cargo fmt --all --check && \
	  cargo clippy --workspace --all-targets -- -D warnings && ruff check . && ruff format --check . && \
	  bash scripts/clang_format.sh && mypy && lint-imports

format: ## apply cargo fmt, ruff format and clang-format
	@source scripts/env.sh && cargo fmt --all && ruff format . && ruff check --fix . && \
	  bash scripts/clang_format.sh --apply
