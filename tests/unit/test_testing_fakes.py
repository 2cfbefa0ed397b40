"""The testing kit's in-memory fakes: a handler is unit-tested with the production Viewer code,
no daemon, socket or thread, and the fakes answer as the model server does."""

import threading

import pytest

from remote_mvc import (
    ConflictError,
    ExampleModel,
    HistoryCompacted,
    PermissionDenied,
    ValidationError,
    Viewer,
)
from remote_mvc.testing import FakeModel, FakeViewerHost


def recording_viewer(model, viewer_id="v", **kwargs):
    seen = []
    viewer = Viewer(viewer_id, model.name, log_values=False, record=True,
                    on_change=lambda v, e: seen.append((v.revision, None if e is None else e["changes"])), **kwargs)
    return viewer, seen


def test_a_handler_sees_the_subscribe_snapshot_then_each_change_in_the_calling_thread():
    model = FakeModel(ExampleModel, clock=lambda: 5.0)
    host = FakeViewerHost(model)
    threads = []
    viewer = host.add(Viewer("v", model.name, log_values=False,
                             on_change=lambda v, e: threads.append(threading.current_thread())))
    assert model.modify({"value": 3}) == 1
    assert model.modify({"name": "n"}, expected_revision=1) == 2
    assert viewer.values == {"name": "n", "value": 3} and viewer.revision == 2
    assert threads == [threading.current_thread()] * 3  # the snapshot and two changes, synchronously
    event = model.history(1)[0]
    assert event == {"model": model.name, "revision": 2, "time": 5.0, "identity": "test",
                     "changes": {"name": {"old": "xxx", "new": "n"}}, "values": {"name": "n", "value": 3}}


def test_the_fake_refuses_as_the_model_server_does():
    model = FakeModel(ExampleModel)
    model.modify({"value": 1})
    with pytest.raises(ConflictError, match="expected revision 0, model is at 1"):
        model.modify({"value": 2}, expected_revision=0)
    with pytest.raises(ValidationError):
        model.modify({"colour": "red"})
    with pytest.raises(ValidationError):
        model.modify({"value": "ninety"})
    assert model.revision == 1 and model.query() == {"name": "xxx", "value": 1}
    assert model.schema() == ExampleModel.describe()


def test_a_held_batch_arrives_at_once_and_duplicates_are_skipped():
    model = FakeModel()
    host = FakeViewerHost(model)
    viewer, seen = recording_viewer(model)
    host.add(viewer)
    host.pause()
    for i in range(1, 4):
        model.modify({"value": i})
    assert viewer.revision == 0
    host.resume()
    assert viewer.received == [0, 1, 2, 3]
    viewer.notify({"capability": viewer.capability, "events": model.history(0)})  # a resend
    assert viewer.received == [0, 1, 2, 3] and [r for r, _ in seen] == [0, 1, 2, 3]


def test_a_lost_notification_is_a_gap_filled_from_the_fakes_history():
    model = FakeModel()
    host = FakeViewerHost(model)
    viewer, seen = recording_viewer(model)
    host.add(viewer)
    host.lose(2)
    for i in range(1, 4):
        model.modify({"value": i})
    assert viewer.received == [0, 1, 2, 3]  # 1 and 2 from history when 3 arrived
    assert seen[1:] == [(r, {"value": {"old": r - 1, "new": r}}) for r in (1, 2, 3)]


def test_a_gap_past_the_history_is_a_snapshot():
    model = FakeModel(history_limit=2)
    host = FakeViewerHost(model)
    viewer, seen = recording_viewer(model)
    host.add(viewer)
    host.lose(4)
    for i in range(1, 6):
        model.modify({"value": i})
    with pytest.raises(HistoryCompacted):
        model.history(0)
    assert viewer.revision == 5 and viewer.values["value"] == 5
    assert viewer.snapshots == 2 and seen[-1] == (5, None)  # the subscribe one and the re-sync


def test_a_notification_without_the_capability_is_refused_and_a_removed_viewer_hears_nothing():
    model = FakeModel()
    host = FakeViewerHost(model)
    viewer, _ = recording_viewer(model)
    host.add(viewer)
    with pytest.raises(PermissionDenied):
        viewer.notify({"capability": "guessed", "events": []})
    host.remove(viewer)
    model.modify({"value": 1})
    assert viewer.revision == 0
    with pytest.raises(ValidationError):
        host.add(Viewer("w", "another.model", log_values=False))
