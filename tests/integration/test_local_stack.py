"""`make run`'s stack: supervisord starts everything; Ctrl-C stops it, viewers unsubscribing first."""

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path

from remote_mvc import generate_credentials
from remote_mvc.testing import wait_until

REPO = Path(__file__).resolve().parents[2]


def test_local_stack_under_supervisord(tmp_path):
    venv = Path(sys.executable).parent.parent
    (tmp_path / "services").mkdir()
    shutil.copy(REPO / "services" / "supervisord.conf", tmp_path / "services")
    (tmp_path / ".venv").symlink_to(venv)
    generate_credentials(tmp_path / "runtime" / "credentials.json")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MVC_")}
    sup = subprocess.Popen([str(venv / "bin" / "supervisord"), "-c", str(tmp_path / "services" / "supervisord.conf")],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(sup.stdout), daemon=True)
    reader.start()
    ctl_env = {**env, "MVC_STATE_DIR": str(tmp_path / "runtime")}

    def ctl(*args):
        return subprocess.run([str(venv / "bin" / "remote-mvc-ctl"), *args], env=ctl_env, capture_output=True,
                              text=True, timeout=30)

    def records():
        out = []
        for line in list(lines):
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
        return out

    try:
        wait_until(lambda: sum(r.get("event") == "subscribed" for r in records()) >= 3, 30,
                   message="3 viewers to subscribe")
        out = ctl("--json", "query")
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout)["values"] == {"name": "xxx", "value": 0}
        out = ctl("set", "name=newname", "value=99")
        assert out.stdout.strip() == "revision 1", out.stderr
        wait_until(lambda: {r["viewer_id"] for r in records() if r.get("event") == "values"
                            and r.get("revision") == 1} == {"viewer-0", "viewer-1", "viewer-2"}, 15,
                   message="every viewer to log the new values")
        assert json.loads(ctl("--json", "--model", "ticker", "query").stdout)["values"]["tick"] >= 0
        # the web gateway: the live page, and the same values through --gateway
        wait_until(lambda: any(r.get("event") == "gateway_started" for r in records()), 30,
                   message="the gateway to start")
        with urllib.request.urlopen("http://127.0.0.1:8080/", timeout=10) as reply:
            assert b"/app.js" in reply.read()
        out = ctl("--json", "--gateway", "http://127.0.0.1:8080", "query")
        assert out.returncode == 0 and json.loads(out.stdout)["values"] == {"name": "newname", "value": 99}, out
        assert all({"timestamp", "level", "service", "logger", "event"} <= r.keys()
                   for r in records() if r.get("logger", "").startswith("remote_mvc"))
    finally:
        sup.send_signal(signal.SIGINT)  # Ctrl-C
        sup.wait(60)
        reader.join(5)
    events = [(r.get("service"), r.get("event")) for r in records()]
    unsubscribed = [i for i, e in enumerate(events) if e == ("model", "viewer_unsubscribed")]
    model_stop = events.index(("model", "service_stopped"))
    assert len(unsubscribed) == 4 and max(unsubscribed) < model_stop  # the 3 viewers and the gateway
    assert sum(e == ("viewer", "service_stopped") for e in events) == 3
    assert sup.returncode == 0
