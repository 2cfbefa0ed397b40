"""``remote-mvc-ctl``: query, change, watch and inspect a model from the shell."""

from __future__ import annotations

import argparse
import code
import json
import signal
import sys
import threading
import urllib.error
import urllib.request
from datetime import datetime, timezone
from typing import Any

from Pyro5.errors import CommunicationError, PyroError

from .config import Settings
from .controller import ModelClient
from .errors import MVCError, ValidationError
from .logs import configure_logging
from .metrics import Metrics
from .model import Field
from .viewer import Viewer, ViewerHost

EXIT_ERROR, EXIT_UNAVAILABLE = 1, 2


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="remote-mvc-ctl", description="Drive a remote-mvc model server.")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--model", default="", help="name to use: 'model', 'ticker' or a full registered name")
    p.add_argument("--identity", default=None, help="identity to authenticate as (default: MVC_IDENTITY, "
                                                     "else 'controller' when its secret is available)")
    p.add_argument("--gateway", default="", metavar="URL", help="go through a web gateway (http://host:port): "
                   "query, set, history, watch, viewers, whoami, with no callback into this shell")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("query", help="print the values")
    s = sub.add_parser("set", help="change fields: set name=new value=99")
    s.add_argument("assignments", nargs="+", metavar="FIELD=VALUE")
    s.add_argument("--expect", type=int, default=None, help="only if the model is at this revision")
    h = sub.add_parser("history", help="print change events")
    h.add_argument("--since", type=int, default=0)
    h.add_argument("--limit", type=int, default=1000)
    w = sub.add_parser("watch", help="print each change as it arrives")
    w.add_argument("--count", type=int, default=0, help="exit after this many changes")
    sub.add_parser("viewers", help="who is subscribed")
    sub.add_parser("whoami", help="the identity and role the server sees")
    sub.add_parser("shell", help="a Python shell with rm bound to the model")
    d = sub.add_parser("drop", help="drop a viewer (admin)")
    d.add_argument("viewer_id")
    hz = sub.add_parser("health", help="check this machine's service health endpoint")
    hz.add_argument("--url", default="")
    return p


def _name(arg: str, settings: Settings) -> str:
    return {"": settings.model_name, "model": settings.model_name, "ticker": settings.ticker_name}.get(arg, arg)


def _print(data: Any, as_json: bool, text: str) -> None:
    print(json.dumps(data, sort_keys=True) if as_json else text)


def _when(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="milliseconds")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        settings = Settings.from_env()
        if args.command == "health":
            return _health(args, settings)
        if args.identity is not None:
            settings = settings.replace(identity=args.identity)
        name = _name(args.model, settings)
        if args.gateway:
            from ._cli_gateway import run_via_gateway  # HTTP only; no Pyro5 connection
            return run_via_gateway(args, settings, name)
        rm = ModelClient(name, settings, default_identity="controller", retry_seconds=3.0)
        return COMMANDS[args.command](rm, args, settings, name)
    except (MVCError, CommunicationError, PyroError) as exc:
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        unavailable = isinstance(exc, CommunicationError) or type(exc).__name__ == "ServiceUnavailable"
        return EXIT_UNAVAILABLE if unavailable else EXIT_ERROR
    except KeyboardInterrupt:
        return 130


def _query(rm: ModelClient, args: argparse.Namespace, *_: Any) -> int:
    snap = rm.snapshot()
    lines = [f"{snap['model']} at revision {snap['revision']}"]
    lines += [f"  {k} = {v!r}" for k, v in snap["values"].items()]
    if snap.get("stale"):
        lines.append("  (may be stale: the replica that answered cannot reach etcd right now)")
    _print(snap, args.json, "\n".join(lines))
    return 0


def _set(rm: ModelClient, args: argparse.Namespace, *_: Any) -> int:
    raw = {}
    for item in args.assignments:
        field, sep, text = item.partition("=")
        if not sep or not field:
            raise ValidationError(f"expected FIELD=VALUE, got {item!r}")
        raw[field] = text
    schema = rm.schema()
    changes = {}
    for field, text in raw.items():
        if field not in schema:
            raise ValidationError(f"unknown field {field!r}; fields are: {', '.join(schema)}")
        changes[field] = _parse(schema[field], field, text)
    revision = rm.modify(changes, args.expect)
    _print({"revision": revision, "changes": changes}, args.json, f"revision {revision}")
    return 0


def _parse(spec: dict[str, Any], field: str, text: str) -> Any:
    """Parse command-line text by the field's type, as the server's schema gives it."""
    types = {"str": str, "int": int, "float": float, "bool": bool}
    f = Field(types[spec["type"]], spec["default"])
    f.name = field
    return f.parse(text)


def _history(rm: ModelClient, args: argparse.Namespace, *_: Any) -> int:
    events = rm.history(args.since, args.limit)
    if args.json:
        print(json.dumps(events, sort_keys=True))
    for e in [] if args.json else events:
        changed = ", ".join(f"{k}: {c['old']!r} -> {c['new']!r}" for k, c in e["changes"].items())
        print(f"{e['revision']:>6}  {_when(e['time'])}  {e['identity']:<12} {changed}")
    return 0


def _watch(rm: ModelClient, args: argparse.Namespace, settings: Settings, name: str) -> int:
    done = threading.Event()
    seen = [0]

    def on_change(viewer: Viewer, event: dict | None) -> None:
        data = {"revision": viewer.revision, "values": viewer.values,
                "changes": event["changes"] if event else None, "snapshot": event is None}
        _print(data, args.json, f"revision {viewer.revision}: {viewer.values}")
        sys.stdout.flush()
        seen[0] += 1
        if args.count and seen[0] >= args.count + 1:  # the first delivery is the initial snapshot
            done.set()

    viewer_settings = settings.replace(metrics_port=-1, identity="", secret="",
                                       viewer_id=f"ctl-watch-{settings.default_viewer_id()}")
    host = ViewerHost(viewer_settings, Metrics())
    host.add(Viewer(viewer_settings.viewer_id, name, on_change=on_change, log_values=False))
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    host.start()
    try:
        done.wait()
    except KeyboardInterrupt:
        pass
    finally:
        host.stop()
    return 0


def _viewers(rm: ModelClient, args: argparse.Namespace, *_: Any) -> int:
    viewers = rm.viewers()
    lines = [f"{len(viewers)} viewer(s)"] + [
        f"  {v['viewer_id']:<30} revision {v['delivered_revision']:<6} queued {v['queued']:<4} {v.get('uri', '')}"
        for v in viewers]
    _print(viewers, args.json, "\n".join(lines))
    return 0


def _whoami(rm: ModelClient, args: argparse.Namespace, *_: Any) -> int:
    me = rm.whoami()
    _print(me, args.json, f"{me['identity']} ({me['role']})")
    return 0


def _drop(rm: ModelClient, args: argparse.Namespace, *_: Any) -> int:
    dropped = rm.drop_viewer(args.viewer_id)
    _print({"dropped": dropped}, args.json, "dropped" if dropped else "no such viewer")
    return 0 if dropped else EXIT_ERROR


def _shell(rm: ModelClient, args: argparse.Namespace, settings: Settings, name: str) -> int:
    configure_logging("remote-mvc-ctl", "WARNING", sys.stderr)
    banner = (f"remote-mvc shell: rm is {rm!r}\n"
              "  rm.query()   rm.snapshot()   rm.modify({'name': 'newname', 'value': 99})   rm.history(0)")
    code.interact(banner=banner, local={"rm": rm, "settings": settings}, exitmsg="")
    return 0


def _health(args: argparse.Namespace, settings: Settings) -> int:
    if not args.url and settings.metrics_port <= 0:
        print("unhealthy: no metrics port configured (set MVC_METRICS_PORT or pass --url)", file=sys.stderr)
        return EXIT_ERROR
    url = args.url or f"http://127.0.0.1:{settings.metrics_port}/healthz"
    try:
        with urllib.request.urlopen(url, timeout=3) as reply:
            print(reply.read().decode().strip())
            return 0
    except (urllib.error.URLError, OSError) as exc:
        print(f"unhealthy: {exc}", file=sys.stderr)
        return EXIT_ERROR


COMMANDS = {"query": _query, "set": _set, "history": _history, "watch": _watch, "viewers": _viewers,
            "whoami": _whoami, "drop": _drop, "shell": _shell}

if __name__ == "__main__":
    sys.exit(main())
