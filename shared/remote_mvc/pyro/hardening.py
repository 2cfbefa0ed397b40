"""Process-wide hardening of Pyro5 against hostile peers.

* Only serializers that are safe on untrusted input are accepted: Python's
  ``marshal`` is documented as unsafe against malicious data, yet Pyro5 lets a
  client pick it. Its slot is replaced by one that refuses to decode (it still
  encodes, so the refusal can be sent back to the client).
* Compressed messages are inflated with a bound: Pyro5 checks
  ``MAX_MESSAGE_SIZE`` on the compressed size only, so a small message could
  otherwise inflate into gigabytes. Inflation stops at the bound and the message
  is refused.
"""

from __future__ import annotations

import zlib

from Pyro5 import config as pyro_config
from Pyro5 import errors, protocol, serializers

__all__ = ["harden_pyro", "REFUSED_SERIALIZERS"]

REFUSED_SERIALIZERS = ("marshal",)


class _RefusingSerializer:
    """Stands in for an unsafe serializer: encodes (for the error reply), never decodes."""

    def __init__(self, real: serializers.SerializerBase) -> None:
        self._real = real
        self.serializer_id = real.serializer_id
        self.name = type(real).__name__

    def _refuse(self, *_args: object, **_kwargs: object) -> None:
        raise errors.SecurityError(f"{self.name} is not accepted here (unsafe on untrusted input); use serpent")

    loads = loadsCall = _refuse  # noqa: N815 - Pyro5's names

    def __getattr__(self, name: str) -> object:
        return getattr(self._real, name)


class _BoundedZlib:
    """The zlib functions Pyro5's protocol module uses, with a bounded decompress."""

    compress = staticmethod(zlib.compress)
    error = zlib.error

    @staticmethod
    def decompress(data: bytes) -> bytes:
        limit = pyro_config.MAX_MESSAGE_SIZE
        inflater = zlib.decompressobj()
        try:
            out = inflater.decompress(bytes(data), limit)
        except zlib.error as exc:
            raise errors.ProtocolError(f"corrupt compressed message: {exc}") from None
        if inflater.unconsumed_tail or len(out) >= limit and not inflater.eof:
            raise errors.ProtocolError(f"compressed message inflates past the limit of {limit} bytes")
        return out


def harden_pyro() -> None:
    """Install the serializer refusal and the bounded inflation (idempotent)."""
    for name in REFUSED_SERIALIZERS:
        real = serializers.serializers[name]
        if not isinstance(real, _RefusingSerializer):
            serializers.serializers_by_id[real.serializer_id] = _RefusingSerializer(real)
    if not isinstance(protocol.zlib, _BoundedZlib):
        protocol.zlib = _BoundedZlib()
