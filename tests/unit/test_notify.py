"""Both ends of the notify protocol (remote_mvc.pyro.notify), checked against Pyro5's own messages."""

import pytest
from Pyro5 import errors, protocol
from Pyro5.serializers import serializers

from remote_mvc.pyro import notify
from remote_mvc.pyro.wire import HEADER_SIZE, parse_header

JSON = serializers["json"]


class Viewer:
    _mvc_notify = True


class Conn:
    """A connection's attributes, as the viewer daemon keeps them."""


def pyro_call(obj, method, params, kwargs=None, serializer=JSON, flags=0, annotations=None):
    body = serializer.dumpsCall(obj, method, params, kwargs or {})
    return protocol.SendingMessage(protocol.MSG_INVOKE, flags, 9, serializer.serializer_id, body,
                                   annotations=annotations).data


def test_the_marker_is_the_viewer_class_attribute():
    from remote_mvc.viewer import Viewer as RealViewer

    assert notify.NOTIFY_MARKER == "_mvc_notify" and notify.takes_notify(RealViewer) and not notify.takes_notify(Conn)


def test_the_daemon_takes_exactly_the_senders_calls_on_the_short_path():
    objects = {"viewer.v": Viewer(), "other": Conn()}
    batch = {"capability": "c", "model": "m", "events": []}
    sent = notify.pack_call(3, notify.envelope("viewer.v", "c"), b'{"model":"m","events":[]}', two_way=False)
    header = parse_header(sent[:HEADER_SIZE])
    assert notify.parse_call(header, sent, objects) == (objects["viewer.v"], batch) and notify.is_oneway(header)
    for other in (pyro_call("viewer.v", "notify", [batch]),):  # Pyro5's own client makes the same call
        assert notify.parse_call(parse_header(other[:HEADER_SIZE]), other, objects)[1] == batch
    refused = [
        pyro_call("other", "notify", [batch]),  # an object that does not take them
        pyro_call("viewer.v", "notify", [batch, 1]),  # another signature
        pyro_call("viewer.v", "notify", [batch], {"x": 1}),
        pyro_call("viewer.v", "renew", [batch]),
        pyro_call("viewer.v", "notify", [batch], serializer=serializers["serpent"]),
        pyro_call("viewer.v", "notify", [batch], annotations={"XYZW": b"1"}),
        pyro_call("ghost", "notify", [batch]),
    ]
    for message in refused:
        assert notify.parse_call(parse_header(message[:HEADER_SIZE]), message, objects) is None


def test_the_answer_is_the_failure_count_since_the_last_answer():
    conn = Conn()
    msg = protocol.ReceivingMessage(notify.answer(conn, 5)[:HEADER_SIZE])
    assert msg.type == protocol.MSG_RESULT and msg.seq == 5
    notify.record_oneway_failure(conn)
    notify.record_oneway_failure(conn)
    reader = notify.AnswerReader()
    data = notify.answer(conn, 6) + notify.answer(conn, 7)
    assert reader.feed(data[:30]) == []  # a partial header waits
    assert reader.feed(data[30:]) == [notify.Answer(False, 2), notify.Answer(False, 0)]  # the count resets


def test_the_sender_reads_pyro5_answers_exceptions_and_nulls():
    reader = notify.AnswerReader()
    exc = protocol.SendingMessage(protocol.MSG_RESULT, protocol.FLAGS_EXCEPTION, 1, 3, b'"boom"').data
    null = protocol.SendingMessage(protocol.MSG_RESULT, 0, 2, 3, b"null").data  # a plain Pyro5 daemon
    assert reader.feed(exc + null) == [notify.Answer(True, 1), notify.Answer(False, 0)]
    assert notify.failures(b"-3") == 0 and notify.failures(b"junk") == 0 and notify.failures(b"4") == 4


def test_the_sender_never_buffers_a_large_or_foreign_answer():
    big = protocol.SendingMessage(protocol.MSG_RESULT, 0, 1, 3, b"0" * (notify.MAX_ANSWER + 1)).data
    with pytest.raises(errors.ProtocolError, match="at most"):
        notify.AnswerReader().feed(big[:HEADER_SIZE])  # refused on its header alone
    with pytest.raises(errors.ProtocolError, match="invalid"):
        notify.AnswerReader().feed(b"HTTP/1.1 200 OK\r\n" + b"x" * 40)
