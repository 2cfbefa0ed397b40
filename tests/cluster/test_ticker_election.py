"""Ticker replicas in cluster mode: one active ticker, elected through an etcd lease; a killed one is
replaced within a few seconds and no tick is ever made twice. Real etcd, real ticker processes."""

from __future__ import annotations

import signal
import time

import pytest
from kit import all_history, etcd_cluster, retrying

from remote_mvc.testing import Stack, wait_until

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def etcd(tmp_path_factory):
    cluster = etcd_cluster(tmp_path_factory.mktemp("etcd-ticker"), size=1)
    yield cluster
    cluster.stop()


def leader(tickers):
    """The tickers whose last election log line says they lead."""
    leading = []
    for name, proc in tickers.items():
        lines = [r for r in proc.lines if r.get("event") in ("elected", "deposed")]
        if lines and lines[-1]["event"] == "elected" and proc.proc.poll() is None:
            leading.append(name)
    return leading


def test_one_ticker_ticks_a_killed_one_is_replaced_and_no_tick_doubles(tmp_path, etcd):
    stack = Stack(tmp_path, store=etcd.store_setting, etcd_prefix=f"/ticker-{time.monotonic_ns()}",
                  call_timeout=3.0).start()
    try:
        tickers = {}
        for i in range(3):
            proc = stack.process("ticker", name=f"ticker-t{i}", replica=f"t{i}", ticker_interval=0.05)
            proc.wait_for_log(lambda r: r.get("event") == "registered", 30)
            tickers[f"t{i}"] = proc
        client = stack.client("controller", model=stack.settings.ticker_name, retry_seconds=30)
        wait_until(lambda: retrying(client.snapshot)["values"]["tick"] >= 20, 30, message="ticks")
        first = wait_until(lambda: leader(tickers), 10, message="a leader")
        assert len(first) == 1
        tickers[first[0]].signal(signal.SIGKILL)
        tickers[first[0]].proc.wait(10)
        killed_at = retrying(client.snapshot)["values"]["tick"]
        # replaced within the lease's ttl (3 s) and a few election rounds
        second = wait_until(lambda: leader(tickers), 10, message="another leader")
        assert len(second) == 1 and second != first
        wait_until(lambda: retrying(client.snapshot)["values"]["tick"] >= killed_at + 20, 30,
                   message="ticks from the new leader")
        tickers[second[0]].stop()  # a leader that stops resigns: the third takes over at once
        third = wait_until(lambda: leader(tickers), 10, message="the last leader")
        assert third not in (first, second)
        now = retrying(client.snapshot)["values"]["tick"]
        wait_until(lambda: retrying(client.snapshot)["values"]["tick"] >= now + 10, 30, message="more ticks")
        ticks = [e["values"]["tick"] for e in retrying(lambda: all_history(client)) if "tick" in e["changes"]]
        assert ticks == list(range(1, len(ticks) + 1)), "a tick was made twice or skipped"
    finally:
        stack.close()
