"""Every refusal audited (finding 12), audit volume bounded (finding 11), loops that survive a
hostile peer and /healthz that tells (finding 4's aftermath), against real daemons."""

import urllib.error
import urllib.request

import pytest

from remote_mvc import (
    AuthProxy,
    PermissionDenied,
    Service,
    ValidationError,
    Viewer,
    ViewerHost,
    auth,
    read_audit,
)
from remote_mvc.testing import wait_until


def records(service, **match):
    return [r for r in read_audit(service.settings.audit_file()) if all(r.get(k) == v for k, v in match.items())]


def test_refusals_that_left_no_record_are_audited_with_who_where_what_why(mvc_stack):
    model = mvc_stack.model()
    ticker = mvc_stack.ticker(interval=60.0)
    controller = AuthProxy(model.uri(mvc_stack.settings.model_name), "controller", mvc_stack.controller_secret)
    with pytest.raises(ValidationError, match="request_id"):
        controller.modify({"value": 1}, None, "r" * 129)
    with pytest.raises(ValidationError, match="request_id"):
        controller.modify({"value": 1}, None, 12345)
    with pytest.raises(PermissionDenied):
        controller.drop_viewer("anyone")
    controller._pyroRelease()
    bad = records(model, action="modify", result="invalid")
    assert len(bad) == 2 and all(r["identity"] == "controller" and "request_id" in r["error"] for r in bad)
    assert all(r["client"].startswith("127.0.0.1:") for r in bad)
    drop = records(model, action="drop_viewer", result="forbidden")
    assert len(drop) == 1 and drop[0]["identity"] == "controller" and "drop" in drop[0]["error"]
    # the ticker's price=10**400: a ValidationError, counted and audited (was a bare OverflowError)
    tick = AuthProxy(ticker.uri(mvc_stack.settings.ticker_name), "controller", mvc_stack.controller_secret)
    with pytest.raises(ValidationError, match="too large"):
        tick.modify({"price": 10**400})
    tick._pyroRelease()
    overflow = records(ticker, action="modify", result="invalid")
    assert len(overflow) == 1 and overflow[0]["identity"] == "controller" and len(overflow[0]["changes"]) < 300
    assert ticker.metrics.registry.get_sample_value(
        "remote_mvc_modifications_total", {"model": mvc_stack.settings.ticker_name, "result": "invalid"}) == 1
    assert model.metrics.registry.get_sample_value(
        "remote_mvc_refusals_total", {"method": "drop_viewer", "result": "forbidden"}) == 1


def test_a_flood_of_refused_modifies_writes_a_bounded_audit_log(mvc_stack):
    model = mvc_stack.model(audit_refusals_per_second=5.0, audit_refusal_burst=20)
    anon = AuthProxy(model.uri(mvc_stack.settings.model_name))
    payload = {"name": "x" * 50_000}  # under the anonymous wire bound (64 KiB), so it reaches modify
    for _ in range(200):
        with pytest.raises(PermissionDenied):
            anon.modify(payload)
    anon._pyroRelease()
    own = records(model, action="modify", result="forbidden")
    assert 20 <= len(own) <= 30  # the burst, and what the rate refilled meanwhile
    assert all(len(r["changes"]) < 300 for r in own)  # payloads truncated
    summaries = wait_until(lambda: records(model, action="refusals_aggregated"), 10,
                           message="the summary record (written by the reaper)")
    assert sum(s["count"] for s in summaries) == 200 - len(own)  # every refusal accounted for
    assert summaries[0]["client"] == "127.0.0.1" and summaries[0]["actions"] == {"modify:forbidden": 200 - len(own)}
    assert model.settings.audit_file().stat().st_size < 40_000
    rev = mvc_stack.client("controller").modify({"value": 1})  # legitimate changes unaffected
    assert records(model, action="modify", result="accepted", revision=rev)


@auth.declared
class HostileModel:
    """A 'model server' that subscribes viewers, then answers renewals with nonsense."""

    @auth.remote(auth.READ)
    def subscribe(self, uri, viewer_id, since=None, oneway=False, capability=None, members=None):
        return {"subscription": f"{viewer_id}/1", "lease": 0.5, "revision": 0, "capability": "c"}

    @auth.remote(auth.READ)
    def renew(self, ids):
        return 5  # not a list: the keeper's code meets a TypeError

    @auth.remote(auth.READ)
    def unsubscribe(self, sid):
        return True

    @auth.remote(auth.READ)
    def snapshot(self):
        return {"revision": 0, "values": {}}

    @auth.remote(auth.READ)
    def history(self, since=0, limit=1000):
        return []


def test_viewer_keeper_survives_a_hostile_model_server(mvc_stack):
    hostile = Service(mvc_stack.settings.replace(service="hostile"))
    hostile.serve(HostileModel(), "hostile.model")
    host = ViewerHost(mvc_stack.settings.replace(service="viewer"))
    host.add(Viewer("v", "hostile.model", metrics=host.metrics, log_values=False))
    try:
        hostile.start()
        assert hostile.wait_registered(10)
        host.start()

        def errors():
            return host.metrics.registry.get_sample_value("remote_mvc_loop_errors_total", {"loop": "viewer-keeper"})

        wait_until(lambda: (errors() or 0) >= 3, 20, message="the keeper to meet the error three times")
        assert host.lease() == 0.5  # the granted lease, not its own setting
        assert host.healthy()  # the keeper is alive and turning (healthy() says so), its viewer subscribed
    finally:
        host.stop()
        hostile.stop()


def test_healthz_says_unhealthy_once_the_fanout_is_closed(mvc_stack):
    model = mvc_stack.model(metrics_port=0)
    url = f"http://127.0.0.1:{model.metrics_server.port}/healthz"
    assert urllib.request.urlopen(url, timeout=5).status == 200
    model.server.close()  # what an anonymous close() did before (no longer remote)
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(url, timeout=5)
    assert err.value.code == 503


class BrokenNameServer:
    """Answers lookups with an error no name server should raise."""

    @auth.remote(auth.READ)
    def lookup(self, name, return_metadata=False):
        raise ZeroDivisionError("a name server out of its mind")


def test_the_name_registrar_survives_a_broken_name_server(mvc_stack, tmp_path):
    import threading

    from remote_mvc.pyro.daemons import TrackedDaemon

    daemon = TrackedDaemon(host="127.0.0.1", port=0)
    daemon.register(BrokenNameServer(), objectId="Pyro.NameServer")
    loop = threading.Thread(target=daemon.requestLoop, daemon=True)
    loop.start()
    port = int(daemon.locationStr.rsplit(":", 1)[1])
    service = Service(mvc_stack.settings.replace(service="lonely", ns_port=port, state_dir=str(tmp_path)))
    service.serve(HostileModel(), "lonely.model")
    try:
        service.start()

        def errors():
            return service.metrics.registry.get_sample_value("remote_mvc_loop_errors_total", {"loop": "registrar"})

        wait_until(lambda: (errors() or 0) >= 3, 20, message="the registrar to meet the error three times")
        assert not service.healthy()  # not registered: /healthz says so
    finally:
        service.stop()
        daemon.shutdown()
        daemon.close()


def test_a_running_stack_creates_its_state_private(tmp_path):
    """State directory 0700; name server storage, model state (and its WAL), audit logs 0600."""
    import os
    import stat

    from remote_mvc.testing import Stack

    old = os.umask(0o022)  # the usual umask: it would give 0755 and 0644
    try:
        stack = Stack(tmp_path / "fresh").start()
        try:
            model = stack.model()
            stack.client("controller").modify({"value": 1})
            state = tmp_path / "fresh"
            files = [state / "nameserver.sqlite3", model.settings.state_file(), model.settings.audit_file(),
                     stack.nameserver.settings.audit_file(), state / "model.sqlite3-wal"]
            assert stat.S_IMODE(state.stat().st_mode) == 0o700
            for path in files:
                assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
        finally:
            stack.close()
    finally:
        os.umask(old)


def test_name_server_refusal_floods_are_summarized_soon_after_they_stop(tmp_path):
    from remote_mvc import NameServer, Settings
    from remote_mvc.pyro.naming import locate_ns

    settings = Settings(service="nameserver", state_dir=str(tmp_path), ns_port=0, metrics_port=-1,
                        credentials="service:service:s3cret", audit_refusal_burst=5)
    ns_service = NameServer(settings).start()
    try:
        ns = locate_ns(settings.replace(ns_port=ns_service.port))
        for i in range(40):
            with pytest.raises(PermissionDenied):
                ns.register(f"rogue.{i}", "PYRO:x@127.0.0.1:9")
        ns._pyroRelease()
        summaries = wait_until(lambda: records(ns_service, action="refusals_aggregated"), 10,
                               message="the summary, with no further refusal to carry it")
        own = records(ns_service, action="ns_register", result="forbidden")
        assert len(own) + sum(s["count"] for s in summaries) == 40
    finally:
        ns_service.stop()
