"""Subscriptions belong to their subscriber, viewers accept only their server, leases come from the
server: attacks of issue 11 (findings 6, 9, 15) against real daemons on 127.0.0.1."""

import socket

import pytest

from remote_mvc import AuthProxy, LimitExceeded, PermissionDenied, ValidationError, read_audit
from remote_mvc.testing import wait_until


def anonymous(model, stack):
    return AuthProxy(model.uri(stack.settings.model_name))


def as_identity(model, stack, identity, secret):
    return AuthProxy(model.uri(stack.settings.model_name), identity, secret)


def sample(metrics, name, labels):
    return metrics.registry.get_sample_value(name, labels) or 0.0


@pytest.fixture
def silent_peer():
    """A port that accepts TCP connections (in its backlog) and never says a word."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(512)
    yield sock.getsockname()[1]
    sock.close()


# finding 6: viewer poisoning ---------------------------------------------------------------------

def test_forged_notifications_are_refused_and_real_changes_still_arrive(mvc_stack):
    model = mvc_stack.model()
    host, (view,) = mvc_stack.viewers(1)
    rm = mvc_stack.client("controller")
    rev = rm.modify({"value": 1})
    assert view.wait_for(rev, 10)
    # an attacker reaches the viewer's daemon (its address is no secret) and forges the next change
    mirror = host.stream(view.model).mirror  # the host's one stream admits every notification for its viewers
    attacker = AuthProxy(host.daemon.uriFor(host.stream(view.model)))
    attacker._pyroSerializer = "json"  # the short path's shape
    forged = {"model": model.settings.model_name, "events": [
        {"revision": rev + 1, "values": {"name": "forged", "value": 666}, "time": 0.0}]}
    for capability in (None, "", "guess", "x" * 10_000):
        with pytest.raises(PermissionDenied):
            attacker.notify({**forged, **({"capability": capability} if capability is not None else {})})
    attacker._pyroSerializer = "serpent"  # Pyro5's own dispatch checks just the same
    with pytest.raises(PermissionDenied):
        attacker.notify(forged)
    with pytest.raises(PermissionDenied):  # the revision 10**12 jump of the finding
        attacker.notify({"model": "m", "events": [{"revision": 10**12, "values": {"value": 1}, "time": 0.0}]})
    attacker._pyroRelease()
    assert view.values["value"] == 1 and view.revision == rev and mirror.refused == 6
    rev2 = rm.modify({"value": 2})  # the real change at rev + 1 is applied, not skipped as a duplicate
    assert view.wait_for(rev2, 10) and view.values["value"] == 2 and view.received[-1] == rev2
    assert sample(host.metrics, "remote_mvc_refusals_total", {"method": "notify", "result": "capability"}) == 6
    assert host.healthy()


def test_an_implausible_revision_is_not_applied_but_resyncs_from_the_server(mvc_stack):
    """Defence in depth: even with the capability (a confused or compromised sender), a revision past
    what the model server's own history and snapshot say is refused, and the viewer re-syncs."""
    mvc_stack.model()
    host, (view,) = mvc_stack.viewers(1)
    rm = mvc_stack.client("controller")
    rev = rm.modify({"value": 1})
    assert view.wait_for(rev, 10)
    mirror = host.stream(view.model).mirror  # the host's one stream admits every notification for its viewers
    sender = AuthProxy(host.daemon.uriFor(host.stream(view.model)))
    sender._pyroSerializer = "json"
    for jump in (rev + 2, rev + 50_000, 10**12):
        sender.notify({"capability": mirror.capability, "events": [
            {"revision": jump, "values": {"name": "x", "value": 666}, "time": 0.0}]})
        assert view.revision == rev and view.values["value"] == 1
    with pytest.raises(ValidationError):  # malformed: refused before anything is applied
        sender.notify({"capability": mirror.capability, "events": [{"revision": "7", "values": {}, "time": 0}]})
    sender._pyroRelease()
    assert mirror.refused == 4
    assert sample(host.metrics, "remote_mvc_refusals_total", {"method": "notify", "result": "implausible"}) == 3
    rev2 = rm.modify({"value": 2})
    assert view.wait_for(rev2, 10) and view.values["value"] == 2


def test_capabilities_are_per_subscription_and_only_in_the_subscribers_reply(mvc_stack):
    model = mvc_stack.model()
    hosts = [mvc_stack.viewers(1, prefix=prefix)[0] for prefix in ("a", "b")]  # a subscription (stream) each
    caps = {h.stream(model.settings.model_name).mirror.capability for h in hosts}
    assert len(caps) == 2 and None not in caps
    admin = as_identity(model, mvc_stack, "admin", mvc_stack.admin_secret)
    listed = admin.viewers()
    admin._pyroRelease()
    assert not any(cap in repr(listed) for cap in caps)  # not even an admin sees them


# finding 9: subscriptions belong to their subscriber ---------------------------------------------

def test_anonymous_cannot_unsubscribe_or_renew_another_viewers_subscription(mvc_stack):
    model = mvc_stack.model()
    host, (view,) = mvc_stack.viewers(1)
    admin = as_identity(model, mvc_stack, "admin", mvc_stack.admin_secret)
    sid = admin.viewers()[0]["subscription"]  # an id leaked somehow
    stranger = anonymous(model, mvc_stack)
    assert all("subscription" not in v and "uri" not in v for v in stranger.viewers())
    with pytest.raises(PermissionDenied):
        stranger.unsubscribe(sid)
    assert stranger.renew([sid]) == [sid]  # not renewed: answered as not theirs
    controller = as_identity(model, mvc_stack, "controller", mvc_stack.controller_secret)
    with pytest.raises(PermissionDenied):
        controller.unsubscribe(sid)
    assert [v["subscription"] for v in admin.viewers()] == [sid]  # still there
    rev = mvc_stack.client("controller").modify({"value": 9})
    assert view.wait_for(rev, 10)
    records = read_audit(model.settings.audit_file())
    refused = [(r["action"], r["identity"]) for r in records if r["result"] == "forbidden"]
    assert ("unsubscribe", "anonymous") in refused and ("unsubscribe", "controller") in refused
    assert ("renew", "anonymous") in refused
    for p in (admin, stranger, controller):
        p._pyroRelease()


def test_another_identity_cannot_take_over_a_viewer_id(mvc_stack, silent_peer):
    model = mvc_stack.model()
    host, (view,) = mvc_stack.viewers(1)  # subscribed as the "service" identity
    admin = as_identity(model, mvc_stack, "admin", mvc_stack.admin_secret)
    before = admin.viewers()
    thief = anonymous(model, mvc_stack)
    with pytest.raises(PermissionDenied, match="another client"):
        thief.subscribe(f"PYRO:viewer.x@127.0.0.1:{silent_peer}", view.viewer_id)
    with pytest.raises(PermissionDenied):  # a wrong capability proves nothing either
        thief.subscribe(f"PYRO:viewer.x@127.0.0.1:{silent_peer}", view.viewer_id, None, True, "guess")
    assert admin.viewers()[0]["subscription"] == before[0]["subscription"]
    rev = mvc_stack.client("controller").modify({"value": 4})
    assert view.wait_for(rev, 10)
    assert any(r["action"] == "subscribe" and r["result"] == "forbidden" and r["identity"] == "anonymous"
               for r in read_audit(model.settings.audit_file()))
    admin._pyroRelease()
    thief._pyroRelease()


def test_the_old_capability_proves_a_viewer_id_after_the_address_changed(mvc_stack, silent_peer):
    """A viewer host whose address changed re-subscribes with its last capability (no lease wait)."""
    model = mvc_stack.model()
    first = anonymous(model, mvc_stack)
    reply = first.subscribe(f"PYRO:viewer.moving@127.0.0.1:{silent_peer}", "moving")
    other = as_identity(model, mvc_stack, "controller", mvc_stack.controller_secret)  # stands in for "elsewhere"
    again = other.subscribe(f"PYRO:viewer.moving@127.0.0.1:{silent_peer}", "moving", None, True,
                            reply["capability"])
    assert again["subscription"] != reply["subscription"] and again["capability"] != reply["capability"]
    first._pyroRelease()
    other._pyroRelease()


def test_callbacks_must_point_at_the_subscribers_own_address(mvc_stack):
    model = mvc_stack.model()
    p = anonymous(model, mvc_stack)
    for uri in ("PYRO:viewer.x@10.20.30.40:9", "PYRO:viewer.x@192.0.2.1:22", "PYRO:viewer.x@localhost:9"):
        with pytest.raises(PermissionDenied, match="own address"):
            p.subscribe(uri, "probe")
    for uri in ("PYRONAME:remote_mvc.model", "PYRO:viewer.x@./u:/tmp/sock", "not a uri", "PYRO:x@127.0.0.1"):
        with pytest.raises(ValidationError):
            p.subscribe(uri, "probe")
    with pytest.raises(ValidationError):
        p.subscribe("PYRO:viewer.x@127.0.0.1:9", "v" * 201)
    assert p.viewers() == []  # nothing subscribed, nothing connected to
    p._pyroRelease()
    audit = read_audit(model.settings.audit_file())
    assert sum(r["action"] == "subscribe" and r["result"] == "forbidden" for r in audit) == 3
    assert sum(r["action"] == "subscribe" and r["result"] == "invalid" for r in audit) == 5


def test_named_callback_hosts_allow_a_viewer_behind_nat(mvc_stack, silent_peer):
    model = mvc_stack.model(callback_hosts="203.0.113.7")
    p = anonymous(model, mvc_stack)
    assert p.subscribe("PYRO:viewer.nat@203.0.113.7:9", "nat")["subscription"].startswith("nat/")
    with pytest.raises(PermissionDenied):
        p.subscribe("PYRO:viewer.other@203.0.113.8:9", "other")
    p._pyroRelease()


def test_subscriptions_are_capped_per_address_and_per_identity(mvc_stack, silent_peer):
    model = mvc_stack.model(max_subscriptions_per_address=3, max_subscriptions_per_identity=2,
                            call_timeout=30.0)
    uri = f"PYRO:viewer.x@127.0.0.1:{silent_peer}"
    anon = anonymous(model, mvc_stack)
    for i in range(3):
        anon.subscribe(uri, f"a{i}")
    anon.subscribe(uri, "a0")  # replacing its own: not one more
    with pytest.raises(LimitExceeded, match="limit"):
        anon.subscribe(uri, "a3")
    ctl = as_identity(model, mvc_stack, "controller", mvc_stack.controller_secret)
    for i in range(2):
        ctl.subscribe(uri, f"c{i}")
    with pytest.raises(LimitExceeded):
        ctl.subscribe(uri, "c2")
    admin = as_identity(model, mvc_stack, "admin", mvc_stack.admin_secret)
    admin.subscribe(uri, "admin-0")  # admins are not bounded
    assert len(admin.viewers()) == 6
    assert anon.unsubscribe([v for v in anon.viewers() if "subscription" in v][0]["subscription"])
    anon.subscribe(uri, "a3")  # room again
    audit = read_audit(model.settings.audit_file())
    assert {r["identity"] for r in audit if r["result"] == "limit"} == {"anonymous", "controller"}
    for p in (anon, ctl, admin):
        p._pyroRelease()


def test_silent_peers_cannot_starve_a_genuine_viewers_first_snapshot(mvc_stack, silent_peer):
    """96 subscriptions to a peer that accepts and never answers hold at most a few connector threads:
    a genuine viewer gets its first snapshot while they are all still waiting for their handshake."""
    model = mvc_stack.model(call_timeout=20.0, lease_seconds=60.0)
    attacker = anonymous(model, mvc_stack)
    for i in range(96):
        attacker.subscribe(f"PYRO:viewer.s{i}@127.0.0.1:{silent_peer}", f"silent-{i}")
    host, (view,) = mvc_stack.viewers(1, call_timeout=20.0)
    assert view.wait_for(0, 15) and view.synced
    assert len(attacker.viewers()) == 97  # none of the silent ones has timed out yet: no slot was needed
    assert sample(model.metrics, "remote_mvc_viewers_dropped_total",
                  {"model": model.settings.model_name, "reason": "timeout"}) == 0
    attacker._pyroRelease()


# finding 15: the lease the server grants ----------------------------------------------------------

def test_viewer_hosts_renew_within_the_lease_the_server_grants(mvc_stack):
    model = mvc_stack.model(lease_seconds=1.5)  # renewed every 0.5 s: a starved second does not expire it
    host, (view,) = mvc_stack.viewers(1, lease_seconds=30.0)  # its own setting is far longer
    assert host.lease() == pytest.approx(1.5)
    start = host.renewals
    wait_until(lambda: host.renewals >= start + 12, 20, message="a dozen renewals (4 leases)")
    dropped = sample(model.metrics, "remote_mvc_viewers_dropped_total",
                     {"model": model.settings.model_name, "reason": "lease_expired"})
    assert dropped == 0 and host.subscribed() == 1
    rev = mvc_stack.client("controller").modify({"value": 2})
    assert view.wait_for(rev, 10)
