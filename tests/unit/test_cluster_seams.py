"""Cluster mode's seams that need no etcd: the MVC_STORE setting, the viewer's epoch rule and the
store interface."""

import pytest

from remote_mvc import ConfigError, Settings, Viewer
from remote_mvc.store import ReadableStore, SQLiteStore, Store, is_etcd, open_store


def test_store_setting_is_sqlite_by_default_or_etcd_endpoints():
    assert Settings().store == "sqlite" and Settings().etcd_endpoints() == []
    s = Settings.from_env({"MVC_STORE": "http://10.0.0.1:2379, http://10.0.0.2:2379/"})
    assert s.etcd_endpoints() == ["http://10.0.0.1:2379", "http://10.0.0.2:2379"] and is_etcd(s.store)
    for bad in ("etcd", "10.0.0.1:2379", "http://host"):
        with pytest.raises(ConfigError, match="MVC_STORE"):
            Settings(store=bad)


def test_the_sqlite_store_satisfies_the_store_interface(tmp_path):
    store = open_store(Settings(state_dir=str(tmp_path)))
    try:
        assert isinstance(store, SQLiteStore) and isinstance(store, Store) and isinstance(store, ReadableStore)
    finally:
        store.close()


def event(revision, value, epoch):
    return {"model": "m", "revision": revision, "time": 0.0, "identity": "c",
            "changes": {"value": {"old": None, "new": value}}, "values": {"value": value}, "epoch": epoch}


def test_a_viewer_that_meets_another_epoch_takes_a_snapshot_instead_of_mixing_histories():
    v = Viewer("v", "m", record=True, log_values=False)
    v.accept_capability("cap")  # as its subscribe reply gives it; every notification carries it
    v.fetch_snapshot = lambda: {"model": "m", "revision": 2, "values": {"value": 20}, "epoch": "new"}
    v.notify({"capability": "cap", "snapshot": {"model": "m", "revision": 5, "values": {"value": 5}, "epoch": "old"}})
    v.notify({"capability": "cap", "events": [event(6, 6, "old")]})
    assert (v.revision, v.epoch) == (6, "old")
    v.notify({"capability": "cap", "events": [event(7, 7, "new")]})  # another incarnation's revision 7
    assert (v.revision, v.values, v.epoch, v.snapshots) == (2, {"value": 20}, "new", 2)
    assert v.received == [5, 6, 2]
