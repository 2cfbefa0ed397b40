import pytest

from remote_mvc import AuthenticationError, ConfigError, Credentials, Identity, PermissionDenied
from remote_mvc.auth import Authenticator, client_token, generate_credentials, require


class Clock:
    def __init__(self, now=1000.0):
        self.now = now

    def __call__(self):
        return self.now


@pytest.fixture
def creds():
    return Credentials([Identity("ctl", "controller", ("new-secret", "old-secret")),
                        Identity("boss", "admin", ("boss-secret",))])


def test_valid_token_gives_identity_and_role(creds):
    clock = Clock()
    a = Authenticator(creds, clock)
    assert a.authenticate(client_token("ctl", "new-secret", clock)) == ("ctl", "controller")
    assert a.authenticate(client_token("boss", "boss-secret", clock)) == ("boss", "admin")


def test_both_secrets_work_for_rotation(creds):
    clock = Clock()
    a = Authenticator(creds, clock)
    assert a.authenticate(client_token("ctl", "old-secret", clock))[0] == "ctl"


def test_no_credentials_is_read_only(creds):
    a = Authenticator(creds)
    assert a.authenticate("hello") == ("anonymous", "viewer")
    assert a.authenticate(None) == ("anonymous", "viewer")


@pytest.mark.parametrize("token", [
    "garbage", 42, {"identity": "ctl"}, {"identity": 1, "ts": 1, "nonce": "n", "mac": "m"},
    {"identity": "ctl", "ts": "now", "nonce": "n", "mac": "m"},
])
def test_malformed_tokens_are_refused(creds, token):
    with pytest.raises(AuthenticationError, match="malformed"):
        Authenticator(creds).authenticate(token)


def test_wrong_secret_and_unknown_identity_are_refused(creds):
    clock = Clock()
    a = Authenticator(creds, clock)
    with pytest.raises(AuthenticationError, match="invalid"):
        a.authenticate(client_token("ctl", "guess", clock))
    with pytest.raises(AuthenticationError, match="invalid"):
        a.authenticate(client_token("nobody", "new-secret", clock))
    token = client_token("ctl", "new-secret", clock)
    token["identity"] = "boss"  # a MAC is bound to its identity
    with pytest.raises(AuthenticationError, match="invalid"):
        a.authenticate(token)


def test_stale_and_replayed_tokens_are_refused(creds):
    clock = Clock()
    a = Authenticator(creds, clock, max_skew=30)
    old = client_token("ctl", "new-secret", Clock(clock.now - 31))
    with pytest.raises(AuthenticationError, match="stale"):
        a.authenticate(old)
    token = client_token("ctl", "new-secret", clock)
    a.authenticate(token)
    with pytest.raises(AuthenticationError, match="replayed"):
        a.authenticate(token)


def test_credentials_parse_and_file_roundtrip(tmp_path):
    c = Credentials.parse("a:controller:s1:s2, b:viewer:s3")
    assert c.get("a").secrets == ("s1", "s2") and c.get("b").role == "viewer"
    with pytest.raises(ConfigError):
        Credentials.parse("a:controller")
    with pytest.raises(ConfigError, match="unknown role"):
        Credentials.parse("a:king:s")
    path = tmp_path / "creds.json"
    made = generate_credentials(path)
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    loaded = Credentials.load(path)
    assert loaded.get("controller").secrets == made.get("controller").secrets
    assert {i.role for i in loaded.by_name.values()} == {"viewer", "controller", "admin"}
    with pytest.raises(ConfigError):
        Credentials.load(tmp_path / "missing.json")


def test_require_without_a_connection_is_local_admin():
    assert require("admin")[0] == "local"


def test_require_checks_the_connection_role():
    from Pyro5.api import current_context

    class Conn:
        mvc_identity, mvc_role = "v", "viewer"
        sock = None

    current_context.client = Conn()
    try:
        assert require("viewer")[:2] == ("v", "viewer")
        with pytest.raises(PermissionDenied, match="controller role required"):
            require("controller")
    finally:
        current_context.client = None
