# The one task runner: developers run these recipes, and CI runs `make ci` (see .ci/run).
#
# Toolchain: rust-toolchain.toml pins 1.95.0 with rustfmt and clippy, the version preinstalled
# on our machines, so nothing is downloaded (our machines reach package registries only).

SHELL := bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := help

CARGO ?= cargo
# Crates that would make the domain core impure (IO, async runtime, network, database).
IMPURE_CORE_DEPS := tokio|sqlx|rdkafka|axum|reqwest|hyper
# A banner with the time, so CI logs show how long each recipe took.
banner = echo "==> [$$(date -u +%H:%M:%S)] $(1)"

.PHONY: help ci lint fmt core-is-pure helm-check test dev

help: ## list the recipes
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{ printf "  %-14s %s\n", $$1, $$2 }'

ci: core-is-pure lint helm-check test ## everything CI checks, in CI's order

lint: ## formatting check, then clippy on every target with warnings as errors
	@$(call banner,lint: rustfmt)
	$(CARGO) fmt --all -- --check
	@$(call banner,lint: clippy)
	$(CARGO) clippy --workspace --all-targets -- -D warnings

fmt: ## format the workspace
	$(CARGO) fmt --all

core-is-pure: ## fail if workflow-core depends on an async runtime, a database or network client
	@$(call banner,core-is-pure)
	@tree="$$($(CARGO) tree -p workflow-core -e normal --prefix none)"; \
	if impure="$$(grep -E '^($(IMPURE_CORE_DEPS))([-_][A-Za-z0-9_-]+)? v' <<<"$$tree")"; then \
		echo "workflow-core must stay pure (no IO), but its dependency tree has:"; \
		sed "s/ (\*)$$//" <<<"$$impure" | sort -u; \
		exit 1; \
	fi; \
	echo "workflow-core is pure: none of $(IMPURE_CORE_DEPS) in its dependencies"

helm-check: ## lint, render and check the Helm chart without a cluster (builds helm once into ~/.cache/payos-helm-check)
	@$(call banner,helm-check)
	scripts/helm-check.sh

test: ## every test, unit and integration (integration suites start PostgreSQL via crates/testkit)
	@$(call banner,test)
	$(CARGO) test --workspace

dev: ## run the embedded engine locally
	$(CARGO) run -p payos-workflows -- dev
