"""``remote-mvc-ctl --gateway URL``: the read commands (and ``set``) over the web gateway's HTTP API.

No Pyro5 connection and no callback into the CLI: a shell outside the model servers' network
(the host of a Compose stack, behind NAT) can query, watch and change models. Output matches
the direct commands.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from datetime import datetime, timezone
from typing import Any

from .auth import client_credentials
from .config import Settings
from .errors import ServiceUnavailable, ValidationError
from .gateway_client import GatewayClient
from .model import Field

__all__ = ["run_via_gateway", "GATEWAY_COMMANDS"]

STREAM_SILENCE = 60.0  # seconds without an event or a heartbeat (default every 15 s): the stream is lost


def _print(data: Any, as_json: bool, text: str) -> None:
    print(json.dumps(data, sort_keys=True) if as_json else text)
    sys.stdout.flush()


def _query(api: GatewayClient, args: argparse.Namespace, name: str) -> int:
    snap = api.snapshot(name)
    snap.pop("schema", None)
    lines = [f"{snap['model']} at revision {snap['revision']}"] + [f"  {k} = {v!r}" for k, v in snap["values"].items()]
    _print(snap, args.json, "\n".join(lines))
    return 0


def _set(api: GatewayClient, args: argparse.Namespace, name: str) -> int:
    schema = api.snapshot(name)["schema"]
    types = {"str": str, "int": int, "float": float, "bool": bool}
    changes = {}
    for item in args.assignments:
        field, sep, text = item.partition("=")
        if not sep or not field:
            raise ValidationError(f"expected FIELD=VALUE, got {item!r}")
        if field not in schema:
            raise ValidationError(f"unknown field {field!r}; fields are: {', '.join(schema)}")
        f = Field(types[schema[field]["type"]], schema[field]["default"])
        f.name = field
        changes[field] = f.parse(text)
    revision = api.modify(name, changes, args.expect)
    _print({"revision": revision, "changes": changes}, args.json, f"revision {revision}")
    return 0


def _history(api: GatewayClient, args: argparse.Namespace, name: str) -> int:
    events = api.history(name, args.since, min(args.limit, 1000))
    if args.json:
        print(json.dumps(events, sort_keys=True))
        return 0
    for e in events:
        changed = ", ".join(f"{k}: {c['old']!r} -> {c['new']!r}" for k, c in e["changes"].items())
        when = datetime.fromtimestamp(e["time"], timezone.utc).isoformat(timespec="milliseconds")
        print(f"{e['revision']:>6}  {when}  {e['identity']:<12} {changed}")
    return 0


def _watch(api: GatewayClient, args: argparse.Namespace, name: str) -> int:
    """Print each change; after a dropped stream, resume from the last revision (exactly, or
    with the snapshot the gateway sends when it can't). A stream silent for longer than a few
    heartbeats is taken as lost."""
    def stop(*_: Any) -> None:
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)
    seen, since, epoch, delay = 0, None, None, 0.2
    while True:
        try:
            with api.events(name, since=since, epoch=epoch) as stream:
                delay = 0.2
                while True:
                    try:
                        kind, data = stream.next(timeout=STREAM_SILENCE)
                    except (TimeoutError, OSError) as exc:
                        raise ServiceUnavailable(f"no event or heartbeat: {exc}") from None
                    since, epoch = data["revision"], data["epoch"]
                    out = {"revision": data["revision"], "values": data["values"],
                           "changes": data.get("changes"), "snapshot": kind == "snapshot"}
                    _print(out, args.json, f"revision {data['revision']}: {data['values']}")
                    seen += 1
                    if args.count and seen >= args.count + 1:  # the first delivery is the initial snapshot
                        return 0
        except ServiceUnavailable as exc:
            print(f"gateway stream lost ({exc}); reconnecting", file=sys.stderr)
            time.sleep(delay)  # a back-off between reconnects, not a wait for a condition
            delay = min(delay * 2, 5.0)


def _viewers(api: GatewayClient, args: argparse.Namespace, name: str) -> int:
    viewers = api.viewers(name)
    lines = [f"{len(viewers)} viewer(s)"] + [
        f"  {v['viewer_id']:<30} revision {v['delivered_revision']:<6} queued {v['queued']:<4} {v.get('uri', '')}"
        for v in viewers]
    _print(viewers, args.json, "\n".join(lines))
    return 0


def _whoami(api: GatewayClient, args: argparse.Namespace, name: str) -> int:
    me = api.whoami()
    _print(me, args.json, f"{me['identity']} ({me['role']})")
    return 0


GATEWAY_COMMANDS = {"query": _query, "set": _set, "history": _history, "watch": _watch, "viewers": _viewers,
                    "whoami": _whoami}


def run_via_gateway(args: argparse.Namespace, settings: Settings, name: str) -> int:
    """Run ``args.command`` against the gateway at ``args.gateway``."""
    command = GATEWAY_COMMANDS.get(args.command)
    if command is None:
        raise ValidationError(f"{args.command} is not available through the gateway "
                              f"(available: {', '.join(GATEWAY_COMMANDS)})")
    identity, secret = client_credentials(settings, "controller")
    return command(GatewayClient(args.gateway, identity, secret, timeout=settings.call_timeout + 5), args, name)
