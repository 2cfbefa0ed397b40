"""The seed's session against real daemons: a name server, a model server, viewers, a controller."""

import signal

import pytest

from remote_mvc import AuthenticationError, PermissionDenied, ValidationError, read_audit
from remote_mvc.testing import wait_until


def test_seed_sequence_reaches_every_viewer_in_order(mvc_stack):
    model = mvc_stack.model()
    hosts = [mvc_stack.viewers(1, prefix=f"h{i}") for i in range(3)]
    views = [v for _, vs in hosts for v in vs]
    rm = mvc_stack.client("controller")

    assert rm.query() == {"name": "xxx", "value": 0}
    assert rm.modify({"name": "newname"}) == 1
    assert rm.query() == {"name": "newname", "value": 0}
    assert rm.modify({"value": 99}) == 2
    assert rm.query() == {"name": "newname", "value": 99}
    assert rm.modify({"name": "both", "value": 7}) == 3
    assert rm.query() == {"name": "both", "value": 7}

    for v in views:
        assert v.wait_for(3, 5)
        assert v.received == [0, 1, 2, 3]  # the subscribe snapshot, then each change once, in order
        assert v.values == {"name": "both", "value": 7}
    assert model.server.subscriber_count == 3
    assert {d["viewer_id"] for d in rm.viewers()} == {"h0-0", "h1-0", "h2-0"}


def test_multiplexed_viewer_host_serves_many_viewers_on_one_thread(mvc_stack):
    model = mvc_stack.model()
    host, views = mvc_stack.viewers(5, viewer_server="multiplex")
    assert type(host.daemon.transportServer).__name__ == "SocketServer_Multiplex"
    rm = mvc_stack.client("controller")
    for i in range(1, 31):
        rm.modify({"value": i})
    for v in views:
        assert v.wait_for(30, 5)
        assert v.received == list(range(0, 31))
    host.stop()  # unsubscribes every viewer first
    wait_until(lambda: model.server.subscriber_count == 0, 5, message="the host's viewers to unsubscribe")


def test_viewer_process_logs_each_refresh_with_the_values(mvc_stack):
    mvc_stack.model()
    viewer = mvc_stack.process("viewer", viewer_id="seed-viewer")
    viewer.wait_for_log(lambda r: r.get("event") == "subscribed", 15)
    rm = mvc_stack.client("controller")
    rev = rm.modify({"name": "newname", "value": 99})
    refresh = viewer.wait_for_log(lambda r: r.get("event") == "refresh" and r.get("revision") == rev)
    values = viewer.wait_for_log(lambda r: r.get("event") == "values" and r.get("revision") == rev)
    assert refresh["message"] == "Received a refresh notification from the server"
    assert refresh["viewer_id"] == "seed-viewer" and refresh["service"] == "viewer"
    assert values["message"] == "Model values now: {'name': 'newname', 'value': 99}"
    assert values["values"] == {"name": "newname", "value": 99}
    assert viewer.stop() == 0
    assert viewer.events("unsubscribed"), "a viewer that exits unsubscribes first"


def test_read_only_and_bad_credentials_cannot_modify(mvc_stack):
    model = mvc_stack.model()
    rm = mvc_stack.client("controller")
    rm.modify({"value": 1})
    anonymous = mvc_stack.client(None)
    assert anonymous.query() == {"name": "xxx", "value": 1}
    assert anonymous.whoami()["role"] == "viewer"
    with pytest.raises(PermissionDenied):
        anonymous.modify({"value": 666})
    forged = mvc_stack.client("controller", secret="not-the-secret")
    with pytest.raises(AuthenticationError, match="invalid credentials"):
        forged.query()
    with pytest.raises(ValidationError, match="expected int"):
        rm.modify({"value": "lots"})
    assert rm.snapshot()["revision"] == 1 and rm.query()["value"] == 1
    audit = read_audit(model.settings.audit_file())
    assert [(r["action"], r["result"]) for r in audit] == [
        ("modify", "accepted"), ("modify", "forbidden"), ("connect", "refused"), ("modify", "invalid")]
    assert audit[1]["identity"] == "anonymous" and audit[1]["client"].startswith("127.0.0.1:")
    assert audit[0]["identity"] == "controller" and audit[0]["revision"] == 1


def test_admin_can_drop_a_viewer_and_it_comes_back_caught_up(mvc_stack):
    mvc_stack.model()
    host, (view,) = mvc_stack.viewers(1)
    rm = mvc_stack.client("controller")
    admin = mvc_stack.client("admin")
    with pytest.raises(PermissionDenied):
        rm.drop_viewer("viewer-0")
    assert admin.drop_viewer("viewer-0")
    for i in range(1, 6):
        rm.modify({"value": i})
    # the host notices at its next renewal that the subscription is gone and
    # re-subscribes from its last revision: it gets what it missed, once, in order
    assert view.wait_for(5, 10)
    assert view.received == sorted(set(view.received))
    assert view.received[-1] == 5 and view.values["value"] == 5


def test_sigterm_and_sigint_unsubscribe_first(mvc_stack):
    model = mvc_stack.model()
    a = mvc_stack.process("viewer", viewer_id="va")
    b = mvc_stack.process("viewer", viewer_id="vb")
    for p in (a, b):
        p.wait_for_log(lambda r: r.get("event") == "subscribed", 15)
    wait_until(lambda: model.server.subscriber_count == 2)
    a.signal(signal.SIGTERM)
    assert a.proc.wait(10) == 0
    assert model.server.subscriber_count == 1
    b.signal(signal.SIGINT)
    assert b.proc.wait(10) == 0
    assert model.server.subscriber_count == 0
    assert model.metrics.registry.get_sample_value(
        "remote_mvc_viewers_connected", {"model": "remote_mvc.model"}) == 0
