"""Process-wide hardening of Pyro5 against hostile peers.

* Only serializers that are safe on untrusted input are accepted: Python's
  ``marshal`` is documented as unsafe against malicious data, yet Pyro5 lets a
  client pick it. Its slot is replaced by one that refuses to decode (it still
  encodes, so the refusal can be sent back to the client).
* Compressed messages are inflated with a bound: Pyro5 checks
  ``MAX_MESSAGE_SIZE`` on the compressed size only, so a small message could
  otherwise inflate into gigabytes. Inflation stops at the bound and the message
  is refused.
* Serpent decoding is serialized and retried on one transient error: serpent
  parses with ``ast.literal_eval``, and CPython before 3.13 keeps the AST
  constructor's recursion depth per interpreter, not per thread
  (python/cpython#106905). When a garbage collection runs Python code (a
  proxy's ``__del__``) in the middle of a decode, another thread's decode can
  interleave, and one of them fails with ``SystemError: AST constructor
  recursion depth mismatch``: a good request or reply lost. Decoding is
  CPU-bound under the GIL, so one lock costs little; the retry covers an AST
  built elsewhere in the process (the check resets at each decode).
"""

from __future__ import annotations

import threading
import zlib
from collections.abc import Callable
from typing import Any

from Pyro5 import config as pyro_config
from Pyro5 import errors, protocol, serializers

__all__ = ["harden_pyro", "REFUSED_SERIALIZERS"]

REFUSED_SERIALIZERS = ("marshal",)
_AST_RACE = "AST constructor recursion depth mismatch"  # python/cpython#106905
_DECODE_ATTEMPTS = 3


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


class _SerializedSerpent:
    """Pyro5's serpent serializer with decoding under one lock, retried on the AST race (module doc)."""

    def __init__(self, real: serializers.SerializerBase) -> None:
        self._real = real
        self._lock = threading.RLock()  # reentrant: a class hook may decode again in the same thread
        self.serializer_id = real.serializer_id

    def _decode(self, decode: Callable[[Any], Any], data: Any) -> Any:
        attempt = 1
        while True:
            with self._lock:
                try:
                    return decode(data)
                except SystemError as exc:
                    if _AST_RACE not in str(exc) or attempt >= _DECODE_ATTEMPTS:
                        raise
            attempt += 1

    def loads(self, data: Any) -> Any:
        return self._decode(self._real.loads, data)

    def loadsCall(self, data: Any) -> Any:  # noqa: N802 - Pyro5's name
        return self._decode(self._real.loadsCall, data)

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
    """Install the serializer refusal, the serialized serpent decoding and the bounded inflation
    (idempotent)."""
    serpent = serializers.serializers["serpent"]
    if not isinstance(serpent, _SerializedSerpent):
        guarded = _SerializedSerpent(serpent)
        serializers.serializers["serpent"] = serializers.serializers_by_id[serpent.serializer_id] = guarded
    for name in REFUSED_SERIALIZERS:
        real = serializers.serializers[name]
        if not isinstance(real, _RefusingSerializer):
            serializers.serializers_by_id[real.serializer_id] = _RefusingSerializer(real)
    if not isinstance(protocol.zlib, _BoundedZlib):
        protocol.zlib = _BoundedZlib()
