"""The declared remote surface: what each exposed class serves is its SURFACE table, nothing else,
and every method refuses or allows each role exactly as the table says (over real daemons)."""

import secrets

import pytest
from Pyro5.api import Proxy

from remote_mvc import AuthProxy, PermissionDenied, Viewer, auth, read_audit
from remote_mvc.hoststream import Stream
from remote_mvc.nameserver import GuardedNameServer, OpenNameServer
from remote_mvc.pyro.exposed import exposed_members
from remote_mvc.pyro.naming import locate_ns
from remote_mvc.server import ModelServer
from remote_mvc.testing import Stack, wait_until

ROLES = ("anonymous", "viewer", "controller", "admin", "service", "gateway")


@pytest.fixture
def stack(tmp_path):
    """A stack whose credentials hold one identity of every role (named after it)."""
    secrets_by_role = {role: secrets.token_hex(16) for role in ROLES if role != "anonymous"}
    table = ",".join(f"{role}:{role}:{secret}" for role, secret in secrets_by_role.items())
    s = Stack(tmp_path, credentials=table).start()
    s.secrets = secrets_by_role
    try:
        yield s
    finally:
        s.close()


def proxy_as(stack, uri, role):
    if role == "anonymous":
        return AuthProxy(uri)
    return AuthProxy(uri, role, stack.secrets[role])


def test_roles_and_permissions_are_the_agreed_names():
    assert auth.ROLES["gateway"] == {auth.READ, auth.DELEGATE}
    assert auth.ROLES["admin"] == {auth.READ, auth.MODIFY, auth.DROP, auth.REGISTER}
    assert not any(auth.DELEGATE in perms for role, perms in auth.ROLES.items() if role != "gateway")
    with pytest.raises(Exception, match="unknown permission"):
        auth.remote("everything")


def test_surface_tables_are_exactly_what_pyro5_exposes():
    for cls in (ModelServer, Viewer, Stream, GuardedNameServer, OpenNameServer):
        exposed = exposed_members(cls)
        assert exposed["methods"] == set(cls.SURFACE), cls
        assert exposed["attrs"] == set(), cls  # no properties
    assert dict(ModelServer.SURFACE) == {
        "query": "read", "snapshot": "read", "schema": "read", "history": "read", "whoami": "read",
        "modify": "modify", "modify_for": "delegate", "subscribe": "read", "renew": "read", "unsubscribe": "read", "viewers": "read",
        "drop_viewer": "drop", "set_members": "read"}
    assert dict(Viewer.SURFACE) == {"notify": "capability"}
    assert GuardedNameServer.SURFACE["register"] == "register" and OpenNameServer.SURFACE["register"] == "read"


def test_a_class_exposing_more_than_it_declares_fails_at_import():
    from Pyro5.api import expose

    with pytest.raises(TypeError, match="close"):
        @auth.declared
        @expose
        class Leaky:
            @auth.remote(auth.READ)
            def query(self):
                return 1

            def close(self):
                pass


def test_each_daemon_serves_its_table_and_no_lifecycle(stack):
    """_pyroMethods as the daemons tell proxies: model, ticker, viewer host, name server."""
    model = stack.model()
    ticker = stack.ticker(interval=5.0)
    host, (view,) = stack.viewers(1)
    served = {
        model.uri(stack.settings.model_name): ModelServer,
        ticker.uri(stack.settings.ticker_name): ModelServer,
        host.daemon.uriFor(host.stream(view.model)): Stream,
        stack.nameserver.ns_uri: GuardedNameServer,
    }
    for uri, cls in served.items():
        with AuthProxy(uri) as p:  # anonymous: Pyro5's plain "hello" handshake
            told = p.metadata()
            assert told["methods"] == set(cls.SURFACE) and told["attrs"] == set(), uri
    rm = AuthProxy(model.uri(stack.settings.model_name))
    for name in ("close", "_reap", "modify_local", "revision", "subscriber_count", "healthy", "on_refusal"):
        with pytest.raises(AttributeError):
            getattr(rm, name)()
    # the anonymous close() of finding 4 is refused: viewers are still notified afterwards
    rev = stack.client("controller").modify({"value": 5})
    assert view.wait_for(rev, 10)


def call_model(p, method, viewer_id):
    args = {
        "query": (), "snapshot": (), "schema": (), "history": (0,), "whoami": (), "modify": ({"value": 7},),
        "modify_for": ("controller", {"value": 8}),
        "subscribe": (f"PYRO:viewer.{viewer_id}@127.0.0.1:9", viewer_id), "renew": ([],),
        "unsubscribe": ("nobody/0",), "viewers": (), "drop_viewer": ("nobody",),
        "set_members": ("nobody/0", [viewer_id]),
    }[method]
    return getattr(p, method)(*args)


def test_every_model_method_with_every_role_over_a_real_daemon(stack):
    model = stack.model()
    uri = model.uri(stack.settings.model_name)
    outcome = {}
    for role in ROLES:
        p = proxy_as(stack, uri, role)
        try:
            for method, permission in ModelServer.SURFACE.items():
                allowed = permission in auth.ROLES["viewer" if role == "anonymous" else role]
                try:
                    call_model(p, method, f"v-{role}")
                    outcome[role, method] = "allowed"
                except PermissionDenied:
                    outcome[role, method] = "refused"
                assert outcome[role, method] == ("allowed" if allowed else "refused"), (role, method)
        finally:
            p._pyroRelease()
    refused = [k for k, v in outcome.items() if v == "refused"]
    assert ("gateway", "modify") in refused and ("controller", "drop_viewer") in refused
    records = read_audit(model.settings.audit_file())
    forbidden = {(r["identity"], r["action"]) for r in records if r["result"] == "forbidden"}
    assert forbidden == {(role, method) for role, method in refused}  # every refusal on record
    assert all(r["client"].startswith("127.0.0.1:") and r["error"] for r in records if r["result"] == "forbidden")


def test_every_name_server_method_with_every_role(stack):
    ns_uri = stack.nameserver.ns_uri
    target = "PYRO:obj@127.0.0.1:9"
    for role in ROLES:
        ns = proxy_as(stack, ns_uri, role)
        try:
            name = f"t.{role}"
            calls = {
                "lookup": ("Pyro.NameServer",), "list": (None,), "yplookup": (None, {"x"}), "count": (),
                "ping": (), "register": (name, target), "set_metadata": (name, {"tag"}), "remove": (name,),
            }
            assert set(calls) == set(GuardedNameServer.SURFACE)
            for method, args in calls.items():
                allowed = GuardedNameServer.SURFACE[method] in auth.ROLES["viewer" if role == "anonymous" else role]
                if allowed:
                    getattr(ns, method)(*args)
                else:
                    with pytest.raises(PermissionDenied):
                        getattr(ns, method)(*args)
            # listing by regex (a ReDoS for anyone who may send a pattern) needs the register permission
            if auth.REGISTER in auth.ROLES["viewer" if role == "anonymous" else role]:
                assert "Pyro.NameServer" in ns.list(regex="Pyro\\..*")
            else:
                with pytest.raises(PermissionDenied):
                    ns.list(regex="(a+)+$")
        finally:
            ns._pyroRelease()


def test_the_redos_pattern_from_anonymous_is_refused_at_once_and_audited(stack):
    ns = locate_ns(stack.settings)
    with pytest.raises(PermissionDenied, match="register"):
        ns.list(regex="^(([a-z])+.)+[A-Z]([a-z])+$")
    assert ns.lookup("Pyro.NameServer")  # still serving
    ns._pyroRelease()
    audit = read_audit(stack.nameserver.settings.audit_file())
    assert any(r["action"] == "ns_list" and r["result"] == "forbidden" and r["identity"] == "anonymous"
               for r in audit)


def test_viewer_notify_is_refused_for_every_role_without_the_capability(stack):
    stack.model()
    host, (view,) = stack.viewers(1)
    uri = host.daemon.uriFor(host.stream(view.model))  # the host's one stream for its viewers of the model
    before = view.revision
    for role in ROLES:
        p = proxy_as(stack, uri, role)
        p._pyroSerializer = "json"
        try:
            with pytest.raises(PermissionDenied):
                p.notify({"model": "m", "events": [{"revision": before + 1, "values": {"value": 666}, "time": 0}]})
        finally:
            p._pyroRelease()
    assert host.stream(view.model).mirror.refused == len(ROLES) and view.revision == before
    assert host.metrics.registry.get_sample_value(
        "remote_mvc_refusals_total", {"method": "notify", "result": "capability"}) == len(ROLES)


def test_open_name_server_declares_its_surface_too(tmp_path):
    from remote_mvc import NameServer, Settings

    ns_service = NameServer(Settings(service="nameserver", state_dir=str(tmp_path), ns_port=0, metrics_port=-1,
                                     credentials="")).start()
    try:
        assert not ns_service.protected
        with AuthProxy(ns_service.ns_uri) as ns:
            assert ns.metadata()["methods"] == set(OpenNameServer.SURFACE)
            ns.register("open.name", "PYRO:obj@127.0.0.1:9")  # open mode: anyone registers
            with pytest.raises(PermissionDenied):
                ns.list(regex="(a|a)*b")
    finally:
        ns_service.stop()


def test_nothing_listens_for_the_viewer_but_notify(stack):
    """wait_for (a blocking method) is local: a remote two-way call of it cannot freeze a host."""
    stack.model()
    host, (view,) = stack.viewers(1, viewer_server="multiplex")
    with Proxy(host.daemon.uriFor(host.stream(view.model))) as p:
        with pytest.raises(AttributeError):
            p.wait_for(10**9, 3600)
    rev = stack.client("controller").modify({"value": 3})
    assert view.wait_for(rev, 10)
    wait_until(lambda: host.healthy(), 5, message="host healthy")


def test_the_readmes_remote_methods_table_matches_the_surface():
    """README.md's "Remote methods" table lists each declared method once, with its permission."""
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
    section = readme.split("**Remote methods**", 1)[1].split("A change event:", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    documented = {}
    for row in rows:
        method = re.match(r"\| `(\w+)\(", row).group(1)
        permission = row.split("|")[2].strip().split()[0]
        documented[method] = permission
    assert documented == dict(ModelServer.SURFACE)
