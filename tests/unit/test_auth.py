import pytest

from remote_mvc import AuthenticationError, ConfigError, Credentials, Identity, PermissionDenied
from remote_mvc.auth import (
    DROP,
    MODIFY,
    READ,
    REGISTER,
    ROLES,
    Authenticator,
    Throttle,
    client_token,
    generate_credentials,
    require,
)

T = "remote_mvc.model"  # the object a token is for


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
    assert a.authenticate(client_token("ctl", "new-secret", T, clock), target=T) == ("ctl", "controller")
    assert a.authenticate(client_token("boss", "boss-secret", T, clock), target=T) == ("boss", "admin")


def test_both_secrets_work_for_rotation(creds):
    clock = Clock()
    a = Authenticator(creds, clock)
    assert a.authenticate(client_token("ctl", "old-secret", T, clock), target=T)[0] == "ctl"


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
        a.authenticate(client_token("ctl", "guess", T, clock), target=T)
    with pytest.raises(AuthenticationError, match="invalid"):
        a.authenticate(client_token("nobody", "new-secret", T, clock), target=T)
    token = client_token("ctl", "new-secret", T, clock)
    token["identity"] = "boss"  # a MAC is bound to its identity
    with pytest.raises(AuthenticationError, match="invalid"):
        a.authenticate(token, target=T)


def test_stale_and_replayed_tokens_are_refused(creds):
    clock = Clock()
    a = Authenticator(creds, clock, max_skew=30)
    old = client_token("ctl", "new-secret", T, Clock(clock.now - 31))
    with pytest.raises(AuthenticationError, match="stale"):
        a.authenticate(old, target=T)
    token = client_token("ctl", "new-secret", T, clock)
    a.authenticate(token, target=T)
    with pytest.raises(AuthenticationError, match="replayed"):
        a.authenticate(token, target=T)


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
    assert {i.role for i in loaded.by_name.values()} == {"viewer", "controller", "admin", "service", "gateway"}
    with pytest.raises(ConfigError):
        Credentials.load(tmp_path / "missing.json")


def test_require_without_a_connection_is_local_admin():
    assert require(DROP)[0] == "local"


def test_require_checks_the_connection_role():
    from Pyro5.api import current_context

    class Conn:
        mvc_identity, mvc_role = "v", "viewer"
        sock = None

    current_context.client = Conn()
    try:
        assert require(READ)[:2] == ("v", "viewer")
        with pytest.raises(PermissionDenied, match="may not modify"):
            require(MODIFY)
    finally:
        current_context.client = None


def test_roles_are_permission_sets():
    assert MODIFY not in ROLES["viewer"] and MODIFY in ROLES["controller"]
    assert DROP in ROLES["admin"] and DROP not in ROLES["controller"]
    assert REGISTER in ROLES["service"] and MODIFY not in ROLES["service"]
    assert Credentials.parse("s:service:x").allows(REGISTER)
    assert not Credentials.parse("c:controller:x").allows(REGISTER)


def test_throttle_slows_repeated_failures_from_one_address_only():
    clock = Clock(0.0)
    t = Throttle(free=3, window=60, max_delay=2.0, clock=clock)
    assert [t.failed("10.0.0.1:5000") for _ in range(3)] == [0.0, 0.0, 0.0]
    delays = [t.failed(f"10.0.0.1:{5000 + i}") for i in range(8)]
    assert delays[0] > 0 and delays == sorted(delays) and delays[-1] == 2.0
    assert t.failed("10.0.0.2:1") == 0.0  # another address is not slowed
    clock.now = 120.0
    assert t.failed("10.0.0.1:9") == 0.0  # the window has passed


def test_a_token_is_bound_to_its_target(creds):
    """A token observed at one service (object) is refused at another, even unused."""
    clock = Clock()
    a = Authenticator(creds, clock)
    token = client_token("ctl", "new-secret", "remote_mvc.model", clock)
    for other in ("Pyro.NameServer", "remote_mvc.ticker", None):
        with pytest.raises(AuthenticationError, match="invalid"):
            a.authenticate(dict(token), target=other)
    assert a.authenticate(token, target="remote_mvc.model") == ("ctl", "controller")


class Monotonic:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_nonce_memory_survives_a_wall_clock_step_backwards(creds):
    """Nonces are forgotten by monotonic age, so a clock stepped back neither keeps them forever
    (every handshake rescanning a huge cache) nor lets a remembered one be replayed."""
    wall, mono = Clock(10_000.0), Monotonic()
    a = Authenticator(creds, wall, max_skew=30, monotonic=mono)
    tokens = [client_token("ctl", "new-secret", T, wall) for _ in range(50)]
    for token in tokens:
        a.authenticate(token, target=T)
    wall.now -= 3600  # the wall clock steps back an hour: old tokens are stale, not replayable
    with pytest.raises(AuthenticationError):
        a.authenticate(tokens[0], target=T)
    mono.now += 61  # twice the skew later, the 50 old nonces are gone
    a.authenticate(client_token("ctl", "new-secret", T, wall), target=T)
    assert a.remembered == 1


def test_nonce_memory_is_bounded_and_never_reopens_a_replay(creds):
    wall, mono = Clock(), Monotonic()
    a = Authenticator(creds, wall, max_skew=30, monotonic=mono, max_nonces=10)
    first = client_token("ctl", "new-secret", T, wall)
    a.authenticate(first, target=T)
    for _ in range(20):
        wall.now += 0.01
        a.authenticate(client_token("ctl", "new-secret", T, wall), target=T)
    assert a.remembered <= 10
    with pytest.raises(AuthenticationError, match="replayed"):  # forgotten early, still refused
        a.authenticate(first, target=T)
