"""The gateway's relay (remote_mvc.gateway._relay): buffers, snapshots owed, epochs."""

from __future__ import annotations

import asyncio

import pytest

pytest.importorskip("starlette", reason="the gateway extra (pip install -e '.[gateway]')")

from remote_mvc import Metrics  # noqa: E402
from remote_mvc.gateway._relay import Feed  # noqa: E402


def event(revision: int, value: int, **extra) -> dict:
    return {"model": "m", "revision": revision, "time": 1.0, "identity": "controller",
            "changes": {"value": {"old": value - 1, "new": value}}, "values": {"value": value}, **extra}


@pytest.fixture
def feed():
    loop = asyncio.new_event_loop()  # StreamClient's asyncio.Event wants a loop on older Pythons
    asyncio.set_event_loop(loop)
    f = Feed("m", ring_size=3, client_buffer=2, metrics=Metrics())
    f.on_snapshot(0, {"value": 0}, 1.0)
    yield f
    asyncio.set_event_loop(None)
    loop.close()


def test_overflow_owes_a_snapshot_and_drops_the_backlog(feed):
    client = feed.attach()
    assert feed.plan(client, 0, feed.epoch) is None and client.sent == 0
    feed.on_event(event(1, 1))
    feed.on_event(event(2, 2))
    assert [r for r, _ in client.buffer] == [1, 2] and client.resync is None
    feed.on_event(event(3, 3))
    assert not client.buffer and client.resync == "slow"
    feed.on_event(event(4, 4))
    assert not client.buffer  # nothing queued behind an owed snapshot


def test_ring_resume_history_fallback_and_snapshot_reasons(feed):
    for r in range(1, 6):
        feed.on_event(event(r, r))
    assert [r for r, _ in feed.ring] == [3, 4, 5]
    c = feed.attach()
    assert feed.plan(c, 2, feed.epoch) is None and [r for r, _ in c.buffer] == [3, 4, 5]
    c = feed.attach()
    assert feed.plan(c, 1, None) == "history"
    feed.backfill(c, 1, [event(2, 2), event(3, 3)], upto=5)  # does not reach 5
    assert c.resync == "behind"
    c = feed.attach()
    assert feed.plan(c, 1, None) == "history"
    feed.backfill(c, 1, [event(r, r) for r in (2, 3, 4, 5)], upto=5)
    assert [r for r, _ in c.buffer] == [2, 3, 4, 5] and c.resync is None
    for since, epoch, reason in ((None, None, "initial"), (9, None, "ahead"), (5, "x", "epoch")):
        c = feed.attach()
        feed.plan(c, since, epoch)
        assert c.resync == reason


def test_revision_going_backwards_is_a_new_epoch(feed):
    feed.on_event(event(1, 1))
    first = feed.epoch
    client = feed.attach()
    feed.plan(client, 1, first)
    feed.on_snapshot(0, {"value": 0}, 2.0)  # the model server came back with fresh state
    assert feed.epoch != first and client.resync == "resync" and not feed.ring
    feed.on_event(event(1, 7, epoch="server-2"))  # an epoch from the model server itself
    assert feed.epoch.startswith("server-2") and feed.values == {"value": 7}
