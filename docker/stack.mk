# Container stack targets, included by the root Makefile (`include docker/stack.mk`).
# Run from the repository root. Uses VENV/PY from the root Makefile when they exist.
#
#   make docker-engine   install/start Docker + compose plugin (.ci/install-docker.sh)
#   make base-image      pick python:3.11-slim or build the debootstrap base
#   make wheels          fill build/wheelhouse (project wheel + dependencies) on the host
#   make images          build the service, Prometheus and Alertmanager images
#   make up              all of the above, then start the stack (what it adds to a plain
#                        `docker compose up -d --wait`: the offline wheelhouse, the local base
#                        image when python:3.11-slim cannot be pulled, and the summary it prints)
#   make backup          online backup of the model's state + audit log into backups/<time>/
#   make restore BACKUP=backups/<time>   restore it into the (stopped) model, start it again
#   make scale VIEWERS=5 / make ctl / make logs [SERVICE=model] / make ps / make metrics
#   make down            stop and remove containers + networks (volumes kept)
#   make down-volumes    ... and the named volumes (model state, audit log, name server data)
#   make stack-clean     ... and the images and the wheelhouse

COMPOSE        ?= docker compose
VIEWERS        ?= 3
WHEELHOUSE     ?= build/wheelhouse
REMOTE_MVC_IMAGE ?= remote-mvc:latest
PROMETHEUS_IMAGE ?= remote-mvc/prometheus:latest
ALERTMANAGER_IMAGE ?= remote-mvc/alertmanager:latest
BACKUP_DIR     ?= backups
BACKUP         ?=
UP_TIMEOUT     ?= 240
SERVICE        ?=
# Python used on the host for pip (wheelhouse), secrets and `make metrics`.
STACK_PY       ?= $(if $(wildcard $(PY)),$(PY),python3)

export REMOTE_MVC_IMAGE PROMETHEUS_IMAGE ALERTMANAGER_IMAGE

_STACK_SOURCES := pyproject.toml $(shell find shared/remote_mvc services -name '*.py' 2>/dev/null)

.PHONY: docker-engine base-image wheels images up up-services up-secure certs scale ctl logs ps down down-volumes stack-clean metrics stack-env backup restore

docker-engine: ## install and start Docker + the Compose plugin when missing
	bash .ci/install-docker.sh

# Prints the chosen image; the build targets call the script themselves.
base-image: ## print the base image (builds a local Debian one with debootstrap when nothing can be pulled)
	@docker/base-image.sh

wheels: $(WHEELHOUSE)/.stamp ## fill build/wheelhouse with the project and its dependencies (offline image builds)

$(WHEELHOUSE)/.stamp: $(_STACK_SOURCES) docker/wheelhouse.sh
	PYTHON=$(STACK_PY) docker/wheelhouse.sh $(WHEELHOUSE)
	@touch $@

images: wheels stack-env ## build the service, Prometheus and Alertmanager images
	@base="$$(docker/base-image.sh)" && echo "base image: $$base" && \
	  BASE_IMAGE="$$base" $(COMPOSE) build

# Secrets are not here any more: the stack's one-shot "credentials" service writes them once into
# the mvc-secrets volume (docker-compose.yml). This only drops the MVC_CREDENTIALS line older
# versions wrote into .env, so no secret lingers in a file Compose interpolates into environments.
stack-env:
	@touch .env
	@if grep -qs '^MVC_CREDENTIALS=' .env; then \
	  sed -i '/^MVC_CREDENTIALS=/d' .env; \
	  echo "removed MVC_CREDENTIALS from .env: credentials now live in the mvc-secrets volume"; \
	fi
	@# the web gateway (a compose profile) is part of the stack `make` runs
	@grep -qs '^COMPOSE_PROFILES=' .env || echo 'COMPOSE_PROFILES=gateway' >> .env

up: images ## build and start the Compose stack (3 viewers, the web gateway, Prometheus, Alertmanager); plaintext, offline
	@echo "make up = make wheels (offline packages) + base image ($$(docker/base-image.sh 2>/dev/null)) + docker compose build + docker compose up -d --wait"
	@sed -i '/^COMPOSE_FILE=/d' .env
	@$(MAKE) --no-print-directory up-services

up-services:
	VIEWERS=$(VIEWERS) $(COMPOSE) up -d --wait --wait-timeout $(UP_TIMEOUT) --remove-orphans
	@$(COMPOSE) ps
	@port="$$($(COMPOSE) port prometheus 9090 2>/dev/null)"; am="$$($(COMPOSE) port alertmanager 9093 2>/dev/null)"; \
	echo; echo "remote-mvc is up ($(VIEWERS) viewers)."; \
	echo "  Prometheus:   http://$${port:-127.0.0.1:9099}   (make metrics)"; \
	gw="$$($(COMPOSE) port gateway 8080 2>/dev/null)"; \
	echo "  Live page:    http://$${gw:-127.0.0.1:8080}/   (remote-mvc-ctl --gateway http://$${gw:-127.0.0.1:8080} watch)"; \
	echo "  Alertmanager: http://$${am:-127.0.0.1:9095}   (runbooks: docs/operations.md)"; \
	echo "  Controller:   make ctl   then e.g.  remote-mvc-ctl set name=demo value=1 / remote-mvc-ctl shell"; \
	echo "  Viewer logs:  make logs SERVICE=viewer      All logs: make logs"; \
	echo "  Scale:        make scale VIEWERS=5          Stop: make down"

# Two-way TLS everywhere: certificates from `make certs`, and COMPOSE_FILE in .env naming the TLS
# override, so every later `docker compose` / `make` command (scale, ctl, down...) uses it too.
# `make up` switches back to plaintext.
certs: ## private CA + per-service and per-identity certificates in certs/ (git-ignored)
	bash ops/tls/make-certs.sh certs

up-secure: certs stack-env ## the same with two-way TLS on every connection (certificates from make certs)
	@sed -i '/^COMPOSE_FILE=/d' .env; echo "COMPOSE_FILE=docker-compose.yml:docker-compose.tls.yml" >> .env
	@echo "TLS on: COMPOSE_FILE in .env selects docker-compose.tls.yml (make up turns it off)"
	$(MAKE) images up-services

scale: stack-env ## change the number of viewer replicas: make scale VIEWERS=8
	$(COMPOSE) up -d --no-recreate --no-build --wait --wait-timeout $(UP_TIMEOUT) --scale viewer=$(VIEWERS) viewer

ctl: stack-env ## a shell in a controller container (rm bound in remote-mvc-ctl shell)
	$(COMPOSE) run --rm controller

logs: stack-env ## follow the stack's JSON logs (SERVICE=viewer for one service)
	$(COMPOSE) logs -f --tail=200 $(SERVICE)

ps: stack-env ## the stack's containers
	$(COMPOSE) --profile '*' ps -a

metrics: stack-env ## viewer count and notification latency percentiles, as Prometheus computes them
	@port="$$($(COMPOSE) port prometheus 9090 2>/dev/null)"; \
	if [ -z "$$port" ]; then echo "Prometheus is not running (make up)"; exit 1; fi; \
	$(STACK_PY) docker/metrics.py "http://$$port"

down: stack-env ## stop and remove the stack (volumes kept)
	$(COMPOSE) --profile '*' down --remove-orphans

down-volumes: stack-env ## stop and remove the stack and its volumes
	$(COMPOSE) --profile '*' down --remove-orphans --volumes

stack-clean: down-volumes ## down-volumes, and remove the images and the wheelhouse
	-docker image rm $(REMOTE_MVC_IMAGE) $(PROMETHEUS_IMAGE) $(ALERTMANAGER_IMAGE) 2>/dev/null
	rm -rf $(WHEELHOUSE)

# Backups: remote-mvc-backup (shared/remote_mvc/backup.py) runs inside the model container and uses
# SQLite's online backup API (the model keeps serving); the result is copied out to BACKUP_DIR.
backup: stack-env ## online backup of the model's state and audit log into backups/<UTC time>/
	@stamp="$$(date -u +%Y%m%dT%H%M%SZ)"; set -e; \
	$(COMPOSE) exec -T model remote-mvc-backup create "/var/backups/remote-mvc/$$stamp"; \
	mkdir -p "$(BACKUP_DIR)"; \
	$(COMPOSE) cp "model:/var/backups/remote-mvc/$$stamp" "$(BACKUP_DIR)/$$stamp"; \
	chmod -R go-rwx "$(BACKUP_DIR)/$$stamp"; \
	echo "backup: $(BACKUP_DIR)/$$stamp   (restore: make restore BACKUP=$(BACKUP_DIR)/$$stamp)"

# Restore: stop the model, write the backup into its volumes from a one-off container of the same
# service (same volumes, same settings, same user: the backup travels as a tar on stdin), start
# everything again; viewers catch up by themselves. Works on a fresh stack too (new volumes).
restore: stack-env ## restore a backup into the model: make restore BACKUP=backups/<time>
	@test -n "$(BACKUP)" -a -f "$(BACKUP)/manifest.json" || { echo "BACKUP=<dir with manifest.json> please"; exit 2; }
	$(COMPOSE) stop model
	tar -C "$(BACKUP)" -cf - . | $(COMPOSE) run --rm --no-deps -T model \
	  sh -c 'set -e; d=$$(mktemp -d); tar -C "$$d" -xf -; remote-mvc-backup restore "$$d"; rm -rf "$$d"'
	$(COMPOSE) up -d --no-build --wait --wait-timeout $(UP_TIMEOUT)
