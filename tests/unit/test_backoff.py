import random

import pytest

from remote_mvc._backoff import Backoff


def test_the_window_doubles_up_to_the_cap_and_each_delay_falls_inside_it():
    b = Backoff(0.1, 1.0, rng=random.Random(7))
    ceilings = []
    for _ in range(8):
        ceilings.append(b.ceiling())
        delay = b.next()
        assert 0.0 <= delay <= ceilings[-1]
    assert ceilings == [0.1, 0.2, 0.4, 0.8, 1.0, 1.0, 1.0, 1.0]
    b.reset()
    assert b.ceiling() == 0.1 and b.attempt == 0


def test_clients_that_failed_together_spread_over_the_window():
    """Full jitter: 1,000 clients at the same attempt draw delays over the whole window, not one value."""
    rng = random.Random(1)
    delays = []
    for _ in range(1000):
        b = Backoff(0.05, 4.0, rng=rng)
        for _ in range(10):  # ten failures: the window is at its cap
            delay = b.next()
        delays.append(delay)
    buckets = [0] * 8  # eighths of the 4 s window
    for d in delays:
        buckets[min(7, int(d / 0.5))] += 1
    assert min(buckets) > 80 and max(buckets) < 170, buckets
    assert len(set(delays)) == 1000


def test_a_window_needs_a_positive_base_below_the_cap():
    with pytest.raises(ValueError):
        Backoff(0.0, 1.0)
    with pytest.raises(ValueError):
        Backoff(2.0, 1.0)
    assert Backoff(huge := 1.0, 1.0).ceiling() == huge
    b = Backoff(0.05, 3.0)
    b.attempt = 10_000  # no overflow after a very long outage
    assert b.ceiling() == 3.0
