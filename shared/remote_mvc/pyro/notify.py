"""Both ends of the ``notify`` protocol between a model server's fan-out and a viewer daemon.

The fan-out speaks Pyro5's wire protocol itself, without Pyro5's per-message
machinery: every call is a Pyro5 invoke message of ``notify(batch)`` in the JSON
serializer, packed here (:func:`pack_call`), byte for byte what Pyro5's own
``SendingMessage`` makes (the unit tests check it against Pyro5's parser). The
batch's text is made once for every viewer; the call's envelope around it (the
object id, and the subscription's secret capability first in the batch object)
once per subscriber (:func:`envelope`).

Calls may be oneway when the viewer takes them in order (remote-mvc's
:class:`~remote_mvc.pyro.daemons.ViewerDaemon`): the viewer runs them on the
connection's thread, counts the handlers that raised
(:func:`record_oneway_failure`), and the next two-way call is answered with that
count (:func:`answer`), which the sender reads back (:class:`AnswerReader`,
:func:`failures`). A plain Pyro5 daemon answers ``null``: no failures.

A viewer object takes calls on this short path when its class declares
:data:`NOTIFY_MARKER` true (see :func:`takes_notify`); the daemon recognises such a
call with :func:`parse_call`.
"""

from __future__ import annotations

import dataclasses
import json
import struct
from typing import Any

from Pyro5 import errors as pyro_errors
from Pyro5 import protocol
from Pyro5.serializers import serializers

from .wire import HEADER_SIZE, Header

__all__ = ["NOTIFY_MARKER", "JSON_ID", "MAX_ANSWER", "Answer", "AnswerReader", "envelope", "pack_call",
           "failures", "is_oneway", "takes_notify", "parse_call", "answer", "record_oneway_failure"]

# the class attribute by which a viewer object takes notify calls on the daemon's short path
NOTIFY_MARKER = "_mvc_notify"
JSON_ID: int = serializers["json"].serializer_id
MAX_ANSWER = 64 * 1024  # a viewer's answer to notify: a failure count, or an exception with its traceback
_HEADER_STRUCT = struct.Struct(protocol._header_format)  # noqa: SLF001 - Pyro5 internal (this package owns them)
_NO_CORRELATION = protocol._empty_correlation_id  # noqa: SLF001 - Pyro5 internal (this package owns them)
_MAGIC = protocol._magic_number  # noqa: SLF001 - Pyro5 internal (this package owns them)
_VERSION = protocol.PROTOCOL_VERSION
_INVOKE = protocol.MSG_INVOKE
_ONEWAY = protocol.FLAGS_ONEWAY
_EXCEPTION = protocol.FLAGS_EXCEPTION


# the sender's end ------------------------------------------------------------------------
def envelope(object_id: str, capability: str) -> tuple[bytes, bytes]:
    """The JSON of a ``notify`` call to ``object_id`` around its argument: the head opens the
    batch object with the subscription's ``capability``; the batch's own text (without its
    opening brace) follows on, then the tail."""
    head = (f'{{"object":{json.dumps(object_id)},"method":"notify","params":[{{"capability":'
            f'{json.dumps(capability)},').encode()
    return head, b'],"kwargs":{}}'


def pack_call(seq: int, envelope: tuple[bytes, bytes], body: bytes, two_way: bool) -> bytes:
    """One whole invoke message: ``notify(body + capability)``; ``body`` is a JSON object's text."""
    head, tail = envelope
    size = len(head) + len(body) - 1 + len(tail)  # the batch's "{" is the envelope's (capability first)
    header = _HEADER_STRUCT.pack(b"PYRO", _VERSION, _INVOKE, JSON_ID, 0 if two_way else _ONEWAY,
                                 seq & 0xFFFF, size, 0, _NO_CORRELATION, 0, _MAGIC)
    return b"".join((header, head, memoryview(body)[1:], tail))


@dataclasses.dataclass(frozen=True)
class Answer:
    """A viewer's answer to a two-way ``notify`` call."""

    exception: bool  # the call itself raised (its own handler failed)
    failures: int  # handler failures the answer reports (the call's own, or the oneway calls' before it)


def failures(answer: bytes) -> int:
    """Handler failures a viewer reports in its answer: ViewerDaemon answers with how many of the
    oneway calls since its last answer raised (a plain Pyro5 daemon answers ``null``)."""
    if answer in (b"null", b"0"):
        return 0
    try:
        value = json.loads(answer)
    except ValueError:
        return 0
    return value if isinstance(value, int) and value > 0 else 0


class AnswerReader:
    """Bytes read from a viewer's connection in, whole answers out; never buffers past MAX_ANSWER."""

    def __init__(self) -> None:
        self._in = bytearray()

    def feed(self, chunk: bytes) -> list[Answer]:
        """Take ``chunk``; return the answers now complete (ProtocolError on anything else)."""
        buf = self._in
        buf += chunk
        out = []
        while len(buf) >= HEADER_SIZE:
            tag, version, _, _, flags, _, data_size, annotations_size, _, _, magic = _HEADER_STRUCT.unpack_from(buf)
            if tag != b"PYRO" or version != _VERSION or magic != _MAGIC:
                raise pyro_errors.ProtocolError("invalid message from the viewer")
            if annotations_size + data_size > MAX_ANSWER:  # an answer is a count or an error: never buffer more
                raise pyro_errors.ProtocolError(
                    f"answer of {annotations_size + data_size} bytes from the viewer (at most {MAX_ANSWER})")
            size = HEADER_SIZE + annotations_size + data_size
            if len(buf) < size:
                break
            body = bytes(buf[HEADER_SIZE + annotations_size:size])
            del buf[:size]
            raised = bool(flags & _EXCEPTION)
            out.append(Answer(raised, 1 if raised else failures(body)))
        return out


# the viewer daemon's end -------------------------------------------------------------------
def takes_notify(obj: Any) -> bool:
    """Whether ``obj`` takes notify calls on the daemon's short path (its class declares the marker)."""
    return bool(getattr(obj, NOTIFY_MARKER, False))


def parse_call(header: Header, message: bytes, objects: dict[str, Any]) -> tuple[Any, dict] | None:
    """``(object, batch)`` when ``message`` is a fan-out's notify call to an object that takes them,
    None for anything else (which goes to Pyro5's generic dispatch)."""
    if header.type != _INVOKE or header.serializer_id != JSON_ID or header.annotations_size:
        return None
    try:
        call = json.loads(message[HEADER_SIZE:])
        obj = objects.get(call["object"])
        params = call["params"]
        if (call["method"] == "notify" and takes_notify(obj) and not call["kwargs"]
                and len(params) == 1 and isinstance(params[0], dict)):
            return obj, params[0]
    except (ValueError, KeyError, TypeError, AttributeError):
        pass
    return None


def is_oneway(header: Header) -> bool:
    """Whether the call expects no answer."""
    return bool(header.flags & _ONEWAY)


def record_oneway_failure(conn: Any) -> None:
    """A oneway call's handler raised: counted on the connection, reported by the next answer."""
    conn.mvc_failed = getattr(conn, "mvc_failed", 0) + 1


def answer(conn: Any, seq: int) -> bytes:
    """The answer to a two-way call whose handler returned: the count of oneway calls that failed
    since the last answer (``0`` when none), which resets."""
    failed, conn.mvc_failed = getattr(conn, "mvc_failed", 0), 0
    body = str(failed).encode() if failed else b"0"
    return protocol.SendingMessage(protocol.MSG_RESULT, 0, seq, JSON_ID, body).data
