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
    assert first["serializers"]["1"] == "_SerializedSerpent"  # one decode at a time (python/cpython#106905)
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


def test_serpent_decoding_survives_the_ast_constructor_race():
    """python/cpython#106905: before 3.13 a garbage collection that runs Python code (a ``__del__``)
    in the middle of ``ast.literal_eval`` lets another thread's decode interleave, and one of them
    fails with a SystemError. Serpent turns the GC off while it decodes, but any decode that ends
    turns it on again for all threads, so that a decode in progress runs with the GC on now and then.
    Here it always does (serpent's GC switch is made a no-op), with cyclic garbage and a tiny switch
    interval: raw serpent fails (the control), Pyro5's serpent serializer after setup() never does."""
    result = run("""
        import json, sys, threading, types
        import serpent
        from Pyro5 import serializers
        from remote_mvc import Settings, setup
        setup(Settings())
        payload = serpent.dumps([{"a": i, "b": [1, 2, (3, 4)], "c": "x" * 10} for i in range(100)])
        call = serializers.serializers["serpent"].dumpsCall("obj", "method", (payload,), {"k": 1})

        class Garbage:
            def __del__(self):
                sum(range(50))

        def hammer(decode):
            failures, expected = [], serpent.loads(payload)
            def run():
                for _ in range(100):
                    for _ in range(20):
                        g = Garbage(); g.me = g  # cyclic: collected by the GC, anywhere
                    try:
                        assert decode() == expected
                    except SystemError as exc:
                        failures.append(str(exc))
            threads = [threading.Thread(target=run) for _ in range(4)]
            [t.start() for t in threads]
            [t.join() for t in threads]
            return failures

        serpent.gc = types.SimpleNamespace(disable=lambda: None, enable=lambda: None)  # the GC stays on
        sys.setswitchinterval(1e-6)
        by_id = serializers.serializers_by_id[serializers.serializers["serpent"].serializer_id]
        raw = hammer(lambda: serpent.loads(payload))
        guarded = hammer(lambda: serializers.serializers["serpent"].loads(payload))
        guarded += hammer(lambda: serpent.loads(by_id.loadsCall(call)[2][0]))
        print(json.dumps({"raw": raw[:3], "raw_count": len(raw), "guarded": guarded[:3],
                          "race": sys.version_info < (3, 13)}))
    """)
    assert result["guarded"] == [], result
    if result["race"]:  # the control: the race is real here, and provoked
        assert result["raw_count"] > 0 and all("recursion depth mismatch" in e for e in result["raw"]), result


def test_a_serpent_decode_hit_by_the_race_is_tried_again_and_nothing_else_is():
    """An AST built outside serpent (pytest's, say) can still collide with a decode: that one
    SystemError is retried, up to three attempts; any other error reaches the caller at once."""
    result = run("""
        import json
        import serpent
        from Pyro5 import serializers
        from remote_mvc import Settings, setup
        setup(Settings())
        real, calls = serpent.loads, []
        def flaky(errors):
            def loads(data):
                calls.append(1)
                if errors:
                    raise SystemError(errors.pop(0))
                return real(data)
            return loads
        race = "AST constructor recursion depth mismatch (before=27, after=21)"
        data, out = serpent.dumps({"a": 1}), {}
        for case, errors in (("once", [race]), ("always", [race] * 5), ("other", ["something else"])):
            calls.clear()
            serpent.loads = flaky(errors)
            try:
                out[case] = [serializers.serializers["serpent"].loads(data), len(calls)]
            except SystemError as exc:
                out[case] = [str(exc), len(calls)]
        print(json.dumps(out))
    """)
    assert result["once"] == [{"a": 1}, 2]
    assert result["always"][1] == 3 and "recursion depth mismatch" in result["always"][0]
    assert result["other"] == ["something else", 1]
