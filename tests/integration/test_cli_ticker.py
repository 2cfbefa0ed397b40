"""remote-mvc-ctl against a live stack, the ticker, settings errors, and clean shutdown."""

import json
import os
import subprocess
import sys
import threading

import pytest

from remote_mvc import PermissionDenied, Viewer
from remote_mvc.testing import wait_until


def ctl(stack, *args, identity="controller", stdin=None, **overrides):
    env = stack.env("ctl", identity=identity, **overrides)
    return subprocess.run([sys.executable, "-m", "remote_mvc.cli", *args], env=env, input=stdin,
                          capture_output=True, text=True, timeout=60)


def test_cli_query_set_history_viewers(mvc_stack):
    mvc_stack.model()
    host, (view,) = mvc_stack.viewers(1)
    out = ctl(mvc_stack, "--json", "query")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["values"] == {"name": "xxx", "value": 0}
    out = ctl(mvc_stack, "set", "name=newname", "value=99")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "revision 1"
    assert view.wait_for(1, 5) and view.values == {"name": "newname", "value": 99}
    text = ctl(mvc_stack, "query").stdout
    assert "revision 1" in text and "name = 'newname'" in text and "value = 99" in text
    events = json.loads(ctl(mvc_stack, "--json", "history", "--since", "0").stdout)
    assert [e["revision"] for e in events] == [1] and events[0]["identity"] == "controller"
    assert "controller" in ctl(mvc_stack, "history").stdout
    viewers = json.loads(ctl(mvc_stack, "--json", "viewers").stdout)
    assert [v["viewer_id"] for v in viewers] == ["viewer-0"]
    assert json.loads(ctl(mvc_stack, "--json", "whoami").stdout)["role"] == "controller"


@pytest.mark.parametrize("args, message", [
    (["set", "value=ninety"], "ValidationError: value: cannot parse 'ninety' as int"),
    (["set", "colour=red"], "ValidationError: unknown field 'colour'"),
    (["set", "value=1", "--expect", "7"], "ConflictError: expected revision 7, model is at 0"),
])
def test_cli_errors_are_one_line_and_non_zero(mvc_stack, args, message):
    mvc_stack.model()
    out = ctl(mvc_stack, *args)
    assert out.returncode == 1
    assert out.stderr.strip() == f"error: {message}" or out.stderr.strip().startswith(f"error: {message}")
    assert len(out.stderr.strip().splitlines()) == 1


def test_cli_without_credentials_or_with_wrong_ones(mvc_stack):
    mvc_stack.model()
    out = ctl(mvc_stack, "set", "value=1", identity="", credentials="")
    assert out.returncode == 1 and "PermissionDenied" in out.stderr
    out = ctl(mvc_stack, "query", secret="wrong")
    assert out.returncode == 1 and "AuthenticationError: invalid credentials" in out.stderr
    out = ctl(mvc_stack, "query", model_name="remote_mvc.nothing")
    assert out.returncode == 69 and "ServiceUnavailable" in out.stderr
    assert mvc_stack.client().snapshot()["revision"] == 0


def test_cli_output_flags_anywhere_get_and_ns(mvc_stack):
    mvc_stack.model()
    rm = mvc_stack.client()
    rm.modify({"name": "two words", "value": 7})
    for args in (["query", "--json"], ["--json", "query"], ["query", "-o", "json"], ["-o", "json", "query"]):
        out = ctl(mvc_stack, *args)
        assert out.returncode == 0, (args, out.stderr)
        assert json.loads(out.stdout)["values"] == {"name": "two words", "value": 7}, args
    assert ctl(mvc_stack, "get", "name").stdout == "two words\n"  # raw: no quotes, for scripts
    assert ctl(mvc_stack, "get", "value").stdout == "7\n"
    assert ctl(mvc_stack, "get", "name", "-o", "json").stdout == '"two words"\n'
    out = ctl(mvc_stack, "get", "colour")
    assert out.returncode == 1 and "unknown field 'colour'" in out.stderr
    # --ns names the endpoint on the command line, over whatever the environment says
    ns = f"127.0.0.1:{mvc_stack.settings.ns_port}"
    assert ctl(mvc_stack, "--ns", ns, "get", "value", ns_port=1).stdout == "7\n"
    assert ctl(mvc_stack, "get", "value", "--ns", ns, ns_port=1).stdout == "7\n"
    out = ctl(mvc_stack, "get", "value", ns_port=1)
    assert out.returncode == 69 and "unreachable" in out.stderr


@pytest.mark.parametrize("args", [["nonsense"], ["set"], ["set", "novalue"], ["query", "-o", "yaml"],
                                  ["query", "--ns", "no-port"], ["watch", "--since", "x"]])
def test_cli_usage_errors_exit_2(mvc_stack, args):
    out = ctl(mvc_stack, *args)
    assert out.returncode == 2, (args, out.stderr)
    assert "remote-mvc-ctl" in out.stderr and "error:" in out.stderr


def test_cli_version_help_and_completion(mvc_stack, tmp_path):
    out = ctl(mvc_stack, "version", "-o", "json")
    assert out.returncode == 0 and json.loads(out.stdout)["remote-mvc"] != "unknown"
    for command in ("query", "get", "set", "history", "watch", "viewers", "whoami", "shell", "drop", "health",
                    "version", "completion"):
        text = ctl(mvc_stack, command, "--help").stdout
        assert "examples:" in text and f"remote-mvc-ctl {command}" in text.split("examples:")[1], command
        assert "69  unavailable" in text, command
    bash = ctl(mvc_stack, "completion", "bash").stdout
    script = tmp_path / "ctl.bash"
    script.write_text(bash)
    # the script loads in bash and completes the sub-commands and a sub-command's options
    probe = (f"source {script}; COMP_WORDS=(remote-mvc-ctl wa); COMP_CWORD=1; "
             "_shtab_remote_mvc_ctl; echo ${COMPREPLY[@]}; "
             "COMP_WORDS=(remote-mvc-ctl watch --ch); COMP_CWORD=2; _shtab_remote_mvc_ctl; echo ${COMPREPLY[@]}")
    done = subprocess.run(["bash", "-c", probe], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    first, second = done.stdout.splitlines()[:2]
    assert first.split() == ["watch"] and "--changes-only" in second.split()
    zsh = ctl(mvc_stack, "completion", "zsh").stdout
    assert zsh.startswith("#compdef remote-mvc-ctl") and "--changes-only" in zsh


def test_cli_watch_since_and_changes_only(mvc_stack):
    mvc_stack.model()
    rm = mvc_stack.client()
    for i in range(1, 6):
        rm.modify({"value": i})
    out = subprocess.run([sys.executable, "-m", "remote_mvc.cli", "watch", "--since", "2", "--count", "3",
                          "--changes-only", "-o", "json"], env=mvc_stack.env("ctl", identity=""),
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    got = [json.loads(line) for line in out.stdout.splitlines()]
    assert got == [{"revision": r, "changes": {"value": {"old": r - 1, "new": r}}} for r in (3, 4, 5)]
    text = subprocess.run([sys.executable, "-m", "remote_mvc.cli", "watch", "--since", "4", "--count", "1",
                           "--changes-only"], env=mvc_stack.env("ctl", identity=""),
                          capture_output=True, text=True, timeout=60).stdout
    assert text == "revision 5: value: 4 -> 5\n"


def test_cli_shell_has_line_editing_and_keeps_its_history(mvc_stack, tmp_path):
    """On a terminal the REPL uses readline: a line typed in one session is in the history file and
    comes back with the up arrow in the next."""
    import pty

    mvc_stack.model()
    history = tmp_path / "history"
    env = {**mvc_stack.env("ctl", identity="controller"), "REMOTE_MVC_HISTORY": str(history), "TERM": "dumb"}

    def session(keys: bytes) -> str:
        pid, fd = pty.fork()
        if pid == 0:  # the child: the CLI on the pty
            os.execve(sys.executable, [sys.executable, "-m", "remote_mvc.cli", "shell"], env)
        out = b""
        sent = False
        while True:
            try:
                chunk = os.read(fd, 4096)
            except OSError:
                break
            if not chunk:
                break
            out += chunk
            if not sent and b">>> " in out:
                os.write(fd, keys)
                sent = True
        os.waitpid(pid, 0)
        return out.decode(errors="replace")

    first = session(b"print('AB' + 'CD')\r\x04")
    assert "ABCD" in first
    assert "print('AB' + 'CD')" in history.read_text()
    assert history.stat().st_mode & 0o777 == 0o600
    second = session(b"\x1b[A\r\x04")  # up arrow: the last line again
    assert "ABCD" in second


def test_cli_shell_binds_rm(mvc_stack):
    mvc_stack.model()
    script = "print('Q', rm.query())\nprint('R', rm.modify({'name': 'newname', 'value': 99}))\nprint('Q', rm.query())\n"
    out = ctl(mvc_stack, "shell", stdin=script)
    assert out.returncode == 0, out.stderr
    assert "Q {'name': 'xxx', 'value': 0}" in out.stdout
    assert "R 1" in out.stdout
    assert "Q {'name': 'newname', 'value': 99}" in out.stdout


def test_cli_watch_prints_changes(mvc_stack):
    mvc_stack.model()
    env = mvc_stack.env("ctl", identity="")
    proc = subprocess.Popen([sys.executable, "-m", "remote_mvc.cli", "--json", "watch", "--count", "2"],
                            env=env, stdout=subprocess.PIPE, text=True)
    lines = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    rm = mvc_stack.client()
    wait_until(lambda: len(rm.viewers()) == 1, 15, message="watch to subscribe")
    wait_until(lambda: lines, 10, message="the initial snapshot line")
    rm.modify({"value": 1})
    rm.modify({"value": 2})
    assert proc.wait(15) == 0
    reader.join(5)
    got = [json.loads(line) for line in lines]
    assert [g["revision"] for g in got] == [0, 1, 2]
    assert got[2]["changes"] == {"value": {"old": 1, "new": 2}}
    assert rm.viewers() == []  # watch unsubscribed on its way out


def test_cli_watch_ends_on_sigterm_and_unsubscribes(mvc_stack):
    mvc_stack.model()
    proc = subprocess.Popen([sys.executable, "-m", "remote_mvc.cli", "--json", "watch"],
                            env=mvc_stack.env("ctl", identity=""), stdout=subprocess.PIPE, text=True)
    rm = mvc_stack.client()
    assert json.loads(proc.stdout.readline())["snapshot"] is True  # subscribed and synced
    proc.terminate()
    assert proc.wait(15) == 0
    proc.stdout.close()
    assert rm.viewers() == []  # watch unsubscribed on its way out


def test_cli_health(mvc_stack):
    model = mvc_stack.model(metrics_port=0)
    port = model.metrics_server.port
    out = ctl(mvc_stack, "health", metrics_port=port)
    assert out.returncode == 0 and out.stdout.strip() == "ok"
    model.stop()
    out = ctl(mvc_stack, "health", metrics_port=port)
    assert out.returncode == 69 and out.stderr.startswith("unavailable:")  # nothing answers any more


def test_ticker_ticks_reach_viewers_and_obey_controllers(mvc_stack):
    ticker = mvc_stack.ticker(interval=0.05)
    host, (view,) = mvc_stack.viewers(1, model=mvc_stack.settings.ticker_name)
    assert view.wait_for(5, 10)
    events = mvc_stack.client(model=mvc_stack.settings.ticker_name).history(0)
    ticks = [e["values"]["tick"] for e in events if "tick" in e["changes"]]
    assert ticks == list(range(ticks[0], ticks[0] + len(ticks)))
    tc = mvc_stack.client("controller", model=mvc_stack.settings.ticker_name)
    paused_at = tc.modify({"paused": True})
    frozen = tc.query()["tick"]
    resumed_at = tc.modify({"paused": False, "interval": 0.02})
    assert view.wait_for(resumed_at + 3, 10)
    after = [e for e in tc.history(paused_at) if "tick" in e["changes"]]
    assert after[0]["changes"]["tick"] == {"old": frozen, "new": frozen + 1}  # no ticks while paused
    assert after[0]["revision"] > resumed_at
    assert ticker.server.query()["interval"] == 0.02
    with pytest.raises(PermissionDenied):
        mvc_stack.client(None, model=mvc_stack.settings.ticker_name).modify({"paused": True})


def test_unknown_setting_stops_a_service_with_a_clear_message(mvc_stack):
    env = mvc_stack.env("model")
    env["MVC_LEASE_SECOND"] = "3"
    out = subprocess.run([sys.executable, "-m", "remote_mvc_services.model.main"], env=env,
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 2
    assert "unknown setting MVC_LEASE_SECOND" in out.stderr


def test_services_stop_cleanly_and_leave_no_threads(mvc_stack):
    before = {t.ident for t in threading.enumerate()}
    model = mvc_stack.model()
    host, views = mvc_stack.viewers(5)
    rm = mvc_stack.client()
    rm.modify({"value": 1})
    for v in views:
        assert v.wait_for(1, 5)
    rm.close()
    host.stop()
    assert model.server.subscriber_count == 0
    model.stop()
    wait_until(lambda: not [t for t in threading.enumerate() if t.ident not in before and t.is_alive()
                            and not t.name.startswith("Pyro-Worker")], 10, message="service threads to end")


def test_resume_after_gap_uses_history_or_snapshot(mvc_stack):
    mvc_stack.model(history_limit=5)
    host, (view,) = mvc_stack.viewers(1)
    rm = mvc_stack.client()
    rm.modify({"value": 1})
    assert view.wait_for(1, 5)
    # a lost notification: the viewer sees revision 4 after 1; it fills 2..3 from history
    for i in range(2, 5):
        rm.modify({"value": i})
    assert view.wait_for(4, 5)
    lost = Viewer("lossy", mvc_stack.settings.model_name, record=True, log_values=False)
    lost.fetch = lambda since: rm.history(since)
    lost.fetch_snapshot = rm.snapshot
    lost.accept_capability("cap")  # what a subscribe reply gives; every notification carries it
    lost.notify({"capability": "cap", "snapshot": {"revision": 1, "values": {"name": "xxx", "value": 1}}})
    lost.notify({"capability": "cap", "events": rm.history(3)})  # revision 4 arrives, 2 and 3 were lost
    assert lost.received == [1, 2, 3, 4] and lost.values["value"] == 4
    lost.notify({"capability": "cap", "events": rm.history(2)})  # 3 and 4 again: duplicates are skipped
    assert lost.received == [1, 2, 3, 4]
    for i in range(5, 15):  # history keeps 5: revision 2 is long gone
        rm.modify({"value": i})
    lost.notify({"capability": "cap", "events": rm.history(13)})  # a gap the history can't fill: a snapshot
    assert lost.values["value"] == 14 and lost.revision == 14 and lost.snapshots == 2
    assert lost.received == sorted(set(lost.received))
