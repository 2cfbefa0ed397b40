"""The Swarm stack with two-way TLS (deploy/swarm/stack.tls.yml, `SWARM_TLS=1 make swarm-deploy`):
the certificates are Docker secrets, a change from the controller task reaches every viewer task
over TLS, and a controller without a certificate is refused.

Run with a tag of your own on a shared engine: ``E2E_TAG=swarm pytest tests/e2e/test_e2e_swarm_tls.py``.
"""

from __future__ import annotations

import json

import pytest
from conftest import E2E_TAG
from e2e_stack import sh
from swarm_stack import deployed

pytestmark = pytest.mark.e2e

ETCD_IMAGE = f"remote-mvc/etcd:{E2E_TAG}"


@pytest.fixture(scope="module")
def swarm_tls(e2e_images: dict[str, str], tmp_path_factory: pytest.TempPathFactory):
    with deployed(e2e_images, ETCD_IMAGE, tmp_path_factory.mktemp("swarmtls"),
                  extra={"SWARM_TLS": "1", "MODEL_REPLICAS": "2", "TICKER_REPLICAS": "1"}) as stack:
        yield stack


def test_certificates_are_docker_secrets_and_a_change_reaches_every_viewer_over_tls(swarm_tls):
    ctl = swarm_tls.controller()
    env = sh(["docker", "inspect", "--format", "{{json .Config.Env}}", ctl]).stdout
    assert "MVC_TLS_KEY=/run/secrets/tls/controller.key" in env and "PRIVATE KEY" not in env
    mode = sh(["docker", "exec", ctl, "stat", "-c", "%a %u", "/run/secrets/tls/controller.key"]).stdout.split()
    assert mode == ["400", "10001"]
    swarm_tls.healthy("model", 2)
    rev = swarm_tls.set(name="tls", value=7)
    swarm_tls.wait_viewers_at(rev, 3)
    names = {s: len(swarm_tls.containers(s)) for s in ("nameserver", "ticker", "gateway")}
    assert names == {"nameserver": 1, "ticker": 1, "gateway": 1}


def test_a_controller_without_a_certificate_is_refused(swarm_tls):
    proc = sh(["docker", "exec", "-e", "MVC_TLS_CA=", "-e", "MVC_TLS_CERT=", "-e", "MVC_TLS_KEY=",
               swarm_tls.controller(), "remote-mvc-ctl", "--json", "set", "value=8"], check=False, timeout=120)
    assert proc.returncode == 69, (proc.stdout, proc.stderr)  # plaintext: refused at connect (unavailable)
    out = swarm_tls.exec("remote-mvc-ctl", "--json", "query").stdout
    snapshot = json.loads([ln for ln in out.splitlines() if ln.startswith("{")][-1])
    assert snapshot["values"]["value"] == 7  # the refused change is not there
