"""Cluster mode under faults: real etcd members (3, on loopback, one cluster for the module), real
model-server replica processes, 4 controllers writing, 6 viewers spread over the replicas.

Every test ends with the same check, from the controllers' own records: zero acknowledged changes
lost, zero applied twice, every viewer saw every revision once and in order (or an explicit
snapshot), every viewer converged on the final state.
"""

from __future__ import annotations

import signal

import pytest
from kit import CuttableProxy, all_history, etcd_cluster, retrying
from scenario import Scenario, viewer_replica_spread

from remote_mvc import ServiceUnavailable
from remote_mvc.client import resolve_all
from remote_mvc.testing import wait_until

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def etcd(tmp_path_factory):
    cluster = etcd_cluster(tmp_path_factory.mktemp("etcd3"), size=3)
    yield cluster
    cluster.stop()


@pytest.fixture
def scenario(tmp_path, etcd):
    s = Scenario(tmp_path, etcd)
    yield s
    s.close()


def test_sigkill_of_a_replica_under_load(scenario):
    viewer_replica_spread(scenario)
    scenario.wait_progress(40)
    victim = sorted(scenario.replicas_serving_viewers())[0]
    scenario.replicas[victim].signal(signal.SIGKILL)
    scenario.wait_progress(80)  # controllers and the victim's viewers moved to the others
    # the dead replica's lease ran out: the others removed its name, clients no longer try it
    settings = scenario.stack.settings
    wait_until(lambda: len(resolve_all(settings.model_name, settings)) == 2, 30, message="victim's name removed")
    scenario.finish()


def test_sigkill_of_one_etcd_member_of_three_and_its_return(scenario, etcd):
    scenario.wait_progress(30)
    etcd.kill(0)  # every replica's first endpoint: they move to the others
    scenario.wait_progress(60)
    etcd.start(0)
    scenario.wait_progress(60)
    scenario.finish()


def test_a_replica_cut_off_from_etcd_refuses_writes_and_stale_reads_then_catches_up(tmp_path, etcd):
    proxies = [CuttableProxy(m.client_port).start() for m in etcd.members]
    cut_store = ",".join(p.url for p in proxies)
    s = Scenario(tmp_path, etcd, replica_overrides={"r0": {"store": cut_store}})
    try:
        viewer_replica_spread(s)
        s.wait_progress(30)
        r0 = s.replica_client("r0")
        assert r0.snapshot()["stale"] is False
        for p in proxies:
            p.cut()
        with pytest.raises(ServiceUnavailable):
            r0.modify({"value": -1})  # never acknowledged, never applied later (checked by finish)
        wait_until(lambda: r0.snapshot()["stale"], 15, message="r0 says its state may be stale")
        with pytest.raises(ServiceUnavailable):
            r0.query()
        s.wait_progress(60)  # the controllers go on through the other replicas
        # its siblings remove r0's name once its liveness key expires, and r0 does not put it back
        # while it is cut off: its name does not flap in and out, clients are not sent to it
        settings = s.stack.settings
        wait_until(lambda: s.replicas["r0"].events("registration_held"), 30, message="r0 holding its name back")
        registered = len(s.replicas["r0"].events("registered"))
        s.wait_progress(30)  # many registration rounds of r0 (every 0.5 s)
        assert len(s.replicas["r0"].events("registered")) == registered, "r0 put its name back while cut off"
        assert len(resolve_all(settings.model_name, settings)) == 2
        for p in proxies:
            p.restore()
        # found by name again once it is back in touch (not stale) and has registered
        wait_until(lambda: retrying(lambda: not r0.snapshot()["stale"], 15), 15, message="r0 back in touch with etcd")
        wait_until(lambda: len(resolve_all(settings.model_name, settings)) == 3, 15, message="r0's name back")
        s.wait_progress(30)
        counts = s.finish()
        assert all(e["values"]["value"] != -1 for e in all_history(s.reader))
        assert counts["acked"] > 0
    finally:
        s.close()
        for p in proxies:
            p.close()


def test_loss_of_quorum_refuses_writes_says_reads_may_be_stale_and_loses_nothing(scenario, etcd):
    scenario.wait_progress(30)
    direct = scenario.replica_client("r1")
    etcd.pause(1)
    etcd.pause(2)
    try:
        with pytest.raises(ServiceUnavailable):
            direct.modify({"value": -2})
        wait_until(lambda: direct.snapshot()["stale"], 15, message="replica says its state may be stale")
        with pytest.raises(ServiceUnavailable):
            direct.query()
    finally:
        etcd.resume(1)
        etcd.resume(2)
    etcd.wait_healthy()
    wait_until(lambda: not direct.snapshot()["stale"], 15, message="fresh again")
    scenario.wait_progress(40)
    # the controllers retried through the outage with their request ids: no error reached them,
    # unless the outage outlasted their retry budget; either way nothing acknowledged is lost
    scenario.finish(allow_refusals=True)
    # every replica lived through it: none took another for dead when their leases went with the
    # quorum (the first one back waits a lease's time before judging its siblings)
    assert [e for proc in scenario.replicas.values() for e in proc.events("replica_removed")] == []


def test_rolling_restart_of_all_replicas_while_controllers_write(scenario):
    viewer_replica_spread(scenario)
    scenario.wait_progress(30)
    for name in list(scenario.replicas):
        scenario.replicas[name].stop()
        scenario.wait_progress(15)
        scenario.start_replica(name)
        scenario.wait_progress(15)
    scenario.finish()  # no controller saw an error


def test_etcd_data_wiped_and_recreated_under_running_viewers_gives_a_new_epoch(scenario, etcd):
    scenario.wait_progress(30)
    first = scenario.finish()
    old_epoch = scenario.reader.snapshot()["epoch"]
    assert all(v.epoch == old_epoch for v in scenario.viewers)
    snapshots = {v.viewer_id: v.snapshots for v in scenario.viewers}
    etcd.wipe()  # the last test of the module: the cluster is new from here on
    new = retrying(lambda: scenario.reader.modify({"name": "after-wipe"}), 60)
    head = retrying(lambda: scenario.reader.snapshot(), 30)
    assert head["epoch"] != old_epoch and head["revision"] == new
    for v in scenario.viewers:
        wait_until(lambda v=v: v.epoch == head["epoch"] and v.values == head["values"], 60,
                   message=f"{v.viewer_id} on the new epoch")
        assert v.snapshots > snapshots[v.viewer_id]  # resnapshotted, never mixed two histories
    assert first["acked"] > 0
