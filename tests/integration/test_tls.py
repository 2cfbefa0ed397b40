"""Two-way TLS: only peers with a certificate from the private CA get in; a certificate is an identity."""

import json
import socket
import ssl
import subprocess
import sys
from pathlib import Path

import pytest

from remote_mvc import AuthProxy, Settings, setup
from remote_mvc.testing import Stack

REPO = Path(__file__).resolve().parents[2]


def make_certs(directory: Path) -> Path:
    subprocess.run(["bash", str(REPO / "ops" / "tls" / "make-certs.sh"), str(directory)], check=True,
                   capture_output=True)
    return directory


def tls_settings(certs: Path, name: str) -> dict:
    return {"tls_ca": str(certs / "ca.crt"), "tls_cert": str(certs / f"{name}.crt"),
            "tls_key": str(certs / f"{name}.key")}


@pytest.fixture
def tls_stack(tmp_path):
    certs = make_certs(tmp_path / "certs")
    stack = Stack(tmp_path / "state", **tls_settings(certs, "model")).start()
    try:
        yield stack, certs
    finally:
        stack.close()
        setup(Settings())  # this test process goes back to plaintext


def ctl(stack, *args, **overrides):
    env = stack.env("ctl", **overrides)
    return subprocess.run([sys.executable, "-m", "remote_mvc.cli", *args], env=env, capture_output=True,
                          text=True, timeout=60)


def test_everything_works_over_tls(tls_stack):
    stack, certs = tls_stack
    stack.model()
    host, (view,) = stack.viewers(1)
    rev = stack.client("controller").modify({"name": "tls", "value": 1})
    assert view.wait_for(rev, 10) and view.values == {"name": "tls", "value": 1}
    anonymous = stack.client(None)
    assert anonymous.whoami()["role"] == "viewer"  # the "model" certificate names no identity
    proxy = AuthProxy(stack.model_uri())  # what a ModelClient opens, as anonymous
    try:
        assert proxy.socket is None and proxy.whoami()["role"] == "viewer"
        assert isinstance(proxy.socket, ssl.SSLSocket)
    finally:
        proxy._pyroRelease()


def test_a_certificate_naming_an_identity_proves_it(tls_stack):
    stack, certs = tls_stack
    stack.model()
    out = ctl(stack, "--json", "whoami", identity="", credentials="", **tls_settings(certs, "controller"))
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["identity"] == "controller"
    out = ctl(stack, "set", "value=5", identity="", credentials="", **tls_settings(certs, "controller"))
    assert out.returncode == 0 and out.stdout.strip() == "revision 1", out.stderr
    # a token for another identity than the certificate's is refused
    out = ctl(stack, "query", identity="controller", **tls_settings(certs, "admin"))
    assert out.returncode == 1 and "certificate is for 'admin'" in out.stderr


@pytest.mark.parametrize("client", ["plaintext", "other-ca"])
def test_plaintext_and_foreign_certificates_are_refused(tls_stack, tmp_path, client):
    stack, certs = tls_stack
    stack.model()
    if client == "plaintext":
        overrides = {"tls_ca": "", "tls_cert": "", "tls_key": ""}
    else:
        overrides = tls_settings(make_certs(tmp_path / "rogue"), "controller")
    out = ctl(stack, "set", "value=666", **overrides)
    assert out.returncode == 69, (out.stdout, out.stderr)  # unavailable (EX_UNAVAILABLE)
    assert stack.client().snapshot()["revision"] == 0


def test_tls_client_without_a_certificate_is_refused(tls_stack):
    stack, certs = tls_stack
    service = stack.model()
    host, port = service.daemon.locationStr.rsplit(":", 1)
    context = ssl.create_default_context(cafile=str(certs / "ca.crt"))  # trusts our CA, presents no certificate
    context.check_hostname = False
    with socket.create_connection((host, int(port)), timeout=10) as raw:
        with pytest.raises((ssl.SSLError, ConnectionResetError, BrokenPipeError)):
            with context.wrap_socket(raw) as tls:
                tls.sendall(b"PYRO")
                tls.recv(100)  # TLS 1.3 reports the missing certificate on the first read
                raise AssertionError("a client without a certificate got through")
    assert stack.client().snapshot()["revision"] == 0
