"""The wire shape check: each refused form of a Pyro5 message, decided on its header alone."""

import pytest
from Pyro5 import protocol
from Pyro5.errors import ProtocolError

from remote_mvc.pyro.wire import HEADER_SIZE, Limits, WireRefused, check, parse_header

SERPENT, MARSHAL, JSON = 1, 2, 3  # Pyro5's serializer ids
LIMITS = Limits(handshake=4096, anonymous=1000, authenticated=5000, annotations=64)
CALLS = frozenset({protocol.MSG_INVOKE, protocol.MSG_PING})


def header(mtype=protocol.MSG_INVOKE, serializer=SERPENT, flags=0, data=b"x" * 10, annotations=None):
    raw = bytearray(protocol.SendingMessage(mtype, 0, 7, serializer, data, annotations=annotations).data)
    raw[8:10] = flags.to_bytes(2, "big")  # as a peer may set them (SendingMessage would drop some)
    return parse_header(bytes(raw[:HEADER_SIZE]))


def test_a_plain_call_passes_and_is_parsed():
    h = header(data=b"abc")
    check(h, types=CALLS, limit=LIMITS.anonymous, limits=LIMITS)
    assert (h.type, h.serializer_id, h.seq, h.data_size) == (protocol.MSG_INVOKE, SERPENT, 7, 3)


@pytest.mark.parametrize("flag,name", [
    (protocol.FLAGS_KEEPSERIALIZED, "keep-serialized"),  # the BLBI blob that reaches marshal.loads
    (protocol.FLAGS_COMPRESSED, "compressed"),
    (protocol.FLAGS_BATCH, "batch"),
    (protocol.FLAGS_ONEWAY, "oneway"),
    (protocol.FLAGS_EXCEPTION, "exception"),
    (protocol.FLAGS_ITEMSTREAMRESULT, "stream"),
    (1 << 12, "0x1000"),
])
def test_every_flag_but_the_correlation_id_is_refused(flag, name):
    with pytest.raises(WireRefused, match=name):
        check(header(flags=flag), types=CALLS, limit=LIMITS.anonymous, limits=LIMITS)
    check(header(flags=protocol.FLAGS_CORR_ID), types=CALLS, limit=LIMITS.anonymous, limits=LIMITS)


def test_oneway_only_where_the_daemon_takes_it():
    check(header(flags=protocol.FLAGS_ONEWAY), types=CALLS, limit=100, limits=LIMITS, oneway=True)
    with pytest.raises(WireRefused, match="keep-serialized"):
        check(header(flags=protocol.FLAGS_ONEWAY | protocol.FLAGS_KEEPSERIALIZED), types=CALLS, limit=100,
              limits=LIMITS, oneway=True)


@pytest.mark.parametrize("serializer", [MARSHAL, 4, 0, 255])  # 4: msgpack
def test_only_serpent_and_json(serializer):
    with pytest.raises(WireRefused, match="serializer"):
        check(header(serializer=serializer), types=CALLS, limit=100, limits=LIMITS)
    check(header(serializer=JSON), types=CALLS, limit=100, limits=LIMITS)


def test_sizes_are_bounded_before_anything_is_read():
    check(header(data=b"x" * 1000), types=CALLS, limit=LIMITS.anonymous, limits=LIMITS)
    with pytest.raises(WireRefused, match="1001 bytes"):
        check(header(data=b"x" * 1001), types=CALLS, limit=LIMITS.anonymous, limits=LIMITS)
    with pytest.raises(WireRefused, match="annotations"):
        check(header(data=b"", annotations={"XXXX": b"y" * 100}), types=CALLS, limit=LIMITS.authenticated,
              limits=LIMITS)
    # a header announcing 4 GiB is refused from its 40 bytes
    raw = bytearray(protocol.SendingMessage(protocol.MSG_INVOKE, 0, 1, SERPENT, b"").data)
    raw[12:16] = (2**32 - 1).to_bytes(4, "big")
    with pytest.raises(WireRefused, match="at most"):
        check(parse_header(bytes(raw[:HEADER_SIZE])), types=CALLS, limit=LIMITS.authenticated, limits=LIMITS)


def test_message_types_by_phase():
    with pytest.raises(WireRefused, match="type"):
        check(header(mtype=protocol.MSG_INVOKE), types=frozenset({protocol.MSG_CONNECT}), limit=100, limits=LIMITS)
    for mtype in (protocol.MSG_CONNECT, protocol.MSG_RESULT, protocol.MSG_CONNECTOK, 99):
        with pytest.raises(WireRefused, match="type"):
            check(header(mtype=mtype), types=CALLS, limit=100, limits=LIMITS)


def test_garbage_is_not_a_header():
    with pytest.raises(ProtocolError):
        parse_header(b"GET / HTTP/1.1\r\nHost: x\r\n\r\nGET / HTTP/1.1\r\n\r\n")
    with pytest.raises(ProtocolError):
        parse_header(b"PYRO")
