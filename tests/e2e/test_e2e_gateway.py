"""The web gateway in the container stack: the page and the event stream through the published port
(bound to 127.0.0.1), a modify through it audited with both names, ctl --gateway from the host.

The gateway is a compose profile; this module starts it in the shared stack and removes it again,
so the other tests' subscriber counts stay as they were.
"""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request

import pytest
from e2e_stack import MODEL, parse_json_lines, sh, wait_until

pytestmark = pytest.mark.e2e

from remote_mvc.gateway_client import GatewayClient  # noqa: E402


@pytest.fixture(scope="module")
def gateway(stack):
    stack.compose("--profile", "gateway", "up", "-d", "--wait", "--wait-timeout", "170", "--no-build", "gateway",
                  timeout=180)
    port = stack.compose("--profile", "gateway", "port", "gateway", "8080").stdout.strip().splitlines()[-1]
    host, _, number = port.rpartition(":")
    assert host == "127.0.0.1", f"the gateway's port must be bound to 127.0.0.1, not {host}"
    try:
        yield f"http://127.0.0.1:{number}"
    finally:
        stack.compose("--profile", "gateway", "rm", "--stop", "--force", "gateway", check=False)


def secret_of(stack, identity: str) -> str:
    return stack.secret(identity)


def test_page_and_models_through_the_published_port(gateway):
    with urllib.request.urlopen(f"{gateway}/", timeout=10) as reply:
        assert reply.status == 200 and b'<script src="/app.js">' in reply.read()
    api = GatewayClient(gateway, timeout=10)
    assert [m["model"] for m in api.models()] == [MODEL, "remote_mvc.ticker"]
    wait_until(lambda: api.snapshot(MODEL)["synced"], timeout=60, what="the gateway to mirror the model")


def test_stream_and_modify_through_the_gateway(stack, gateway):
    api = GatewayClient(gateway, timeout=10)
    with api.events(MODEL) as stream:
        kind, first = stream.next(timeout=30)
        assert kind == "snapshot"
        revision = stack.set(name="via-container-ctl", value=11)
        while True:
            kind, data = stream.next(timeout=30)
            if data["revision"] >= revision:
                break
        assert (kind, data["revision"], data["values"]) == ("change", revision, {"name": "via-container-ctl",
                                                                                   "value": 11})
        ctl = GatewayClient(gateway, "controller", secret_of(stack, "controller"), timeout=10)
        mine = ctl.modify(MODEL, {"name": "via-http", "value": 12})
        kind, data = stream.next(timeout=30)
        assert (kind, data["revision"], data["identity"], data["via"]) == ("change", mine, "controller", "gateway")
    assert stack.snapshot()["values"] == {"name": "via-http", "value": 12}
    model = stack.containers("model")[0]
    audit = parse_json_lines(sh(["docker", "exec", model, "cat", "/var/log/remote-mvc/audit.jsonl"]).stdout)
    record = [r for r in audit if r.get("revision") == mine and r["action"] == "modify"][-1]
    assert (record["identity"], record["via"], record["result"]) == ("controller", "gateway", "accepted")


def test_ctl_on_the_host_through_the_gateway(stack, gateway):
    env = {"PATH": "/usr/bin:/bin", "MVC_IDENTITY": "controller", "MVC_SECRET": secret_of(stack, "controller")}
    out = subprocess.run([sys.executable, "-m", "remote_mvc.cli", "--json", "--gateway", gateway, "query"],
                         env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["revision"] == stack.snapshot()["revision"]
    out = subprocess.run([sys.executable, "-m", "remote_mvc.cli", "--gateway", gateway, "set", "value=13"],
                         env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.startswith("revision "), out.stderr
    assert stack.snapshot()["values"]["value"] == 13
    # Prometheus scrapes the gateway (found by DNS, like the viewers)
    wait_until(lambda: stack.prom_value('up{job="gateway"}') == 1, timeout=60, what="Prometheus to scrape the gateway")
