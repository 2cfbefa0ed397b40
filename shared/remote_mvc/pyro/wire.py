"""What a daemon takes off the wire: every message's header checked before its payload is read.

Pyro5 decodes whatever a peer sends: any serializer it knows (``marshal``
included), zlib-compressed bodies (checked against the size bound only before
inflating), "keep serialized" blobs whose ``BLBI`` annotation goes straight to
``marshal.loads`` (a crafted blob crashes the interpreter), batches, and oneway
calls that each get a thread of their own. remote-mvc's daemons read each
message's fixed 40-byte header first and refuse, before a byte of the payload is
read or decoded, anything outside a narrow shape (:func:`check`):

* the message type the phase expects (a handshake first, then calls or pings);
* the serpent or JSON serializer only;
* no compression, no keep-serialized blob, no batch, no exception/stream flags;
  oneway only where the daemon takes oneway calls itself, in order;
* a small size before authentication (:attr:`Limits.handshake`), a larger one
  for anonymous callers (:attr:`Limits.anonymous`) and the largest for
  authenticated identities (:attr:`Limits.authenticated`); annotations small.

A refused message raises :class:`WireRefused` (a Pyro5 ``SecurityError``, so
Pyro5's connection loop closes the connection without decoding anything) with
the reason, which the daemon audits.
"""

from __future__ import annotations

import dataclasses
import struct
from typing import Any

from Pyro5 import errors as pyro_errors
from Pyro5 import protocol
from Pyro5.serializers import serializers

__all__ = ["ALLOWED_SERIALIZERS", "HEADER_SIZE", "WIRE_REFUSAL", "Limits", "WireRefused", "Header", "check", "read_header", "read_exactly"]

HEADER_SIZE: int = protocol._header_size  # noqa: SLF001 - Pyro5 internal (this package owns them)
_HEADER = struct.Struct(protocol._header_format)  # noqa: SLF001 - Pyro5 internal (this package owns them)
ALLOWED_SERIALIZERS = frozenset({serializers["serpent"].serializer_id, serializers["json"].serializer_id})
# flags a peer may set: a correlation id (Pyro5 sets it on calls made while serving a call) and, where the
# daemon allows it, oneway
_HARMLESS = protocol.FLAGS_CORR_ID
_NAMES = {
    protocol.FLAGS_EXCEPTION: "exception", protocol.FLAGS_COMPRESSED: "compressed", protocol.FLAGS_ONEWAY: "oneway",
    protocol.FLAGS_BATCH: "batch", protocol.FLAGS_ITEMSTREAMRESULT: "stream", protocol.FLAGS_KEEPSERIALIZED:
    "keep-serialized",
}


# how a connect refusal for the message's shape (not its credentials) begins, so that clients tell the two apart
WIRE_REFUSAL = "refused on the wire: "


class WireRefused(pyro_errors.SecurityError):
    """A message refused on its header alone (before its payload was read)."""


@dataclasses.dataclass(frozen=True)
class Limits:
    """Size bounds (bytes of annotations plus data) by how much is known of the peer."""

    handshake: int = 4096  # the connect message: identity, time, nonce, MAC, object id
    anonymous: int = 64 * 1024  # calls on a connection that proved no identity
    authenticated: int = 1024 * 1024  # calls of an authenticated identity (a modify's values)
    annotations: int = 1024


@dataclasses.dataclass(frozen=True)
class Header:
    """The fixed part of a Pyro5 message, parsed."""

    type: int
    serializer_id: int
    flags: int
    seq: int
    data_size: int
    annotations_size: int

    @property
    def size(self) -> int:
        """Bytes after the header."""
        return self.data_size + self.annotations_size


def parse_header(raw: bytes) -> Header:
    """Parse a 40-byte header; ProtocolError when it is not Pyro5's (no size check here)."""
    if len(raw) != HEADER_SIZE:
        raise pyro_errors.ProtocolError("incomplete message header")
    tag, version, mtype, ser, flags, seq, data_size, ann_size, _, _, magic = _HEADER.unpack(raw)
    if tag != b"PYRO" or version != protocol.PROTOCOL_VERSION or magic != protocol._magic_number:  # noqa: SLF001 - Pyro5 internal (this package owns them)
        raise pyro_errors.ProtocolError("invalid message or protocol version")
    return Header(mtype, ser, flags, seq, data_size, ann_size)


def check(header: Header, *, types: frozenset[int], limit: int, limits: Limits, oneway: bool = False) -> None:
    """Raise WireRefused unless ``header`` has the one shape this phase accepts."""
    if header.type not in types:
        raise WireRefused(f"message type {header.type} not accepted here")
    if header.serializer_id not in ALLOWED_SERIALIZERS:
        raise WireRefused(f"serializer {header.serializer_id} not accepted (serpent or json only)")
    allowed = _HARMLESS | (protocol.FLAGS_ONEWAY if oneway else 0)
    bad = header.flags & ~allowed
    if bad:
        names = ", ".join(name for bit, name in _NAMES.items() if bad & bit) or f"0x{bad:x}"
        raise WireRefused(f"message flags not accepted: {names}")
    if header.annotations_size > limits.annotations:
        raise WireRefused(f"annotations of {header.annotations_size} bytes (at most {limits.annotations})")
    if header.size > limit:
        raise WireRefused(f"message of {header.size} bytes (at most {limit} here)")


def read_exactly(conn: Any, size: int) -> bytes:
    """``size`` bytes from a Pyro5 SocketConnection (raises ConnectionClosedError/TimeoutError)."""
    return conn.recv(size) if size else b""


def read_header(conn: Any) -> tuple[bytes, Header]:
    """Read and parse one message header."""
    raw = read_exactly(conn, HEADER_SIZE)
    return raw, parse_header(raw)
