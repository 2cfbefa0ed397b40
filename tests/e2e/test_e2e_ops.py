"""Operations (issue 14) against a real stack of its own: secrets only as files (not in any
container's environment or image layer), an alert that reaches Alertmanager when the viewers stop,
and `make backup` / `make restore` into a fresh stack that resumes at the same revision."""

from __future__ import annotations

import json
import subprocess
import tarfile
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import pytest
from e2e_stack import REPO, Stack, clean_env, log, sh, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

SECRETS_FILE = "/run/secrets/remote-mvc/credentials.json"


@pytest.fixture(scope="module")
def ops_stack(e2e_images, tmp_path_factory):
    variables = {**e2e_images, "VIEWERS": "2", "PROMETHEUS_PORT": "", "PROMETHEUS_BIND": "127.0.0.1",
                 "MVC_LEASE_SECONDS": "6", "MVC_TICKER_INTERVAL": "0.5"}
    s = Stack(f"mvcops{uuid.uuid4().hex[:8]}", variables, tmp_path_factory.mktemp("env"))
    with s.running():
        yield s


def _secret_values(stack: Stack) -> list[str]:
    model = stack.containers("model")[0]
    table = json.loads(sh(["docker", "exec", model, "cat", SECRETS_FILE]).stdout)
    values = [secret for ident in table["identities"].values() for secret in ident["secrets"]]
    assert len(values) >= 4 and all(len(v) == 64 for v in values)
    return values


def test_no_secret_in_any_container_environment_or_image_layer(ops_stack: Stack) -> None:
    stack = ops_stack
    values = _secret_values(stack)
    model = stack.containers("model")[0]
    mode = sh(["docker", "exec", model, "stat", "-c", "%a %U", SECRETS_FILE]).stdout.split()
    assert mode == ["600", "mvc"], mode
    # the credentials were made by the one-shot init service, which exited cleanly
    init = stack.containers("credentials", include_stopped=True)
    assert len(init) == 1 and stack.inspect(init[0])["State"]["ExitCode"] == 0
    services = ("credentials", "nameserver", "model", "ticker", "viewer", "prometheus", "alertmanager")
    checked = 0
    for service in services:
        for cid in stack.containers(service, include_stopped=True):
            info = stack.inspect(cid)
            env = "\n".join(info["Config"]["Env"] or [])
            leaked = [v[:8] for v in values if v in env]
            assert not leaked, f"{service}: secrets in the environment"
            assert "MVC_CREDENTIALS=" not in env and "MVC_SECRET=" not in env, f"{service}: {env}"
            assert all(v not in json.dumps(info["Config"]) for v in values), f"{service}: secret in its config"
            for m in info["Mounts"]:
                if m["Destination"] == "/run/secrets/remote-mvc" and service != "credentials":
                    assert m["RW"] is False, f"{service} mounts the secrets writable"
            checked += 1
    assert checked >= 8
    # viewers are not given the credentials at all
    for cid in stack.containers("viewer"):
        assert all(m["Destination"] != "/run/secrets/remote-mvc" for m in stack.inspect(cid)["Mounts"])
    # the controller reads them from the file too
    assert stack.ctl_json("whoami")["identity"] == "controller"
    # image layers: every file of every layer of the service image; no credentials file, no secret
    image = stack.variables["REMOTE_MVC_IMAGE"]
    history = sh(["docker", "history", "--no-trunc", "--format", "{{.CreatedBy}}", image]).stdout
    assert all(v not in history for v in values)
    proc = subprocess.Popen(["docker", "save", image], stdout=subprocess.PIPE)
    layers = 0
    with tarfile.open(fileobj=proc.stdout, mode="r|") as outer:
        for member in outer:
            if not member.name.endswith("layer.tar"):
                continue
            layers += 1
            layer = outer.extractfile(member)
            with tarfile.open(fileobj=layer, mode="r|") as inner:
                for entry in inner:
                    name = entry.name
                    assert not name.endswith(("credentials.json", ".env")), f"{name} in a layer of {image}"
                    if entry.isfile() and entry.size < 1 << 20:
                        data = inner.extractfile(entry).read()
                        assert all(v.encode() not in data for v in values), f"a secret in {name}"
    assert proc.wait(60) == 0 and layers > 2


def _alertmanager(stack: Stack) -> str:
    port = stack.compose("port", "alertmanager", "9093").stdout.strip().splitlines()[-1]
    return f"http://{port}"


def _alerts(base: str) -> list[dict[str, Any]]:
    with urllib.request.urlopen(f"{base}/api/v2/alerts", timeout=10) as reply:
        return json.load(reply)


def test_stopping_the_viewers_raises_an_alert_that_reaches_alertmanager(ops_stack: Stack) -> None:
    stack = ops_stack
    base = _alertmanager(stack)
    stack.wait_healthy("viewer", count=2)
    # Prometheus must have seen the replicas before they go (the rule compares with the last 15 min)
    def counted() -> bool:
        result = stack.prom("remote_mvc:viewer_targets_up:count")
        return bool(result) and float(result[0]["value"][1]) == 2

    wait_until(counted, timeout=90, what="Prometheus to count 2 viewer replicas")
    assert not [a for a in _alerts(base) if a["labels"]["alertname"] == "RemoteMvcViewerReplicasMissing"]
    stack.compose("stop", "viewer", timeout=120)
    try:
        def arrived() -> dict[str, Any] | None:
            found = [a for a in _alerts(base) if a["labels"]["alertname"] == "RemoteMvcViewerReplicasMissing"]
            return found[0] if found else None

        alert = wait_until(arrived, timeout=240, what="RemoteMvcViewerReplicasMissing at Alertmanager")
        log(f"alert at Alertmanager: {alert['labels']} {alert['status']}")
        assert alert["status"]["state"] == "active"
        assert alert["labels"]["severity"] == "warning"
        runbook = alert["annotations"]["runbook_url"]
        assert runbook == "docs/operations.md#remotemvcviewerreplicasmissing"
        anchor = runbook.split("#")[1]
        headings = [ln for ln in (REPO / "docs" / "operations.md").read_text().splitlines() if ln.startswith("#")]
        assert any(h.lstrip("# ").strip().lower() == anchor for h in headings), f"no section {anchor} in the runbook"
    finally:
        stack.compose("start", "viewer", timeout=120)
    stack.wait_healthy("viewer", count=2, timeout=180)


def _make(target: str, stack: Stack, **extra: str) -> subprocess.CompletedProcess[str]:
    compose = " ".join(stack.compose_argv)
    args = ["make", "--no-print-directory", "-C", str(REPO), target, f"COMPOSE={compose}",
            *(f"{k}={v}" for k, v in extra.items())]
    return subprocess.run(args, env=clean_env(stack.variables), capture_output=True, text=True, timeout=600)


def test_make_backup_then_make_restore_into_a_fresh_stack_resumes_at_the_same_revision(
        ops_stack: Stack, tmp_path: Path, tmp_path_factory) -> None:
    stack = ops_stack
    marker = f"backup-{uuid.uuid4().hex[:6]}"
    for i in range(5):
        stack.set(name=f"{marker}-{i}", value=i)
    before = stack.snapshot()
    history = stack.ctl_json("history")
    out = _make("backup", stack, BACKUP_DIR=str(tmp_path))
    assert out.returncode == 0, out.stdout + out.stderr
    (backup,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    manifest = json.loads((backup / "manifest.json").read_text())
    assert manifest["revisions"]["remote_mvc.model"] == before["revision"]
    assert manifest["audit_last_accepted_revision"] == before["revision"]
    assert backup.stat().st_mode & 0o077 == 0

    fresh = Stack(f"mvcrestore{uuid.uuid4().hex[:8]}", {**stack.variables, "VIEWERS": "1"},
                  tmp_path_factory.mktemp("env"))
    try:
        out = _make("restore", fresh, BACKUP=str(backup))
        assert out.returncode == 0, out.stdout + out.stderr
        after = fresh.snapshot()
        assert (after["revision"], after["values"]) == (before["revision"], before["values"])
        assert fresh.ctl_json("history") == history
        assert fresh.set(value=99) == before["revision"] + 1  # resumes right after the backup
        audit = sh(["docker", "exec", fresh.containers("model")[0], "cat", "/var/log/remote-mvc/audit.jsonl"]).stdout
        assert sum(marker in line for line in audit.splitlines()) == 5  # the audit log came along
    finally:
        fresh.down()
    assert not any(fresh.leftovers().values())
