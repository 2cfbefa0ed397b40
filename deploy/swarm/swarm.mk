# Docker Swarm targets (deploy/swarm/stack.yml, docs/deployment.md), included by the root Makefile.
#   make swarm-deploy   build the images locally, init a single-node swarm if needed (says so), deploy
#   SWARM_TLS=1 make swarm-deploy   the same with two-way TLS (deploy/swarm/stack.tls.yml)
#   make swarm-ctl      a shell in the controller task (remote-mvc-ctl set value=1 ...)
#   make swarm-rm       remove the stack; SWARM_VOLUMES=1 also its volumes; leaves the swarm if
#                       swarm-deploy created it
SWARM_STACK ?= remote-mvc
SWARM_STATE ?= $(RUNTIME)/swarm

.PHONY: swarm-images swarm-deploy swarm-rm swarm-ctl

swarm-images: images ## the service images plus the etcd image, built locally (no registry)
	@base="$$(docker/base-image.sh)" && BASE_IMAGE="$$base" \
	  COMPOSE_FILE=docker-compose.yml:docker-compose.cluster.yml $(COMPOSE) build etcd-1

swarm-deploy: venv swarm-images ## deploy the stack on Docker Swarm (inits a single-node swarm when needed)
	STACK=$(SWARM_STACK) STATE_DIR=$(SWARM_STATE) PY=$(PY) deploy/swarm/swarm.sh deploy

swarm-rm: ## remove the Swarm stack (SWARM_VOLUMES=1: and its volumes); leave the swarm if deploy made it
	STACK=$(SWARM_STACK) STATE_DIR=$(SWARM_STATE) deploy/swarm/swarm.sh rm

swarm-ctl: ## a shell in the Swarm stack's controller task
	@STACK=$(SWARM_STACK) deploy/swarm/swarm.sh ctl
