"""A stopping viewer host unsubscribes (viewer.unsubscribe): once more after a timeout (a slow server), not
after a refusal."""

import time

from Pyro5.errors import ConnectionClosedError
from Pyro5.errors import TimeoutError as PyroTimeout

from remote_mvc.viewer import unsubscribe


class StubClient:
    """A model client whose unsubscribe calls have the given outcomes, in order."""

    def __init__(self, *outcomes):
        self.outcomes = list(outcomes)
        self.calls = 0
        self.closed = 0

    def unsubscribe(self, sid):
        self.calls += 1
        outcome = self.outcomes.pop(0)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    def close(self):
        self.closed += 1


def test_a_timed_out_unsubscribe_is_tried_again_on_a_fresh_connection():
    client = StubClient(PyroTimeout("receiving: timeout"), True)
    assert unsubscribe(client, "v/1", time.monotonic() + 60) is None
    assert (client.calls, client.closed) == (2, 1)


def test_no_second_try_once_the_stop_has_no_time_left():
    client = StubClient(PyroTimeout("receiving: timeout"), True)
    error = unsubscribe(client, "v/1", time.monotonic())
    assert isinstance(error, PyroTimeout) and client.calls == 1


def test_a_server_that_is_gone_is_not_waited_for():
    client = StubClient(ConnectionClosedError("connection lost"), True)
    error = unsubscribe(client, "v/1", time.monotonic() + 60)
    assert isinstance(error, ConnectionClosedError) and client.calls == 1
