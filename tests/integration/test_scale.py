"""1,000 viewers (four viewer daemons of 250) on one model server process: no thread or connection exhaustion."""

import pytest

from remote_mvc.testing import wait_until

pytestmark = pytest.mark.slow


def test_thousand_viewers_each_get_every_change(mvc_stack):
    server = mvc_stack.process("model", lease_seconds=20.0, call_timeout=10.0)
    server.wait_for_log(lambda r: r.get("event") == "registered", 15)
    hosts = [mvc_stack.viewers(250, prefix=f"p{i}", lease_seconds=20.0, call_timeout=10.0)[1] for i in range(4)]
    views = [v for vs in hosts for v in vs]
    rm = mvc_stack.client(call_timeout=10.0)
    wait_until(lambda: len(rm.viewers()) == 1000, 60, message="1000 subscriptions")
    for i in range(1, 4):
        rm.modify({"value": i})
    for v in views:
        assert v.wait_for(3, 60), f"{v.viewer_id} at {v.revision}"
        assert v.received == sorted(set(v.received)) and v.received[-1] == 3
    assert not server.events("viewer_dropped")
