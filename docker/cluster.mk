# Cluster mode stack (docker-compose.cluster.yml on top of docker-compose.yml), included by the root
# Makefile. `make cluster-up` writes COMPOSE_FILE into .env, so plain `docker compose ps/logs/run`
# address the cluster stack afterwards; `make cluster-down` removes it, `make up` returns to the
# single-server stack.

ETCD_IMAGE ?= remote-mvc/etcd:latest
export ETCD_IMAGE

.PHONY: cluster-up cluster-down

cluster-up: stack-env wheels ## the cluster stack: 3 etcd members, 3 model replicas, 2 tickers (docs/cluster.md)
	@sed -i '/^COMPOSE_FILE=/d' .env; echo "COMPOSE_FILE=docker-compose.yml:docker-compose.cluster.yml" >> .env
	@echo "cluster mode: COMPOSE_FILE in .env selects docker-compose.cluster.yml (make up or make cluster-down turn it off)"
	$(MAKE) --no-print-directory images up-services

cluster-down: stack-env ## stop and remove the cluster stack (volumes kept); back to the single-server files
	COMPOSE_FILE=docker-compose.yml:docker-compose.cluster.yml $(COMPOSE) --profile '*' down --remove-orphans
	@sed -i '/^COMPOSE_FILE=/d' .env

.PHONY: test-cluster
test-cluster: venv ## cluster mode on real etcd members on loopback (tests/cluster; part of make test)
	$(PY) -m pytest tests/cluster
