"""Every Pyro5 internal remote-mvc relies on, one test each, failing with what changed.

Pyro5 is pinned to a tested range in pyproject.toml; before widening it, run these: a failure
names the module of ours that depends on the internal.
"""

import importlib.metadata
import inspect
import ssl

import pytest
from Pyro5 import client, core, protocol, serializers, server, socketutil, svr_multiplex, svr_threads


def _why(internal: str, user: str) -> str:
    return f"Pyro5 changed {internal}, which remote_mvc.{user} relies on: review it before widening the pin"


def test_version_is_in_the_tested_range():
    major, minor = (int(x) for x in importlib.metadata.version("Pyro5").split(".")[:2])
    assert (major, minor) == (5, 17), _why("its version", "pyproject's pin")


def test_message_header_layout():
    assert protocol._header_format == "!4sHBBHHII16sHH", _why("protocol._header_format", "pyro.wire and pyro.notify")
    assert protocol._header_size == 40, _why("protocol._header_size", "pyro.wire and pyro.notify")
    assert isinstance(protocol._magic_number, int) and protocol.PROTOCOL_VERSION == 502, \
        _why("the magic number or protocol version", "pyro.notify")
    assert protocol._empty_correlation_id == b"\0" * 16, _why("protocol._empty_correlation_id", "pyro.notify")
    flags = (protocol.FLAGS_EXCEPTION, protocol.FLAGS_COMPRESSED, protocol.FLAGS_ONEWAY, protocol.FLAGS_BATCH,
             protocol.FLAGS_ITEMSTREAMRESULT, protocol.FLAGS_KEEPSERIALIZED, protocol.FLAGS_CORR_ID)
    assert flags == (1, 2, 4, 8, 16, 32, 64), _why("the message flags", "pyro.wire")


def test_serializer_registry():
    ids = {name: s.serializer_id for name, s in serializers.serializers.items()}
    assert {"serpent": 1, "marshal": 2, "json": 3}.items() <= ids.items(), _why("serializer ids", "pyro.wire")
    assert serializers.serializers_by_id[1] is serializers.serializers["serpent"], \
        _why("serializers_by_id", "pyro.daemons and pyro.hardening")
    assert hasattr(protocol, "zlib"), _why("protocol.zlib", "pyro.hardening")
    decoders = {name for name, f in vars(serializers.SerpentSerializer).items()
                if inspect.isfunction(f) and "serpent.loads" in inspect.getsource(f)}
    assert decoders == {"loads", "loadsCall"}, _why("the serpent serializer's decoding methods",
                                                    "pyro.hardening._SerializedSerpent")


def test_daemon_hooks_we_override():
    assert list(inspect.signature(server.Daemon._handshake).parameters) == ["self", "conn", "denied_reason"], \
        _why("Daemon._handshake", "pyro.daemons.GuardedDaemonMixin")
    for name in ("handleRequest", "validateHandshake", "clientDisconnect", "_sendExceptionResponse"):
        assert callable(getattr(server.Daemon, name, None)), _why(f"Daemon.{name}", "pyro.daemons")
    assert list(inspect.signature(server.Daemon._sendExceptionResponse).parameters)[:6] == \
        ["self", "connection", "seq", "serializer_id", "exc_value", "tbinfo"], \
        _why("Daemon._sendExceptionResponse", "pyro.daemons")
    assert list(inspect.signature(server.DaemonObject.__init__).parameters) == ["self", "daemon"], \
        _why("DaemonObject", "pyro.daemons._SmallDaemonObject")
    assert core.DAEMON_NAME == "Pyro.Daemon", _why("core.DAEMON_NAME", "pyro.daemons")


@pytest.mark.parametrize("transport", [svr_threads.ClientConnectionJob, svr_multiplex.SocketServer_Multiplex])
def test_transport_servers_call_our_handshake_and_request_hooks(transport):
    source = inspect.getsource(transport)
    assert "daemon._handshake(" in source and "daemon.handleRequest(" in source, \
        _why(f"{transport.__name__}'s calls into the daemon", "pyro.daemons")


def test_the_threadpool_server_accepts_on_transport_server_sock():
    source = inspect.getsource(svr_threads.SocketServer_Threadpool.events)
    assert "self.sock.accept()" in source, _why("the threadpool server's accept", "pyro.daemons (TLS in the worker)")
    assert "do_handshake_on_connect" in inspect.signature(ssl.SSLContext.wrap_socket).parameters


def test_proxy_internals():
    assert "self._pyroConnection = None" in inspect.getsource(client.Proxy.__init__), \
        _why("Proxy._pyroConnection (its socket is taken over)", "pyro.proxy.connect_viewer")
    assert "self._pyroHandshake" in inspect.getsource(client.Proxy._Proxy__pyroCreateConnection), \
        _why("the proxy's handshake data", "pyro.proxy.AuthProxy")
    for name in ("_pyroInvoke", "_pyroBind", "_pyroGetMetadata", "_pyroRelease"):
        assert callable(getattr(client.Proxy, name, None)), _why(f"Proxy.{name}", "pyro.proxy.AuthProxy")


def test_tls_context_caches():
    for cache in ("__ssl_client_context", "__ssl_server_context"):
        assert hasattr(socketutil, cache), _why(f"socketutil.{cache}", "pyro.setup.configure_tls")


def test_exposed_members_and_the_daemon_server_type():
    exposed = server._get_exposed_members(type("Probe", (), {"m": server.expose(lambda self: None)}))
    assert set(exposed) >= {"methods", "oneway", "attrs"} and exposed["methods"] == {"m"}, \
        _why("_get_exposed_members", "pyro.exposed (auth.declared checks every surface with it)")
    assert "config.SERVERTYPE" in inspect.getsource(server.Daemon.__init__), \
        _why("the daemon's server type read in its constructor", "pyro.daemons.make_viewer_daemon")
