"""The subscription policy (remote_mvc.subscriptions) on its own: owners, caps, callback hosts,
stream members. Subscriptions are put straight into a real fan-out's registry: no loop thread
runs, no viewer is connected, no daemon answers."""

import threading

import pytest

from remote_mvc import LimitExceeded, Metrics, PermissionDenied, ValidationError
from remote_mvc.auth import host_of
from remote_mvc.fanout import Fanout, Subscription
from remote_mvc.fanout.cursor import Cursor
from remote_mvc.fanout.window import Window
from remote_mvc.subscriptions import Caller, Subscriptions

ALICE = Caller("alice", "controller", "10.0.0.1:5000")
BOB = Caller("bob", "controller", "10.0.0.2:5000")
ADMIN = Caller("admin", "admin", "10.0.0.3:5000")
ANON_A = Caller("anonymous", "viewer", "10.0.0.4:5000")
ANON_A2 = Caller("anonymous", "viewer", "10.0.0.4:6000")  # the same host, another port
ANON_B = Caller("anonymous", "viewer", "10.0.0.5:5000")


@pytest.fixture
def policy():
    fanout = Fanout("m", lambda: {"revision": 0, "values": {}}, Metrics())
    subs = Subscriptions(fanout, threading.RLock(), max_per_identity=3, max_per_address=2,
                         callback_hosts=[" nat.example ", ""], max_members=4)
    yield subs
    fanout.close()


def hold(policy, viewer_id, caller):
    """A subscription of ``caller``'s, registered in the fan-out as its ``add`` would (no connection)."""
    fanout = policy.fanout
    sub = Subscription(viewer_id, f"PYRO:{viewer_id}@{caller.host}:9999", fanout.clock() + 60,
                       Cursor(fanout.stream, fanout.snapshot), Window(oneway=True, event_limit=10),
                       caller.identity, caller.host)
    old = policy.admit(caller, viewer_id, None, None)
    fanout.registry.add(sub)
    policy.added(sub, old, None)
    return sub


def test_the_host_of_an_address():
    assert host_of("10.0.0.1:5000") == "10.0.0.1" and host_of("[::1]:5000") == "::1" and host_of(None) is None
    assert ALICE.host == "10.0.0.1" and ADMIN.admin and not ALICE.admin and ANON_A.anonymous


def test_only_the_owner_or_an_admin_owns_a_subscription(policy):
    mine = hold(policy, "v1", ALICE)
    assert policy.owns(mine, ALICE) and policy.owns(mine, ADMIN) and not policy.owns(mine, BOB)
    assert policy.owns(mine, Caller("alice", "controller", "10.9.9.9:1"))  # an identity owns from anywhere
    anon = hold(policy, "v2", ANON_A)
    assert policy.owns(anon, ANON_A2) and not policy.owns(anon, ANON_B)  # anonymous: by its host alone


def test_a_capability_proves_a_subscription_only_when_it_is_its_own(policy):
    sub = hold(policy, "v1", ALICE)
    assert policy.shows(sub, sub.capability)
    assert not policy.shows(sub, None) and not policy.shows(sub, "x" + sub.capability[1:])
    assert not policy.shows(sub, "\udcff")  # a lone surrogate is compared, not crashed on


@pytest.mark.parametrize("uri", ["nonsense", "PYRO:obj@./u:/tmp/sock", "PYRONAME:viewer", "PYRO:obj@10.0.0.1"])
def test_a_callback_that_is_no_pyro_host_port_uri_is_invalid(policy, uri):
    with pytest.raises(ValidationError):
        policy.check_callback(uri, "10.0.0.1")


def test_a_callback_goes_to_the_subscribers_own_host_or_an_allowed_one(policy):
    policy.check_callback("PYRO:obj@10.0.0.1:7000", "10.0.0.1")
    policy.check_callback("PYRO:obj@nat.example:7000", "10.0.0.1")  # MVC_CALLBACK_HOSTS
    policy.check_callback("PYRO:obj@10.7.7.7:7000", None)  # an in-process caller
    with pytest.raises(PermissionDenied, match="not the subscriber's own address"):
        policy.check_callback("PYRO:obj@10.7.7.7:7000", "10.0.0.1")
    policy.callback_hosts = frozenset({"*"})  # the operator turned the check off
    policy.check_callback("PYRO:obj@10.7.7.7:7000", "10.0.0.1")


def test_an_identity_holds_at_most_its_cap_and_a_replacement_adds_none(policy):
    for n in range(3):
        hold(policy, f"a{n}", ALICE)
    with pytest.raises(LimitExceeded, match="alice holds 3 subscriptions already"):
        policy.admit(ALICE, "a3", None, None)
    assert policy.admit(ALICE, "a0", None, None) is policy.fanout.of_viewer("a0")  # replacing its own
    hold(policy, "b0", BOB)  # another identity has its own count
    hold(policy, "x0", ADMIN)
    for n in range(4):
        hold(policy, f"adm{n}", ADMIN)  # admins are not bound


def test_anonymous_callers_are_capped_per_host(policy):
    hold(policy, "n0", ANON_A)
    hold(policy, "n1", ANON_A2)
    with pytest.raises(LimitExceeded, match="from 10.0.0.4 already"):
        policy.admit(ANON_A, "n2", None, None)
    hold(policy, "n2", ANON_B)  # another address


def test_another_clients_viewer_id_is_taken_over_only_with_its_capability(policy):
    sub = hold(policy, "shared", ALICE)
    with pytest.raises(PermissionDenied, match="subscribed by another client"):
        policy.admit(BOB, "shared", None, None)
    with pytest.raises(PermissionDenied):
        policy.admit(BOB, "shared", "wrong", None)
    assert policy.admit(BOB, "shared", sub.capability, None) is sub  # e.g. a host whose address changed
    assert policy.admit(ADMIN, "shared", None, None) is sub


@pytest.mark.parametrize(("members", "error"), [
    ("v1", ValidationError), (["a", "b", "c", "d", "e"], LimitExceeded), (["a", "a"], ValidationError),
    ([""], ValidationError), (["x" * 201], ValidationError), ([1], ValidationError)])
def test_a_bad_member_list_is_refused(policy, members, error):
    with pytest.raises(error):
        policy.valid_members(members)


def test_a_subscribe_request_is_checked_before_anything_else(policy):
    assert policy.check_request(ALICE, "PYRO:s@10.0.0.1:7000", "s", 3, "cap", "epoch", ["v1", "v2"]) == ("v1", "v2")
    assert policy.check_request(ALICE, "PYRO:s@10.0.0.1:7000", "s", None, None, None, None) is None
    for bad in [dict(viewer_id=""), dict(viewer_id="v" * 201), dict(callback_uri=7), dict(since_revision=True),
                dict(since_revision="3"), dict(capability=5), dict(epoch="e" * 65), dict(members="v1")]:
        args = dict(callback_uri="PYRO:s@10.0.0.1:7000", viewer_id="s", since_revision=None, capability=None,
                    epoch=None, members=None) | bad
        with pytest.raises(ValidationError):
            policy.check_request(ALICE, *args.values())
    with pytest.raises(PermissionDenied):
        policy.check_request(ALICE, "PYRO:s@10.7.7.7:7000", "s", None, None, None, None)


def test_a_streams_members_are_its_owners_and_listed_as_viewers(policy):
    stream = hold(policy, "host-1", ALICE)
    assert policy.set_members(ALICE, stream.id, ["v1", "v2"]) is True
    with pytest.raises(PermissionDenied, match="another client's"):
        policy.set_members(BOB, stream.id, ["v3"])
    assert policy.set_members(ALICE, "unknown/1", ["v1"]) is False
    with pytest.raises(PermissionDenied, match="'v1' is subscribed by another client"):
        policy.admit(BOB, "v1", None, None)  # a member id is held as a subscription's would be
    with pytest.raises(PermissionDenied):
        policy.admit(BOB, "host-2", None, ("v2",))  # and as another stream's member
    hold(policy, "v9", BOB)
    with pytest.raises(PermissionDenied):
        policy.set_members(ALICE, stream.id, ["v1", "v9"])  # nor may a stream claim another's viewer
    own_view = policy.describe(ALICE)
    assert sorted((e["viewer_id"], e.get("stream")) for e in own_view) == [
        ("v1", "host-1"), ("v2", "host-1"), ("v9", None)]
    assert {e["viewer_id"]: "subscription" in e for e in own_view} == {"v1": True, "v2": True, "v9": False}
    assert all("subscription" in e for e in policy.describe(ADMIN))


def test_members_count_against_the_owners_cap(policy):
    stream = hold(policy, "host-1", ALICE)
    policy.set_members(ALICE, stream.id, ["v1", "v2"])  # the stream counts as 2 of alice's 3
    hold(policy, "solo", ALICE)  # 3
    with pytest.raises(LimitExceeded, match="would hold 4 viewers"):
        policy.set_members(ALICE, stream.id, ["v1", "v2", "v3"])
    with pytest.raises(LimitExceeded):
        policy.admit(ALICE, "host-2", None, ("w1",))  # a second stream: one viewer too many
    policy.set_members(ALICE, stream.id, ["v1"])  # shrinking is fine
    policy.set_members(ADMIN, stream.id, ["v1", "v2", "v3", "v4"])  # an admin is not bound


def test_renew_renews_only_the_callers_own(policy):
    mine, theirs = hold(policy, "a", ALICE), hold(policy, "b", BOB)
    assert policy.renew(ALICE, [mine.id, theirs.id, "gone/1"]) == (["gone/1"], [theirs.id])
    assert policy.renew(ADMIN, [mine.id, theirs.id]) == ([], [])
    for bad in ["a", [1], None]:
        with pytest.raises(ValidationError):
            policy.renew(ALICE, bad)


def test_unsubscribe_and_drop_end_a_stream_and_forget_its_members(policy):
    stream = hold(policy, "host-1", ALICE)
    policy.set_members(ALICE, stream.id, ["v1", "v2"])
    with pytest.raises(PermissionDenied):
        policy.unsubscribe(BOB, stream.id)
    with pytest.raises(ValidationError):
        policy.unsubscribe(ALICE, 5)
    assert policy.unsubscribe(ALICE, stream.id) is True and policy.unsubscribe(ALICE, stream.id) is False
    assert policy.describe(ADMIN) == [] and policy.drop_viewer("v1") is False
    hold(policy, "v1", BOB)  # the ids are free again
    again = hold(policy, "host-1", ALICE)
    policy.set_members(ALICE, again.id, ["v2"])
    assert policy.drop_viewer("v2") is True  # a member takes its stream off
    assert policy.fanout.get(again.id) is None and policy.drop_viewer("v2") is False
    assert policy.drop_viewer("v1") is True and policy.drop_viewer("nobody") is False


def test_the_members_of_a_stream_the_fanout_lost_are_pruned(policy):
    stream = hold(policy, "host-1", ALICE)
    policy.set_members(ALICE, stream.id, ["v1"])
    policy.fanout.drop(stream, "lease_expired")  # what the reaper's expire does
    assert policy.live_members(stream.id) is None and policy.member_lists == 1
    hold(policy, "v1", BOB)  # a stale list holds no id
    policy.prune()
    assert policy.member_lists == 0
