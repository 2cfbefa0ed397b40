"""``remote-mvc-ctl``: query, change, watch and inspect a model from the shell.

Exit codes (documented in ``remote-mvc-ctl --help`` and docs/operations.md)::

    0   ok
    1   refused or failed (validation, conflict, permission, persistence, unhealthy, no such viewer)
    2   usage (bad arguments, malformed FIELD=VALUE)
    69  unavailable (name server or model unreachable; EX_UNAVAILABLE of sysexits.h)

Output format flags (``-o json|table``, ``--json``) and the connection flags (``--ns``,
``--model``, ``--identity``) are accepted before or after the sub-command.

Each command has one implementation, written against :class:`CtlClient` (what the commands
need, nothing more); :func:`open_client` picks the transport: Pyro5 (:class:`PyroClient`), or
the web gateway's HTTP API with ``--gateway URL`` (:class:`GatewayCtlClient`).
"""

from __future__ import annotations

import argparse
import code
import json
import os
import signal
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Callable
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, Protocol

from Pyro5.errors import CommunicationError, PyroError

from .auth import client_credentials
from .client import ModelClient
from .config import Settings
from .errors import ConfigError, MVCError, ServiceUnavailable, UsageError, ValidationError
from .gateway_client import GatewayClient
from .logs import configure_logging
from .metrics import Metrics
from .model import Field
from .pyro.setup import setup
from .viewer import Viewer, ViewerHost

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_UNAVAILABLE = 0, 1, 2, 69

EXIT_CODES = """exit codes:
  0   ok
  1   refused or failed (validation, conflict, permission, persistence, unhealthy)
  2   usage (bad arguments, malformed FIELD=VALUE)
  69  unavailable (name server or model server unreachable)"""


STREAM_SILENCE = 60.0  # seconds without an event or a gateway heartbeat (every 15 s): the stream is lost

Deliver = Callable[[int, dict[str, Any], "dict[str, Any] | None"], None]
"""What ``watch`` calls for each delivery: ``(revision, values, changes)``; ``changes`` is None
for a snapshot (the first delivery, or a resync)."""


class CtlClient(Protocol):
    """What the commands need from a model, whatever carries the calls (the one seam)."""

    def snapshot(self) -> dict[str, Any]:
        """The model's values and revision."""

    def schema(self) -> dict[str, dict[str, Any]]:
        """The model's fields: type, default, doc."""

    def modify(self, changes: dict[str, Any], expected_revision: int | None = None) -> int:
        """Change the model; returns the new revision."""

    def history(self, since: int, limit: int) -> list[dict[str, Any]]:
        """Up to ``limit`` change events after revision ``since``."""

    def viewers(self) -> list[dict[str, Any]]:
        """The model's subscribed viewers."""

    def whoami(self) -> dict[str, Any]:
        """The identity and role the model server sees."""

    def drop_viewer(self, viewer_id: str) -> bool:
        """End a viewer's subscription (admin); True when it existed."""

    def watch(self, since: int | None, deliver: Deliver, stop: threading.Event) -> None:
        """Call ``deliver`` for each change (after revision ``since``; None: a snapshot first)
        until ``stop`` is set; a lost connection is resumed, never reported as the end."""

    def shell_object(self) -> Any:
        """The object the ``shell`` command binds as ``rm``."""

    def close(self) -> None:
        """Release the connection."""


class PyroClient:
    """:class:`CtlClient` over Pyro5: the reconnecting :class:`ModelClient`; ``watch`` runs a
    :class:`ViewerHost` (the model server calls back into this process)."""

    def __init__(self, name: str, settings: Settings) -> None:
        self.rm = ModelClient(name, settings, default_identity="controller", retry_seconds=3.0)

    def snapshot(self) -> dict[str, Any]:
        """The model's values and revision."""
        return self.rm.snapshot()

    def schema(self) -> dict[str, dict[str, Any]]:
        """The model's fields: type, default, doc."""
        return self.rm.schema()

    def modify(self, changes: dict[str, Any], expected_revision: int | None = None) -> int:
        """Change the model; returns the new revision."""
        return self.rm.modify(changes, expected_revision)

    def history(self, since: int, limit: int) -> list[dict[str, Any]]:
        """Up to ``limit`` change events after revision ``since``."""
        return self.rm.history(since, limit)

    def viewers(self) -> list[dict[str, Any]]:
        """The model's subscribed viewers."""
        return self.rm.viewers()

    def whoami(self) -> dict[str, Any]:
        """The identity and role the model server sees."""
        return self.rm.whoami()

    def drop_viewer(self, viewer_id: str) -> bool:
        """End a viewer's subscription (admin); True when it existed."""
        return self.rm.drop_viewer(viewer_id)

    def watch(self, since: int | None, deliver: Deliver, stop: threading.Event) -> None:
        """A viewer of the model in a viewer host of this process, until ``stop`` is set."""
        settings = self.rm.settings
        viewer_settings = settings.replace(metrics_port=-1, identity="", secret="",
                                           viewer_id=f"ctl-watch-{settings.default_viewer_id()}")
        host = ViewerHost(viewer_settings, Metrics(runtime_collectors=False))

        def on_change(viewer: Viewer, event: dict[str, Any] | None) -> None:
            deliver(viewer.revision, viewer.values, None if event is None else event["changes"])

        viewer = Viewer(viewer_settings.viewer_id, self.rm.name, on_change=on_change, log_values=False)
        if since is not None:
            viewer.revision, viewer.synced = since, True  # the server replays what came after it
        host.add(viewer)
        host.start()
        try:
            stop.wait()
        finally:
            host.stop()

    def shell_object(self) -> Any:
        """The :class:`ModelClient` itself: every remote method, ``rm.query()`` and the rest."""
        return self.rm

    def close(self) -> None:
        """Release the connection."""
        self.rm.close()


class GatewayCtlClient:
    """:class:`CtlClient` over a web gateway's HTTP API (:class:`GatewayClient`): no Pyro5
    connection and no callback into this process, so a shell outside the model servers' network
    (the host of a Compose stack, behind NAT) can query, watch and change models. The gateway
    offers no ``drop`` and no Python shell; both are refused (exit 1)."""

    HISTORY_LIMIT = 1000  # the most events the gateway's /history answers with

    def __init__(self, url: str, name: str, settings: Settings) -> None:
        identity, secret = client_credentials(settings, "controller")
        self.api = GatewayClient(url, identity, secret, timeout=settings.call_timeout + 5)
        self.name = name

    def snapshot(self) -> dict[str, Any]:
        """The model's values, revision and epoch."""
        snap = self.api.snapshot(self.name)
        snap.pop("schema", None)
        return snap

    def schema(self) -> dict[str, dict[str, Any]]:
        """The model's fields: type, default, doc."""
        return self.api.snapshot(self.name)["schema"]

    def modify(self, changes: dict[str, Any], expected_revision: int | None = None) -> int:
        """Change the model; returns the new revision."""
        return self.api.modify(self.name, changes, expected_revision)

    def history(self, since: int, limit: int) -> list[dict[str, Any]]:
        """Up to ``limit`` (at most :attr:`HISTORY_LIMIT`) change events after revision ``since``."""
        return self.api.history(self.name, since, min(limit, self.HISTORY_LIMIT))

    def viewers(self) -> list[dict[str, Any]]:
        """The model's subscribed viewers."""
        return self.api.viewers(self.name)

    def whoami(self) -> dict[str, Any]:
        """The identity and role the gateway sees."""
        return self.api.whoami()

    def drop_viewer(self, viewer_id: str) -> bool:
        """Refused: the gateway offers no way to drop a viewer."""
        raise ValidationError("drop is not available through the gateway")

    def watch(self, since: int | None, deliver: Deliver, stop: threading.Event) -> None:
        """Follow the gateway's event stream (resumed after a loss) until ``stop`` is set."""
        def lost(exc: Exception) -> None:
            print(f"gateway stream lost ({exc}); reconnecting", file=sys.stderr)

        for kind, data in self.api.follow(self.name, since=since, silence=STREAM_SILENCE, on_lost=lost):
            deliver(data["revision"], data["values"], None if kind == "snapshot" else data.get("changes", {}))
            if stop.is_set():
                return

    def shell_object(self) -> Any:
        """Refused: the shell binds a Pyro5 client."""
        raise ValidationError("shell is not available through the gateway")

    def close(self) -> None:
        """Nothing held between calls: each request has its own connection."""


def open_client(args: argparse.Namespace, settings: Settings, name: str) -> CtlClient:
    """The transport for this invocation: the gateway's HTTP API with ``--gateway URL``, else Pyro5."""
    if args.gateway:
        return GatewayCtlClient(args.gateway, name, settings)
    return PyroClient(name, settings)


# ---------------------------------------------------------------- arguments
def _common(top: bool) -> argparse.ArgumentParser:
    """Options accepted before and after the sub-command. On the sub-parsers their default is
    SUPPRESS, so a value given before the sub-command is not reset by the sub-parser."""
    p = argparse.ArgumentParser(add_help=False)
    d = (lambda v: v) if top else (lambda v: argparse.SUPPRESS)
    g = p.add_argument_group("common options (before or after the command)")
    g.add_argument("-o", "--output", choices=("table", "json"), default=d("table"),
                   help="output format (default: table, i.e. text for people)")
    g.add_argument("--json", dest="output", action="store_const", const="json", default=d("table"),
                   help="the same as -o json")
    g.add_argument("--ns", metavar="HOST:PORT", default=d(None),
                   help="name server to use (default: MVC_NS_HOST:MVC_NS_PORT)")
    g.add_argument("--model", default=d(""), help="'model' (default), 'ticker' or a full registered name")
    g.add_argument("--identity", default=d(None), help="identity to authenticate as (default: MVC_IDENTITY, "
                                                       "else 'controller' when its secret is available)")
    g.add_argument("--gateway", default=d(""), metavar="URL",
                   help="go through a web gateway (http://host:port): every model command but drop and "
                        "shell, with no Pyro5 connection and no callback into this shell")
    return p


_FORMATTER = argparse.RawDescriptionHelpFormatter


def _sub(sub: Any, name: str, help_: str, examples: str) -> argparse.ArgumentParser:
    return sub.add_parser(name, help=help_, description=help_, parents=[_common(False)], formatter_class=_FORMATTER,
                          epilog="examples:\n" + examples + "\n\n" + EXIT_CODES)


def parser() -> argparse.ArgumentParser:
    """The whole command line (public: shell completion is generated from it)."""
    p = argparse.ArgumentParser(
        prog="remote-mvc-ctl", description="Query, change, watch and inspect a remote-mvc model.",
        parents=[_common(True)], formatter_class=_FORMATTER,
        epilog="examples:\n  remote-mvc-ctl query\n  remote-mvc-ctl set name=demo value=1 -o json\n"
               "  remote-mvc-ctl --ns 127.0.0.1:9090 watch --since 40 --changes-only\n"
               "  source <(remote-mvc-ctl completion bash)\n\n" + EXIT_CODES)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _sub(sub, "query", "print the model's values and revision",
         "  remote-mvc-ctl query\n  remote-mvc-ctl query -o json | jq .revision\n  remote-mvc-ctl query --model ticker")
    g = _sub(sub, "get", "print one field's raw value (for scripts)",
             "  remote-mvc-ctl get value\n  name=$(remote-mvc-ctl get name)\n  remote-mvc-ctl get name -o json")
    g.add_argument("field", metavar="FIELD")
    s = _sub(sub, "set", "change fields (typed by the model's schema)",
             "  remote-mvc-ctl set name=demo value=99\n  remote-mvc-ctl set value=1 --expect 41   "
             "# only if the model is at revision 41")
    s.add_argument("assignments", nargs="+", metavar="FIELD=VALUE")
    s.add_argument("--expect", type=int, default=None, metavar="REV", help="only if the model is at this revision")
    h = _sub(sub, "history", "print change events after a revision",
             "  remote-mvc-ctl history\n  remote-mvc-ctl history --since 100 --limit 10 -o json")
    h.add_argument("--since", type=int, default=0, metavar="REV")
    h.add_argument("--limit", type=int, default=1000)
    w = _sub(sub, "watch", "print each change as it arrives (Ctrl-C stops)",
             "  remote-mvc-ctl watch\n  remote-mvc-ctl watch --since 40          # replay from revision 40, then follow\n"
             "  remote-mvc-ctl watch --changes-only -o json --count 5")
    w.add_argument("--count", type=int, default=0, help="exit after this many changes")
    w.add_argument("--since", type=int, default=None, metavar="REV",
                   help="start after this revision (its later changes are replayed first)")
    w.add_argument("--changes-only", action="store_true",
                   help="print only what changed in each event; no snapshot lines")
    _sub(sub, "viewers", "list the subscribed viewers", "  remote-mvc-ctl viewers\n  remote-mvc-ctl viewers -o json")
    _sub(sub, "whoami", "the identity and role the server sees", "  remote-mvc-ctl whoami\n"
         "  MVC_IDENTITY=admin remote-mvc-ctl whoami")
    _sub(sub, "shell", "a Python shell with rm bound to the model (line editing, history in "
         "~/.remote_mvc_history)", "  remote-mvc-ctl shell\n  >>> rm.modify({'value': 5})")
    d = _sub(sub, "drop", "drop a viewer (admin)", "  MVC_IDENTITY=admin remote-mvc-ctl drop viewer-1234")
    d.add_argument("viewer_id", metavar="VIEWER_ID")
    hz = _sub(sub, "health", "check this machine's service health endpoint (/healthz)",
              "  remote-mvc-ctl health\n  remote-mvc-ctl health --url http://10.0.0.5:9100/healthz")
    hz.add_argument("--url", default="")
    _sub(sub, "version", "print the versions of remote-mvc-ctl and its libraries",
         "  remote-mvc-ctl version\n  remote-mvc-ctl version -o json")
    c = _sub(sub, "completion", "print a shell completion script",
             "  source <(remote-mvc-ctl completion bash)        # in ~/.bashrc\n"
             "  remote-mvc-ctl completion zsh > ~/.zfunc/_remote-mvc-ctl")
    c.add_argument("shell", choices=("bash", "zsh"))
    return p


# ---------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    """``remote-mvc-ctl``: parse ``argv`` and run the command; returns the exit code."""
    args = parser().parse_args(argv)  # a usage error exits 2 here
    client: CtlClient | None = None
    try:
        settings = _settings(args)
        setup(settings)  # Pyro5's process-wide configuration, once (this is the program's entry point)
        if args.command in LOCAL:
            return LOCAL[args.command](args, settings)
        client = open_client(args, settings, _name(args.model, settings))
        return COMMANDS[args.command](client, args, settings)
    except UsageError as exc:
        print(f"remote-mvc-ctl: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except ConfigError as exc:
        print(f"error: ConfigError: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (MVCError, CommunicationError, PyroError) as exc:
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        unavailable = isinstance(exc, (CommunicationError, ServiceUnavailable))
        return EXIT_UNAVAILABLE if unavailable else EXIT_ERROR
    except KeyboardInterrupt:
        return 130
    finally:
        if client is not None:
            client.close()


def _settings(args: argparse.Namespace) -> Settings:
    settings = Settings.from_env()
    if args.identity is not None:
        settings = settings.replace(identity=args.identity)
    if args.ns:
        host, sep, port = args.ns.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise UsageError(f"--ns wants HOST:PORT, got {args.ns!r}")
        settings = settings.replace(ns_host=host.strip("[]"), ns_port=int(port))
    return settings


def _name(arg: str, settings: Settings) -> str:
    return {"": settings.model_name, "model": settings.model_name, "ticker": settings.ticker_name}.get(arg, arg)


def _print(data: Any, args: argparse.Namespace, text: str) -> None:
    print(json.dumps(data, sort_keys=True) if args.output == "json" else text)


def _when(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="milliseconds")


def _query(rm: CtlClient, args: argparse.Namespace, *_: Any) -> int:
    snap = rm.snapshot()
    lines = [f"{snap['model']} at revision {snap['revision']}"]
    lines += [f"  {k} = {v!r}" for k, v in snap["values"].items()]
    if snap.get("stale"):
        lines.append("  (may be stale: the replica that answered cannot reach etcd right now)")
    _print(snap, args, "\n".join(lines))
    return EXIT_OK


def _get(rm: CtlClient, args: argparse.Namespace, *_: Any) -> int:
    values = rm.snapshot()["values"]
    if args.field not in values:
        raise ValidationError(f"unknown field {args.field!r}; fields are: {', '.join(values)}")
    value = values[args.field]
    text = value if isinstance(value, str) else json.dumps(value)  # raw: no quotes around text
    print(json.dumps(value) if args.output == "json" else text)
    return EXIT_OK


def _set(rm: CtlClient, args: argparse.Namespace, *_: Any) -> int:
    raw = {}
    for item in args.assignments:
        field, sep, text = item.partition("=")
        if not sep or not field:
            raise UsageError(f"expected FIELD=VALUE, got {item!r}")
        raw[field] = text
    schema = rm.schema()
    changes = {}
    for field, text in raw.items():
        if field not in schema:
            raise ValidationError(f"unknown field {field!r}; fields are: {', '.join(schema)}")
        changes[field] = _parse(schema[field], field, text)
    revision = rm.modify(changes, args.expect)
    _print({"revision": revision, "changes": changes}, args, f"revision {revision}")
    return EXIT_OK


def _parse(spec: dict[str, Any], field: str, text: str) -> Any:
    """Parse command-line text by the field's type, as the server's schema gives it."""
    types = {"str": str, "int": int, "float": float, "bool": bool}
    f = Field(types[spec["type"]], spec["default"])
    f.name = field
    return f.parse(text)


def _history(rm: CtlClient, args: argparse.Namespace, *_: Any) -> int:
    events = rm.history(args.since, args.limit)
    if args.output == "json":
        print(json.dumps(events, sort_keys=True))
        return EXIT_OK
    for e in events:
        print(f"{e['revision']:>6}  {_when(e['time'])}  {e['identity']:<12} {_changed(e)}")
    return EXIT_OK


def _changed(event: dict[str, Any]) -> str:
    return ", ".join(f"{k}: {c['old']!r} -> {c['new']!r}" for k, c in event["changes"].items())


class _Terminated(Exception):
    """SIGTERM during ``watch``: ends it like Ctrl-C does (exit 0)."""


def _watch(rm: CtlClient, args: argparse.Namespace, *_: Any) -> int:
    if args.since is not None and args.since < 0:
        raise UsageError("--since wants a revision >= 0")
    stop = threading.Event()
    changes = [0]

    def deliver(revision: int, values: dict[str, Any], changed: dict[str, Any] | None) -> None:
        if changed is not None:
            changes[0] += 1
        if changed is not None or not args.changes_only:
            if args.changes_only:
                data: dict[str, Any] = {"revision": revision, "changes": changed}
                text = f"revision {revision}: {_changed({'changes': changed})}"
            else:
                data = {"revision": revision, "values": values, "changes": changed, "snapshot": changed is None}
                text = f"revision {revision}: {values}"
            _print(data, args, text)
            sys.stdout.flush()
        if args.count and changes[0] >= args.count:
            stop.set()

    def terminate(*_: Any) -> None:
        stop.set()
        raise _Terminated  # out of a blocking wait or read in the main thread

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        rm.watch(args.since, deliver, stop)
    except (KeyboardInterrupt, _Terminated):
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
    return EXIT_OK


def _viewers(rm: CtlClient, args: argparse.Namespace, *_: Any) -> int:
    viewers = rm.viewers()
    lines = [f"{len(viewers)} viewer(s)"] + [
        f"  {v['viewer_id']:<30} revision {v['delivered_revision']:<6} queued {v['queued']:<4} {v.get('uri', '')}"
        for v in viewers]
    _print(viewers, args, "\n".join(lines))
    return EXIT_OK


def _whoami(rm: CtlClient, args: argparse.Namespace, *_: Any) -> int:
    me = rm.whoami()
    _print(me, args, f"{me['identity']} ({me['role']})")
    return EXIT_OK


def _drop(rm: CtlClient, args: argparse.Namespace, *_: Any) -> int:
    dropped = rm.drop_viewer(args.viewer_id)
    _print({"dropped": dropped}, args, "dropped" if dropped else "no such viewer")
    return EXIT_OK if dropped else EXIT_ERROR


def history_file() -> Path:
    """Where the shell keeps its line history (REMOTE_MVC_HISTORY overrides)."""
    return Path(os.environ.get("REMOTE_MVC_HISTORY") or Path.home() / ".remote_mvc_history")


def _shell(rm: CtlClient, args: argparse.Namespace, settings: Settings, *_: Any) -> int:
    target = rm.shell_object()
    configure_logging("remote-mvc-ctl", "WARNING", sys.stderr)
    namespace = {"rm": target, "settings": settings}
    saved = _readline_on(namespace)
    banner = (f"remote-mvc shell: rm is {target!r}\n"
              "  rm.query()   rm.snapshot()   rm.modify({'name': 'newname', 'value': 99})   rm.history(0)")
    try:
        code.interact(banner=banner, local=namespace, exitmsg="")
    finally:
        if saved is not None:
            saved()
    return EXIT_OK


def _readline_on(namespace: dict[str, Any]) -> Any:
    """Line editing, tab completion and a persistent history for the shell; returns the function
    that saves the history (None without readline, e.g. a Python built without it)."""
    if not sys.stdin.isatty():  # a script piped in: no line editing, nothing worth keeping
        return None
    try:
        import readline
        import rlcompleter
    except ImportError:
        return None
    path = history_file()
    try:
        readline.read_history_file(path)
    except (FileNotFoundError, OSError):
        pass
    readline.set_history_length(1000)
    readline.set_completer(rlcompleter.Completer(namespace).complete)
    readline.parse_and_bind("tab: complete")

    def save() -> None:
        try:
            readline.write_history_file(path)
            path.chmod(0o600)  # what was typed may hold values nobody else should read
        except OSError:
            pass

    return save


# ---------------------------------------------------------------- local commands (no model needed)
def _health(args: argparse.Namespace, settings: Settings) -> int:
    if not args.url and settings.metrics_port <= 0:
        print("unhealthy: no metrics port configured (set MVC_METRICS_PORT or pass --url)", file=sys.stderr)
        return EXIT_ERROR
    url = args.url or f"http://127.0.0.1:{settings.metrics_port}/healthz"
    try:
        with urllib.request.urlopen(url, timeout=3) as reply:
            print(reply.read().decode().strip())
            return EXIT_OK
    except urllib.error.HTTPError as exc:  # the service answered: it is there, but not healthy
        print(f"unhealthy: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except (urllib.error.URLError, OSError) as exc:
        print(f"unavailable: {exc}", file=sys.stderr)
        return EXIT_UNAVAILABLE


def _version(args: argparse.Namespace, settings: Settings) -> int:
    versions = {"remote-mvc": _dist_version("remote-mvc"), "Pyro5": _dist_version("Pyro5"),
                "prometheus-client": _dist_version("prometheus-client"),
                "python": ".".join(map(str, sys.version_info[:3]))}
    _print(versions, args, "\n".join(f"{k} {v}" for k, v in versions.items()))
    return EXIT_OK


def _dist_version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "unknown"


def _completion(args: argparse.Namespace, settings: Settings) -> int:
    import shtab

    print(shtab.complete(parser(), shell=args.shell))
    return EXIT_OK


LOCAL = {"health": _health, "version": _version, "completion": _completion}
COMMANDS = {"query": _query, "get": _get, "set": _set, "history": _history, "watch": _watch,
            "viewers": _viewers, "whoami": _whoami, "drop": _drop, "shell": _shell}

if __name__ == "__main__":
    sys.exit(main())
