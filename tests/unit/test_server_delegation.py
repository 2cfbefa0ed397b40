"""ModelServer.modify_for(identity, ...): only a DELEGATE holder may name another identity, whose
own role (from the server's table) is checked; audit record and event name both."""

from __future__ import annotations

import contextlib

import pytest
from Pyro5.api import current_context

from remote_mvc import AuditLog, ExampleModel, Metrics, ModelServer, PermissionDenied, read_audit
from remote_mvc._store import Store

ROLES = {"alice": "controller", "bob": "viewer"}


class Connection:
    """What AuthDaemon pins on a Pyro5 connection after the handshake (identity and role)."""

    def __init__(self, identity: str, role: str) -> None:
        self.mvc_identity, self.mvc_role, self.sock = identity, role, None


@contextlib.contextmanager
def calling_as(identity: str, role: str):
    current_context.client = Connection(identity, role)
    try:
        yield
    finally:
        current_context.client = None


def make(tmp_path, role_of=ROLES.get):
    metrics = Metrics()
    return ModelServer("m", ExampleModel, Store(tmp_path / "s.sqlite3", 100), AuditLog(tmp_path / "a.jsonl", metrics),
                       metrics, role_of=role_of).start()


def test_delegated_modify_is_checked_against_and_recorded_as_the_real_identity(tmp_path):
    m = make(tmp_path)
    with calling_as("gateway", "gateway"):
        assert m.modify_for("alice", {"value": 5}, None, "r1") == 1
        assert m.modify_for("alice", {"value": 6}, None, "r1") == 1  # deduplicated
    event = m.history(0)[0]
    assert (event["identity"], event["via"]) == ("alice", "gateway")
    record = [r for r in read_audit(tmp_path / "a.jsonl") if r["action"] == "modify"][-1]
    assert (record["identity"], record["via"], record["result"], record["revision"]) == ("alice", "gateway",
                                                                                         "accepted", 1)
    m.close()
    again = make(tmp_path)  # the event, with via, survives a restart
    assert again.history(0)[0]["via"] == "gateway"
    again.close()


@pytest.mark.parametrize("caller, role, target, role_of, why", [
    ("gateway", "gateway", "bob", ROLES.get, "may not modify"),  # a viewer, whoever relays it
    ("gateway", "gateway", "mallory", ROLES.get, "unknown identity"),
    ("gateway", "gateway", "alice", None, "delegation not enabled"),
    ("alice", "controller", "alice", ROLES.get, "may not delegate"),  # no DELEGATE: not even for itself
    ("gateway", "gateway", "x" * 200, ROLES.get, "at most 128"),
    ("gateway", "gateway", 7, ROLES.get, "must name an identity"),
])
def test_delegation_refusals_change_nothing_and_are_audited(tmp_path, caller, role, target, role_of, why):
    m = make(tmp_path, role_of)
    with calling_as(caller, role), pytest.raises(PermissionDenied, match=why):
        m.modify_for(target, {"value": 5})
    assert m.snapshot()["revision"] == 0
    record = read_audit(tmp_path / "a.jsonl")[-1]
    assert record["result"] == "forbidden"
    if role == "gateway":  # a delegate's refusal names both; a non-delegate is refused the method itself
        assert record["via"] == caller
    else:
        assert (record["action"], record["identity"]) == ("modify_for", caller)
    m.close()
