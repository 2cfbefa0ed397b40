"""A client of the web gateway's HTTP API (standard library only): reads, modify, event streams.

``remote-mvc-ctl --gateway URL`` uses it, so a shell outside the model servers' network
(no callback into it possible) can query, watch and change models; tests use it too.
HTTP errors come back as the library's own errors (:func:`error_for`).
"""

from __future__ import annotations

import base64
import http.client
import json
import socket
import time
import urllib.parse
import uuid
from collections.abc import Callable, Iterator
from typing import Any

from ._backoff import Backoff
from .errors import (
    AuthenticationError,
    ConflictError,
    GatewayError,
    HistoryCompacted,
    MVCError,
    PermissionDenied,
    ServiceUnavailable,
    ValidationError,
)

__all__ = ["GatewayClient", "EventStream", "error_for"]

_BY_STATUS: dict[int, type[MVCError]] = {400: ValidationError, 401: AuthenticationError, 403: PermissionDenied,
                                          409: ConflictError, 503: ServiceUnavailable}


def error_for(status: int, body: bytes) -> MVCError:
    """The library error an HTTP error answer stands for (GatewayError when none fits)."""
    try:
        doc = json.loads(body)
        message = f"{doc.get('message', '')}"
    except ValueError:
        message = body[:200].decode("utf-8", "replace")
    if status == 410:
        return HistoryCompacted(message)
    cls = _BY_STATUS.get(status)
    return cls(message) if cls is not None else GatewayError(f"HTTP {status}: {message}", status)


class GatewayClient:
    """Calls to one gateway (``http://host:port``), optionally as an identity (HTTP Basic)."""

    def __init__(self, url: str, identity: str = "", secret: str = "", timeout: float = 5.0) -> None:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValidationError(f"gateway URL must be http://host[:port], not {url!r}")
        self.host, self.port = parts.hostname, parts.port or 80
        self.timeout = timeout
        self._auth = ("Basic " + base64.b64encode(f"{identity}:{secret}".encode()).decode()) if identity else None

    def _headers(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        headers = {"Accept": "application/json", **(extra or {})}
        if self._auth:
            headers["Authorization"] = self._auth
        return headers

    def request(self, method: str, path: str, body: Any = None) -> Any:
        """One HTTP request; the JSON answer, or the error it maps to."""
        conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
        try:
            data = None if body is None else json.dumps(body).encode()
            headers = self._headers({"Content-Type": "application/json"} if data is not None else None)
            conn.request(method, path, body=data, headers=headers)
            reply = conn.getresponse()
            raw = reply.read()
        except (OSError, http.client.HTTPException) as exc:
            raise ServiceUnavailable(f"gateway at {self.host}:{self.port} unreachable: {exc}") from None
        finally:
            conn.close()
        if reply.status != 200:
            raise error_for(reply.status, raw)
        return json.loads(raw)

    @staticmethod
    def _model(name: str) -> str:
        return "/models/" + urllib.parse.quote(name, safe="")

    def models(self) -> list[dict[str, Any]]:
        """The models the gateway relays."""
        return self.request("GET", "/models")["models"]

    def snapshot(self, model: str) -> dict[str, Any]:
        """Values, revision, epoch and schema of ``model``."""
        return self.request("GET", self._model(model))

    def history(self, model: str, since: int = 0, limit: int = 1000) -> list[dict[str, Any]]:
        """Up to ``limit`` of ``model``'s change events after ``since``."""
        return self.request("GET", f"{self._model(model)}/history?since={int(since)}&limit={int(limit)}")["events"]

    def viewers(self, model: str) -> list[dict[str, Any]]:
        """``model``'s subscribed viewers."""
        return self.request("GET", f"{self._model(model)}/viewers")["viewers"]

    def whoami(self) -> dict[str, Any]:
        """The identity and role the gateway sees."""
        return self.request("GET", "/whoami")

    def modify(self, model: str, changes: dict[str, Any], expected_revision: int | None = None,
               request_id: str | None = None) -> int:
        """Change ``model``; the same request id (one is made when not given) never applies twice."""
        body: dict[str, Any] = {"changes": changes, "request_id": request_id or uuid.uuid4().hex}
        if expected_revision is not None:
            body["expected_revision"] = expected_revision
        return self.request("POST", self._model(model), body)["revision"]

    def events(self, model: str, since: int | None = None, epoch: str | None = None,
               last_event_id: int | None = None, connection: http.client.HTTPConnection | None = None
               ) -> EventStream:
        """Open ``model``'s event stream (from ``since``/``last_event_id``, or a snapshot first)."""
        query = {k: v for k, v in (("since", since), ("epoch", epoch)) if v is not None}
        path = f"{self._model(model)}/events" + ("?" + urllib.parse.urlencode(query) if query else "")
        extra = {"Accept": "text/event-stream"}
        if last_event_id is not None:
            extra["Last-Event-ID"] = str(last_event_id)
        return EventStream(self.host, self.port, path, self._headers(extra), self.timeout, connection)

    def follow(self, model: str, since: int | None = None, silence: float = 60.0,
               on_lost: Callable[[Exception], None] | None = None,
               backoff: Backoff | None = None) -> Iterator[tuple[str, dict[str, Any]]]:
        """``model``'s events, ``(kind, data)``, across lost streams; never ends by itself.

        After a lost stream (the gateway unreachable, the stream closed, or silent for longer
        than ``silence`` seconds: no event and no heartbeat) it reconnects after a jittered
        back-off and resumes from the last revision it yielded: exactly, or with the snapshot
        the gateway sends when it cannot (another epoch, a revision out of its reach).
        ``on_lost`` hears of each loss. ``since=None`` starts with a snapshot.
        """
        epoch: str | None = None
        backoff = backoff or Backoff(0.2, 5.0)
        while True:
            try:
                with self.events(model, since=since, epoch=epoch) as stream:
                    backoff.reset()
                    while True:
                        try:
                            kind, data = stream.next(timeout=silence)
                        except (TimeoutError, OSError) as exc:
                            raise ServiceUnavailable(f"no event or heartbeat: {exc}") from None
                        since, epoch = data["revision"], data["epoch"]
                        yield kind, data
            except ServiceUnavailable as exc:
                if on_lost is not None:
                    on_lost(exc)
                time.sleep(backoff.next())  # a back-off between reconnects, not a wait for a condition


class EventStream:
    """One open SSE stream: :meth:`next` returns ``(kind, data)`` events, skipping heartbeats."""

    def __init__(self, host: str, port: int, path: str, headers: dict[str, str], timeout: float,
                 connection: http.client.HTTPConnection | None = None) -> None:
        # ``connection``: a connection of the caller's making (e.g. with a small receive buffer)
        self._conn = connection or http.client.HTTPConnection(host, port, timeout=timeout)
        try:
            self._conn.request("GET", path, headers=headers)
            self._reply = self._conn.getresponse()
        except (OSError, http.client.HTTPException) as exc:
            self._conn.close()
            raise ServiceUnavailable(f"gateway at {host}:{port} unreachable: {exc}") from None
        if self._reply.status != 200:
            raw = self._reply.read()
            self._conn.close()
            raise error_for(self._reply.status, raw)
        self.heartbeats = 0
        self.last_id: int | None = None

    def next(self, timeout: float | None = None) -> tuple[str, dict[str, Any]]:
        """The next event; ``socket.timeout`` when none comes in ``timeout``; ServiceUnavailable
        when the gateway ends the stream."""
        if timeout is not None and self._conn.sock is not None:
            self._conn.sock.settimeout(timeout)
        kind, ident = "message", None
        data: list[str] = []
        while True:
            line = self._reply.readline()  # through the chunked transfer decoding
            if not line:
                raise ServiceUnavailable("the gateway closed the event stream")
            text = line.decode("utf-8").rstrip("\r\n")
            if not text:
                if data:
                    if ident is not None:
                        self.last_id = int(ident)
                    return kind, json.loads("\n".join(data))
                continue
            field, _, value = text.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if field == "":
                self.heartbeats += 1
            elif field == "event":
                kind = value
            elif field == "data":
                data.append(value)
            elif field == "id":
                ident = value

    def __iter__(self) -> Iterator[tuple[str, dict[str, Any]]]:
        while True:
            yield self.next()

    def close(self) -> None:
        """Close the stream's connection."""
        try:
            if self._conn.sock is not None:
                self._conn.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._conn.close()

    def __enter__(self) -> EventStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
