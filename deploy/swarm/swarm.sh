#!/bin/bash
# remote-mvc on Docker Swarm: deploy / rm / ctl (make swarm-deploy, swarm-rm, swarm-ctl).
#   swarm.sh deploy   initialise a single-node swarm when the engine is in none (and say so, and
#                     remember it in $STATE_DIR/swarm-created), generate the credentials once
#                     ($STATE_DIR/credentials.json, 0600), `docker stack deploy`, wait until every
#                     service runs all its replicas
#   swarm.sh rm       `docker stack rm`, wait until its tasks, networks, secrets and configs are
#                     gone; volumes too with SWARM_VOLUMES=1; leave the swarm only if deploy created
#                     it and no other stack runs
#   swarm.sh ctl [cmd...]   docker exec into the controller task (bash by default)
# Environment: SWARM_TLS=1 (two-way TLS, stack.tls.yml; certificates generated once into
# $STATE_DIR/certs), STACK (remote-mvc), STATE_DIR (runtime/swarm), REMOTE_MVC_IMAGE, ETCD_IMAGE,
# PROMETHEUS_IMAGE, ALERTMANAGER_IMAGE, VIEWERS, MODEL_REPLICAS, TICKER_REPLICAS, DEPLOY_TIMEOUT (300).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
STACK="${STACK:-remote-mvc}"
STATE_DIR="${STATE_DIR:-runtime/swarm}"
PY="${PY:-python3}"

swarm_state() { docker info --format '{{.Swarm.LocalNodeState}}'; }

controller() {
  docker ps -q --filter "label=com.docker.swarm.service.name=${STACK}_controller" --filter status=running | head -n1
}

deploy() {
  mkdir -p -m 700 "$STATE_DIR"
  if [ "$(swarm_state)" != active ]; then
    # loopback only: a single-node swarm that listens nowhere else
    docker swarm init --advertise-addr 127.0.0.1 --listen-addr 127.0.0.1:2377 \
      --default-addr-pool 10.198.0.0/16 --default-addr-pool-mask-length 24 >/dev/null
    touch "$STATE_DIR/swarm-created"
    echo "initialised a single-node swarm on this engine (swarm.sh rm / make swarm-rm leaves it again)"
  fi
  creds="$(cd "$STATE_DIR" && pwd)/credentials.json"
  if [ ! -s "$creds" ]; then
    "$PY" -c "import sys; from remote_mvc import generate_credentials; generate_credentials(sys.argv[1])" "$creds"
    echo "generated $creds (identities controller, admin, service, viewer, gateway)"
  fi
  files=(-c "$here/stack.yml")
  if [ "${SWARM_TLS:-0}" = 1 ]; then
    bash "$here/../../ops/tls/make-certs.sh" "$STATE_DIR/certs" >/dev/null
    export TLS_CERTS_DIR; TLS_CERTS_DIR="$(cd "$STATE_DIR/certs" && pwd)"
    files+=(-c "$here/stack.tls.yml")
    echo "two-way TLS: certificates from $TLS_CERTS_DIR as Docker secrets"
  fi
  MVC_CREDENTIALS_SOURCE="$creds" docker stack deploy --resolve-image never --prune "${files[@]}" "$STACK"
  local deadline=$((SECONDS + ${DEPLOY_TIMEOUT:-300}))
  while :; do
    pending="$(docker stack services "$STACK" --format '{{.Name}} {{.Replicas}}' \
      | awk '{split($2, r, "/"); if (r[1] != r[2]) print $1 " " $2}')"
    [ -z "$pending" ] && break
    if [ $SECONDS -ge $deadline ]; then echo "not running after ${DEPLOY_TIMEOUT:-300}s: $pending" >&2; exit 1; fi
    sleep 2
  done
  docker stack services "$STACK"
  echo "remote-mvc stack '$STACK' is up. Controller: make swarm-ctl   or"
  echo "  docker exec \$(docker ps -q -f label=com.docker.swarm.service.name=${STACK}_controller) remote-mvc-ctl set value=1"
}

leftovers() {
  local label="com.docker.stack.namespace=$STACK"
  { docker service ls -q --filter "label=$label"; docker network ls -q --filter "label=$label"
    docker secret ls -q --filter "label=$label"; docker config ls -q --filter "label=$label"
    docker ps -aq --filter "label=$label"; } 2>/dev/null
}

rm_stack() {
  if [ "$(swarm_state)" = active ]; then
    docker stack rm "$STACK" >/dev/null 2>&1 || true
    local deadline=$((SECONDS + 120))
    while [ -n "$(leftovers)" ]; do
      if [ $SECONDS -ge $deadline ]; then echo "stack $STACK not gone after 120s" >&2; exit 1; fi
      sleep 1
    done
    echo "stack $STACK removed (services, networks, secrets, configs)"
  fi
  if [ "${SWARM_VOLUMES:-0}" = 1 ]; then
    vols="$(docker volume ls -q --filter "label=com.docker.stack.namespace=$STACK")"
    # a volume can stay busy for a moment after its last container went
    for _ in 1 2 3 4 5 6 7 8 9 10; do
      [ -z "$vols" ] && break
      docker volume rm $vols >/dev/null 2>&1 || true
      vols="$(docker volume ls -q --filter "label=com.docker.stack.namespace=$STACK")"
      [ -n "$vols" ] && sleep 1
    done
    [ -z "$vols" ] || { echo "volumes still present: $vols" >&2; exit 1; }
    echo "volumes of $STACK removed"
  fi
  if [ -f "$STATE_DIR/swarm-created" ] && [ "$(swarm_state)" = active ]; then
    if [ -n "$(docker stack ls --format '{{.Name}}')" ]; then
      echo "other stacks still run: this engine stays in swarm mode" >&2
    else
      docker swarm leave --force >/dev/null
      rm -f "$STATE_DIR/swarm-created"
      echo "left the single-node swarm that swarm-deploy created"
    fi
  fi
}

case "${1:-}" in
  deploy) deploy ;;
  rm) rm_stack ;;
  ctl)
    shift
    c="$(controller)"; [ -n "$c" ] || { echo "no running controller task in stack $STACK" >&2; exit 69; }
    if [ $# -eq 0 ]; then exec docker exec -it "$c" bash; else exec docker exec -i "$c" "$@"; fi ;;
  *) echo "usage: $0 deploy|rm|ctl [command...]" >&2; exit 64 ;;
esac
