# Chaos tests and the soak (tests/chaos), included by the root Makefile:
#
#     -include tests/chaos/chaos.mk
#
#   make chaos                       every fault + a short soak (about 12 minutes on 2 cores);
#                                    builds the :e2e images once; rewrites docs/reliability.md
#   make soak SOAK_SECONDS=3600      the soak alone, as long as you like (default 600 s);
#                                    also SOAK_VIEWERS (20), SOAK_RATE (4/s per controller),
#                                    SOAK_CONTROLLERS (3)
#   E2E_REUSE_IMAGES=1 make chaos    skip the image build when the :e2e images exist
#   make chaos CHAOS_PYTEST_ARGS='-k pause -x'
#
# Needs Docker with Compose v2 (make docker-engine). Uses PY and the venv target of the root Makefile.

SOAK_SECONDS      ?=
SOAK_VIEWERS      ?=
SOAK_RATE         ?=
SOAK_CONTROLLERS  ?=
CHAOS_PYTEST_ARGS ?=

_SOAK_ENV = $(if $(SOAK_VIEWERS),SOAK_VIEWERS=$(SOAK_VIEWERS)) $(if $(SOAK_RATE),SOAK_RATE=$(SOAK_RATE)) \
            $(if $(SOAK_CONTROLLERS),SOAK_CONTROLLERS=$(SOAK_CONTROLLERS))

.PHONY: chaos soak

chaos: venv ## fault injection into the compose stack + a short soak; rewrites docs/reliability.md
	$(if $(SOAK_SECONDS),SOAK_SECONDS=$(SOAK_SECONDS)) $(_SOAK_ENV) \
	  $(PY) -m pytest tests/chaos -m chaos $(CHAOS_PYTEST_ARGS)

soak: venv ## the soak alone, longer: make soak SOAK_SECONDS=3600
	SOAK_SECONDS=$(or $(SOAK_SECONDS),600) $(_SOAK_ENV) \
	  $(PY) -m pytest tests/chaos -m soak $(CHAOS_PYTEST_ARGS)
