# Fan-out benchmark (issue 6). Included by the root Makefile, which defines VENV, PY and venv.
#   make bench-quick                  CI smoke: N = 1, 10, every system, ~1.5 min; fails on any lost,
#                                     duplicated or reordered delivery
#   make bench                        full run: N = 1 ... 1000, paced + unpaced + slow viewer, < 15 min
#   make bench BENCH_ARGS=--ref=REF   also the library as committed at REF (system remote-mvc-ref), same run
#   make bench-10k                    the N = 10,000 target: 10 viewer processes paced at 10/s
#   make bench-profile                py-spy profiles of the model server at N = 200
#   make bench-commit                 concurrent controllers (group commit): changes/s with 1, 4, 16
#   make bench-commit-path            the commit path in one process, stage by stage (µs per change; --ref)
#   make bench-gateway                SSE clients of the web gateway beside direct viewers, N = 1, 100, 1000
# Results: bench-results/latest.{json,md}, bench-results/fanout_p99.png (see docs/performance.md).

BENCH_ARGS ?=
# hiredis: redis-py's C reply parser, picked by redis-py whenever installed: the Redis baseline a user
# who cares about latency runs (bench/viewer_proc.py requires it)
BENCH_PY_DEPS := redis 'hiredis>=3,<4' psutil numpy matplotlib py-spy
APT_GET := env DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 -o Acquire::Retries=5 -q -y

.PHONY: bench bench-quick bench-profile bench-deps bench-commit bench-gateway

bench-deps: venv
	@command -v redis-server >/dev/null 2>&1 || { \
	  echo "bench: installing Debian's redis-server"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO $(APT_GET) update >/dev/null && $$SUDO $(APT_GET) install --no-install-recommends redis-server >/dev/null; }
	@$(PY) -c "import remote_mvc, redis, hiredis, psutil, numpy, matplotlib" 2>/dev/null && [ -x $(VENV)/bin/py-spy ] || \
	  $(VENV)/bin/pip install -q $(BENCH_PY_DEPS)

bench: bench-deps ## full fan-out benchmark vs naive Pyro5 and Redis (< 15 min; bench-results/)
	$(PY) -m bench $(BENCH_ARGS)

bench-quick: bench-deps ## benchmark smoke run (~1.5 min); fails on lost/duplicated/reordered deliveries
	$(PY) -m bench --quick $(BENCH_ARGS)

bench-profile: bench-deps ## py-spy profiles of the model server at N=200, paced and unpaced
	$(PY) -m bench --systems remote-mvc --n 200 --no-slow --profile bench-results/profiles --name profile-run \
	  $(BENCH_ARGS)

bench-commit: bench-deps ## concurrent controllers: durable changes/s, server CPU per change (~1 min; BENCH_ARGS="--ref REF --profile DIR --rate R")
	$(PY) -m bench.commit $(BENCH_ARGS)

.PHONY: bench-commit-path
bench-commit-path: bench-deps ## the commit path in one process, stage by stage, µs per change (~1 min; BENCH_ARGS="--ref REF")
	$(PY) -m bench.commit_path $(BENCH_ARGS)

.PHONY: bench-10k
bench-10k: bench-deps ## the N = 10,000 target: 10 viewer processes, paced 10 changes/s (~2 min; bench-results/big.md; Redis too: BENCH_ARGS="--systems remote-mvc,redis", 10,000 threads)
	$(PY) -m bench --big --systems remote-mvc $(BENCH_ARGS)

.PHONY: bench-cluster
bench-cluster: bench-deps ## cluster mode vs SQLite: changes/s, modify p50/p99, fan-out p99 with 1 and 3 replicas (bench-results/cluster.md)
	$(PY) -m bench.cluster $(BENCH_ARGS)

.PHONY: bench-gateway
bench-gateway: bench-deps ## web gateway: N = 1, 100, 1000 SSE clients beside direct viewers (~10 min; bench-results/gateway.md)
	$(PY) -m bench.gateway $(BENCH_ARGS)
