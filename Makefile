# remote-mvc: the front door. `make help` lists the targets.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
RUNTIME := runtime

.DEFAULT_GOAL := help
.PHONY: help venv run credentials test test-unit test-integration test-e2e lint clean

help: ## list the targets
	@grep -hE '^[a-zA-Z0-9_-]+:.*## ' $(MAKEFILE_LIST) | sort | awk -F':.*## ' '{printf "  %-18s %s\n", $$1, $$2}'

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[stack,test]'
	touch $@

venv: $(VENV)/.installed ## create .venv with the project installed (editable) and its tools

$(RUNTIME)/credentials.json: | $(VENV)/.installed
	@mkdir -p -m 700 $(RUNTIME)
	$(PY) -c "from remote_mvc import generate_credentials; generate_credentials('$@')"
	@echo "generated $@ (git-ignored): identities controller, admin, service, viewer, gateway"

credentials: $(RUNTIME)/credentials.json ## generate local secrets into runtime/ (once)

run: venv credentials ## run the local stack in the foreground (name server, model, ticker, gateway, 3 viewers); Ctrl-C stops it
	@# a credentials file from before the web gateway lacks its identity: make a new one
	@grep -qs '"gateway"' $(RUNTIME)/credentials.json || { rm -f $(RUNTIME)/credentials.json; $(MAKE) --no-print-directory credentials; }
	@echo "local stack: try  .venv/bin/remote-mvc-ctl query  and  .venv/bin/remote-mvc-ctl set name=newname value=99"
	@echo "live page: http://127.0.0.1:8080/"
	$(VENV)/bin/supervisord -c services/supervisord.conf

test: venv ## the whole suite: unit, integration and end-to-end container tests
	$(PY) -m pytest

test-unit: venv ## unit tests only
	$(PY) -m pytest tests/unit

test-integration: venv ## integration tests against real daemons on 127.0.0.1
	$(PY) -m pytest tests/integration

test-e2e: venv ## end-to-end tests against real containers
	$(PY) -m pytest tests/e2e

lint: venv ## ruff on everything, mypy on the library
	$(VENV)/bin/ruff check shared services tests bench
	$(VENV)/bin/mypy shared/remote_mvc

clean: ## remove the virtual environment, runtime state and caches
	rm -rf $(VENV) $(RUNTIME) build .pytest_cache .ruff_cache

-include docker/stack.mk
-include docker/cluster.mk
-include deploy/swarm/swarm.mk
-include bench/bench.mk
-include tests/chaos/chaos.mk
