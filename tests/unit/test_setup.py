"""remote_mvc.setup(): the one place that changes Pyro5's process-wide state, explicitly, once.

Each check runs in a fresh interpreter: the test process itself was set up by the pytest plugin.
"""

import json
import subprocess
import sys
import textwrap

SNAPSHOT = """
import Pyro5.api, Pyro5.protocol, Pyro5.serializers, Pyro5.socketutil
from Pyro5 import config
def state():
    return {"config": {k: repr(getattr(config, k)) for k in sorted(config.__slots__)},
            "serializers": {i: type(s).__name__ for i, s in Pyro5.serializers.serializers_by_id.items()},
            "zlib": type(Pyro5.protocol.zlib).__name__,
            "tls": [repr(getattr(Pyro5.socketutil, c)) for c in ("__ssl_client_context", "__ssl_server_context")],
            "dict_to_class": sorted(getattr(Pyro5.serializers.SerializerBase,
                                            "_SerializerBase__custom_dict_to_class_registry"))}
"""


def run(code: str) -> dict:
    out = subprocess.run([sys.executable, "-c", SNAPSHOT + textwrap.dedent(code)], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_importing_and_making_clients_and_services_leaves_pyro5_alone():
    result = run("""
        import json
        before = state()
        import remote_mvc
        from remote_mvc import ModelClient, Service, Settings, SetupRequired, connect
        s = Settings(ns_port=1, metrics_port=-1)
        service = Service(s)  # a constructor changes nothing and starts nothing
        errors = []
        for attempt in (lambda: ModelClient("m", s), lambda: connect("m", s), service.start):
            try:
                attempt()
            except SetupRequired as exc:
                errors.append(str(exc))
        print(json.dumps({"same": state() == before, "errors": errors}))
    """)
    assert result["same"], "the library changed Pyro5's configuration without setup()"
    assert len(result["errors"]) == 3 and all("remote_mvc.setup(" in e for e in result["errors"])


def test_setup_applies_once_and_again_is_harmless():
    result = run("""
        import json
        from remote_mvc import Settings, setup
        from remote_mvc.pyro.setup import is_setup
        before = state()
        assert not is_setup()
        setup(Settings(threadpool_size=50))
        first = state()
        setup(Settings(threadpool_size=50))
        print(json.dumps({"changed": first != before, "same": state() == first, "done": is_setup(),
                          "first": first}))
    """)
    assert result["changed"] and result["same"] and result["done"]
    first = result["first"]
    assert first["serializers"]["2"] == "_RefusingSerializer"  # marshal refused on input, wrapped once
    assert first["zlib"] == "_BoundedZlib"
    assert first["config"]["SERIALIZER"] == "'serpent'" and first["config"]["THREADPOOL_SIZE"] == "50"
    assert first["config"]["MAX_RETRIES"] == "0"
    assert "remote_mvc.errors.ValidationError" in first["dict_to_class"]  # errors keep their type over the wire


def test_a_client_with_other_tls_settings_than_setup_is_refused():
    result = run("""
        import json
        from remote_mvc import ModelClient, Settings, SetupRequired, setup
        setup(Settings())
        try:
            ModelClient("m", Settings(tls_ca="/x/ca.crt", tls_cert="/x/c.crt", tls_key="/x/c.key"))
        except SetupRequired as exc:
            print(json.dumps({"error": str(exc)}))
    """)
    assert "TLS settings differ" in result["error"]


def test_a_viewer_daemon_gets_its_server_type_and_the_process_keeps_its_own():
    from Pyro5 import config

    from remote_mvc.pyro.daemons import ViewerDaemon, make_viewer_daemon

    before = config.SERVERTYPE
    for servertype, server in (("multiplex", "SocketServer_Multiplex"), ("thread", "SocketServer_Threadpool")):
        daemon = make_viewer_daemon(servertype, host="127.0.0.1", port=0)
        try:
            assert isinstance(daemon, ViewerDaemon) and type(daemon.transportServer).__name__ == server
            assert config.SERVERTYPE == before
        finally:
            daemon.close()
