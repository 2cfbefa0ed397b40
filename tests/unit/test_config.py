import pytest

from remote_mvc import ConfigError, Settings


def test_defaults_and_derived_paths():
    s = Settings()
    assert s.ns_port == 9090
    assert s.model_name == "remote_mvc.model" and s.ticker_name == "remote_mvc.ticker"
    assert s.watched_name == s.model_name
    s = Settings(state_dir="/x", service="model")
    assert str(s.state_file()) == "/x/model.sqlite3"
    assert str(s.audit_file()) == "/x/model-audit.jsonl"
    assert str(s.credentials_path()) == "/x/credentials.json"


def test_environment_overrides_are_typed():
    s = Settings.from_env({"MVC_NS_PORT": "9999", "MVC_LEASE_SECONDS": "2.5", "MVC_WATCH": "remote_mvc.ticker",
                           "PYRO_LOGLEVEL": "DEBUG", "HOME": "/root"})
    assert s.ns_port == 9999 and s.lease_seconds == 2.5 and s.watched_name == "remote_mvc.ticker"


def test_unknown_setting_is_rejected_with_the_known_ones_listed():
    with pytest.raises(ConfigError, match="unknown setting MVC_NS_HOTS.*MVC_NS_HOST"):
        Settings.from_env({"MVC_NS_HOTS": "x"})
    with pytest.raises(ConfigError):
        Settings.from_env({}, bogus=1)
    with pytest.raises(ConfigError):
        Settings().replace(bogus=1)


@pytest.mark.parametrize("env", [{"MVC_NS_PORT": "ninety"}, {"MVC_LEASE_SECONDS": "0"}, {"MVC_QUEUE_LIMIT": "0"},
                                 {"MVC_VIEWER_SERVER": "forking"}, {"MVC_VIEWER_STALL_SECONDS": "0"},
                                 {"MVC_VIEWER_DISPATCH_THREADS": "8", "MVC_VIEWER_DISPATCH_THREADS_MAX": "4"},
                                 {"MVC_VIEWER_SERVER": "multiplex", "MVC_TLS_CA": "ca", "MVC_TLS_CERT": "c",
                                  "MVC_TLS_KEY": "k"}])
def test_bad_values_are_rejected(env):
    with pytest.raises(ConfigError):
        Settings.from_env(env)


def test_advertised_host():
    assert Settings(host="127.0.0.1").advertised_host() == "127.0.0.1"
    assert Settings(host="0.0.0.0", advertise_host="model").advertised_host() == "model"
    assert Settings(host="0.0.0.0").advertised_host() not in ("0.0.0.0", "")
