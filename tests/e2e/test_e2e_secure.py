"""The stack under two-way TLS (`make up-secure`): a controller with a valid identity can modify,
one without cannot, and a plaintext client is refused."""

from __future__ import annotations

import subprocess
import uuid

import pytest
from e2e_stack import REPO, Stack

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def secure_stack(e2e_images: dict[str, str], tmp_path_factory: pytest.TempPathFactory):
    certs = tmp_path_factory.mktemp("certs")
    subprocess.run(["bash", str(REPO / "ops" / "tls" / "make-certs.sh"), str(certs)], check=True,
                   capture_output=True)
    certs.chmod(0o755)
    variables = {**e2e_images, "VIEWERS": "2", "PROMETHEUS_PORT": "", "PROMETHEUS_BIND": "127.0.0.1",
                 "MVC_LEASE_SECONDS": "6", "TLS_CERTS_DIR": str(certs)}
    s = Stack(f"mvce2etls{uuid.uuid4().hex[:8]}", variables, tmp_path_factory.mktemp("env"),
              overrides=[REPO / "docker-compose.tls.yml"])
    with s.running():
        yield s


def test_controller_with_a_valid_identity_modifies_over_tls(secure_stack):
    viewers = secure_stack.wait_healthy("viewer", count=2)
    revision = secure_stack.set(name="tls", value=42)
    secure_stack.wait_viewers_at(revision, {"name": "tls", "value": 42}, viewers, timeout=30)
    model = secure_stack.containers("model")[0]
    modified = secure_stack.events(model, "modified", revision=revision)
    assert modified and modified[0]["identity"] == "controller"
    me = secure_stack.ctl_json("whoami", env={"MVC_CREDENTIALS_FILE": "", "MVC_IDENTITY": ""})
    assert me["identity"] == "controller"  # the controller certificate alone proves the identity


@pytest.mark.parametrize("env, exit_code", [
    # a certificate from our CA that names no identity, and no secret: read-only
    ({"MVC_CREDENTIALS_FILE": "", "MVC_IDENTITY": "", "MVC_TLS_CERT": "/certs/viewer.crt",
      "MVC_TLS_KEY": "/certs/viewer.key"}, 1),
    # plaintext: refused at connect
    ({"MVC_TLS_CA": "", "MVC_TLS_CERT": "", "MVC_TLS_KEY": ""}, 69),
])
def test_controller_without_a_valid_identity_cannot(secure_stack, env, exit_code):
    before = secure_stack.snapshot()
    proc = secure_stack.ctl("set", "name=intruder", env=env, check=False)
    assert proc.returncode == exit_code, (proc.stdout, proc.stderr)
    after = secure_stack.snapshot()
    assert (after["revision"], after["values"]) == (before["revision"], before["values"])
