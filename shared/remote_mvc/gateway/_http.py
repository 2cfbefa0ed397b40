"""The gateway's HTTP surface: a Starlette app over the relay's feeds.

Routes (JSON unless said otherwise)::

    GET  /                         the live page (HTML; its script and style beside it)
    GET  /models                   the models served
    GET  /models/{name}            values, revision, epoch, schema
    GET  /models/{name}/events     Server-Sent Events: snapshot / change events, id = revision
    GET  /models/{name}/history    ?since=REV&limit=N, from the model server
    GET  /models/{name}/viewers    the model server's viewers
    POST /models/{name}            modify: {"changes": {...}, "expected_revision": REV, "request_id": ID}
    GET  /whoami                   the identity the credentials prove
    GET  /metrics, /healthz

Writes need HTTP Basic credentials (``identity:secret`` from the gateway's credentials table,
checked in constant time); the gateway then calls the model server's ``modify`` with
``modify_for(identity, ...)``, and the model server checks and audits that identity's own role.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import json
import logging
import uuid
from importlib import resources
from typing import TYPE_CHECKING, Any

from Pyro5.errors import CommunicationError, PyroError
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from ..auth import ROLES
from ..errors import (
    AuthenticationError,
    ConflictError,
    HistoryCompacted,
    MVCError,
    PermissionDenied,
    PersistenceError,
    ServiceUnavailable,
    ValidationError,
)
from ..logs import log_event
from ._relay import Feed, StreamClient

if TYPE_CHECKING:
    from . import Gateway

__all__ = ["build_app"]

log = logging.getLogger("remote_mvc.gateway")

_DUMMY_SECRET = b"\x00" * 64  # compared against when the identity is unknown: the same work either way
_STATIC = {"/": ("index.html", "text/html; charset=utf-8"),
           "/app.js": ("app.js", "text/javascript; charset=utf-8"),
           "/style.css": ("style.css", "text/css; charset=utf-8")}


class HTTPError(Exception):
    """An answer other than 200, with a JSON body ``{"error": type, "message": ...}``."""

    def __init__(self, status: int, kind: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.kind, self.message, self.headers = status, kind, message, headers or {}


def _int_param(raw: str | None, name: str, default: int | None, low: int = 0, high: int | None = None) -> int | None:
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise HTTPError(400, "ValidationError", f"{name} must be an integer, not {raw[:40]!r}") from None
    if value < low or (high is not None and value > high):
        raise HTTPError(400, "ValidationError", f"{name} must be between {low} and {high or 'any'}")
    return value


class _Api:
    def __init__(self, gateway: Gateway) -> None:
        self.gw = gateway
        self.settings = gateway.settings
        self.metrics = gateway.metrics
        self.static = {path: (resources.files(__package__).joinpath("static").joinpath(fname).read_bytes(), ctype)
                       for path, (fname, ctype) in _STATIC.items()}

    # helpers -----------------------------------------------------------------------
    def feed(self, request: Request) -> Feed:
        name = request.path_params["name"]
        feed = self.gw.feeds.get(name)
        if feed is None:
            raise HTTPError(404, "NotFound", f"no model {name[:200]!r} here; models: {', '.join(self.gw.feeds)}")
        return feed

    async def identify(self, request: Request, required: bool) -> tuple[str, str]:
        """(identity, role) the request's Basic credentials prove; anonymous is a viewer."""
        header = request.headers.get("authorization")
        if header is None:
            if required:
                raise self._unauthorized(request, "credentials required (HTTP Basic identity:secret)")
            return "anonymous", "viewer"
        scheme, _, token = header.partition(" ")
        try:
            if scheme.lower() != "basic":
                raise ValueError("not Basic")
            name, sep, secret = base64.b64decode(token.strip(), validate=True).decode("utf-8").partition(":")
            if not sep or not name:
                raise ValueError("not identity:secret")
        except (ValueError, binascii.Error, UnicodeDecodeError):
            await self._refuse(request, "malformed credentials")
            raise self._unauthorized(request, "malformed credentials (want HTTP Basic identity:secret)") from None
        ident = self.gw.credentials.get(name)
        given = secret.encode("utf-8", "surrogatepass")
        candidates = [s.encode("utf-8", "surrogatepass") for s in ident.secrets] if ident else [_DUMMY_SECRET]
        ok = False
        for candidate in candidates:  # every secret compared (rotation), in constant time each
            ok |= hmac.compare_digest(hashlib.sha256(candidate).digest(), hashlib.sha256(given).digest())
        if ident is None or not ok:
            await self._refuse(request, "invalid credentials", name)
            raise self._unauthorized(request, "invalid credentials")
        return ident.name, ident.role

    def _unauthorized(self, request: Request, message: str) -> HTTPError:
        # the page asks with X-Requested-With: no challenge, so the browser shows no login dialog of its own
        headers = {} if request.headers.get("x-requested-with") else {"WWW-Authenticate": 'Basic realm="remote-mvc"'}
        return HTTPError(401, "AuthenticationError", message, headers)

    async def _refuse(self, request: Request, reason: str, identity: str = "unknown") -> None:
        """Audit and slow down a failed sign-in (repeated failures from one address wait longer)."""
        address = f"{request.client.host}:{request.client.port}" if request.client else "?"
        delay = self.gw.throttle.failed(address)
        log_event(log, "http_auth_refused", f"credentials refused: {reason}", level=logging.WARNING,
                  client=address, identity=identity[:128], delay=delay)
        await run_in_threadpool(self.gw.record_refusal, "authenticate", identity[:128], address, reason)
        if delay:
            await asyncio.sleep(delay)

    # routes ------------------------------------------------------------------------
    async def page(self, request: Request) -> Response:
        body, ctype = self.static[request.url.path]
        return Response(body, media_type=ctype, headers={"Cache-Control": "no-cache",
                                                         "X-Content-Type-Options": "nosniff"})

    async def models(self, request: Request) -> Response:
        return JSONResponse({"models": [{**{k: v for k, v in f.describe().items() if k != "values"},
                                         "clients": len(f.clients)} for f in self.gw.feeds.values()]})

    async def model(self, request: Request) -> Response:
        feed = self.feed(request)
        if not feed.synced:
            raise HTTPError(503, "ServiceUnavailable", f"{feed.name}: not connected to the model server yet")
        if feed.schema is None:
            feed.schema = await self._call(feed.name, "schema")
        return JSONResponse({**feed.describe(), "schema": feed.schema})

    async def history(self, request: Request) -> Response:
        feed = self.feed(request)
        since = _int_param(request.query_params.get("since"), "since", 0)
        limit = _int_param(request.query_params.get("limit"), "limit", 100, 1, 1000)
        return JSONResponse({"model": feed.name, "events": await self._call(feed.name, "history", since, limit)})

    async def viewers(self, request: Request) -> Response:
        feed = self.feed(request)
        return JSONResponse({"model": feed.name, "viewers": await self._call(feed.name, "viewers")})

    async def whoami(self, request: Request) -> Response:
        identity, role = await self.identify(request, required=False)
        return JSONResponse({"identity": identity, "role": role, "permissions": sorted(ROLES.get(role, ()))})

    async def modify(self, request: Request) -> Response:
        feed = self.feed(request)
        identity, _role = await self.identify(request, required=True)
        body = await self._body(request, identity)
        try:
            doc = json.loads(body)
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:  # RecursionError: deep nesting
            await self._malformed(request, identity, f"malformed JSON: {type(exc).__name__}: {str(exc)[:200]}")
        if not isinstance(doc, dict) or not isinstance(doc.get("changes"), dict) or not doc["changes"]:
            await self._malformed(request, identity, 'want {"changes": {field: value, ...}, "expected_revision": '
                                                     'REV (optional), "request_id": ID (optional)}')
        unknown = set(doc) - {"changes", "expected_revision", "request_id"}
        if unknown:
            await self._malformed(request, identity, f"unknown keys: {', '.join(sorted(map(str, unknown)))}")
        expected = doc.get("expected_revision")
        if expected is not None and (not isinstance(expected, int) or isinstance(expected, bool) or expected < 0):
            await self._malformed(request, identity, "expected_revision must be a non-negative integer or null")
        given_id = doc.get("request_id") or request.headers.get("idempotency-key") or uuid.uuid4().hex
        if not isinstance(given_id, str) or len(given_id) > 128:
            await self._malformed(request, identity, "request_id must be a string of at most 128 characters")
        # one caller's request ids never meet another's in the model server's deduplication
        request_id = "gw-" + hashlib.sha256(f"{identity}\x00{given_id}".encode()).hexdigest()[:40]
        revision = await self._call(feed.name, "modify_for", identity, doc["changes"], expected,
                                    request_id=request_id)
        return JSONResponse({"model": feed.name, "revision": revision, "request_id": given_id})

    async def _body(self, request: Request, identity: str) -> bytes:
        limit = self.settings.gateway_max_body
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            await self._too_large(request, identity, limit)
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                await self._too_large(request, identity, limit)
            chunks.append(chunk)
        return b"".join(chunks)

    async def _too_large(self, request: Request, identity: str, limit: int) -> None:
        await run_in_threadpool(self.gw.record_refusal, "modify", identity, self._address(request), "too_large")
        raise HTTPError(413, "PayloadTooLarge", f"request body over {limit} bytes")

    async def _malformed(self, request: Request, identity: str, message: str) -> None:
        await run_in_threadpool(self.gw.record_refusal, "modify", identity, self._address(request),
                                f"malformed: {message[:200]}")
        raise HTTPError(400, "ValidationError", message)

    @staticmethod
    def _address(request: Request) -> str:
        return f"{request.client.host}:{request.client.port}" if request.client else "?"

    async def _call(self, model: str, method: str, *args: Any, **kwargs: Any) -> Any:
        """A model server call from a worker thread, its errors turned into HTTP answers."""
        client = self.gw.client(model)
        try:
            return await run_in_threadpool(client.call, method, *args, retry=True, **kwargs)
        except ValidationError as exc:
            raise HTTPError(400, "ValidationError", str(exc)) from None
        except ConflictError as exc:
            raise HTTPError(409, "ConflictError", str(exc)) from None
        except PermissionDenied as exc:
            raise HTTPError(403, "PermissionDenied", str(exc)) from None
        except HistoryCompacted as exc:
            raise HTTPError(410, "HistoryCompacted", str(exc)) from None
        except AuthenticationError as exc:  # the model server refused the gateway's own credentials
            raise HTTPError(502, "BadGateway", f"the model server refused the gateway: {exc}") from None
        except (ServiceUnavailable, PersistenceError, CommunicationError, PyroError, OSError) as exc:
            raise HTTPError(503, type(exc).__name__, str(exc)) from None
        except MVCError as exc:
            raise HTTPError(400, type(exc).__name__, str(exc)) from None

    async def events(self, request: Request) -> Response | _EventStream:
        feed = self.feed(request)
        header = request.headers.get("last-event-id")
        since = _int_param(request.query_params.get("since", header), "since (or Last-Event-ID)", None)
        epoch = request.query_params.get("epoch")
        if epoch is not None and len(epoch) > 200:
            raise HTTPError(400, "ValidationError", "epoch too long")
        if sum(len(f.clients) for f in self.gw.feeds.values()) >= self.settings.gateway_max_clients:
            raise HTTPError(503, "ServiceUnavailable", "too many stream clients; try again later",
                            {"Retry-After": "5"})
        client = feed.attach()
        try:
            upto = feed.revision
            if feed.plan(client, since, epoch) == "history":
                assert since is not None
                try:
                    events = await run_in_threadpool(self.gw.client(feed.name).call, "history", since,
                                                     self.settings.gateway_ring, retry=False)
                except (MVCError, CommunicationError, PyroError, OSError):
                    events = []
                feed.backfill(client, since, events, upto)
        except BaseException:
            feed.detach(client)
            raise
        return _EventStream(self.gw, feed, client)


class _EventStream:
    """The ASGI response of one stream: writes the client's frames, and a heartbeat when the
    tender says it has been idle; dropped by the tender when one write takes too long."""

    def __init__(self, gateway: Gateway, feed: Feed, client: StreamClient) -> None:
        self.gw, self.feed, self.client = gateway, feed, client
        self.settings = gateway.settings

    def _drain(self) -> tuple[bytes, int]:
        client, feed = self.client, self.feed
        if client.resync is not None and client.resync != "waiting":
            reason, client.resync = client.resync, None
            client.buffer.clear()
            client.sent = feed.revision
            return feed.snapshot_frame(reason), 0
        parts: list[bytes] = []
        count = 0
        while client.buffer:
            revision, frame = client.buffer.popleft()
            if revision <= client.sent:
                continue
            if client.sent >= 0 and revision != client.sent + 1:  # never a silent gap
                client.owe_snapshot("gap")
                return b"".join(parts), count
            parts.append(frame)
            client.sent = revision
            count += 1
        return b"".join(parts), count

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        client, feed = self.client, self.feed
        loop = asyncio.get_running_loop()
        client.task = asyncio.current_task()  # the tender cancels it when one write takes too long
        watcher = asyncio.ensure_future(self._watch(receive))
        try:
            await send({"type": "http.response.start", "status": 200, "headers": [
                (b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"),
                (b"x-accel-buffering", b"no")]})
            self.gw.metrics.gateway_requests.labels("events", "200").inc()
            chunk, count = b"retry: 1000\n\n", 0
            while True:
                if chunk:
                    # no per-write timer (a task per write costs more than the write): the tender
                    # (Feed.tend) drops a client whose write has been in progress for too long
                    client.writing_since = loop.time()
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                    client.writing_since, client.beat = None, False
                    client.last_write = loop.time()
                    feed.sent(count)
                if client.closed or self.gw.closing:
                    break
                client.wake.clear()
                chunk, count = self._drain()
                if chunk or client.wake.is_set():
                    continue
                if client.beat:  # idle for a heartbeat interval (the tender said so)
                    client.beat = False
                    chunk = b": keep-alive\n\n"
                    continue
                await client.wake.wait()
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except asyncio.CancelledError:
            if not client.stuck:
                raise
            self.gw.metrics.gateway_slow_dropped.labels(self.feed.name).inc()
            log_event(log, "stream_client_dropped", "stream client dropped: it did not read in time",
                      level=logging.WARNING, model=self.feed.name, revision=self.client.sent)
        finally:
            client.task = None
            watcher.cancel()
            feed.detach(client)

    async def _watch(self, receive: Receive) -> None:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                self.client.close()
                return


def build_app(gateway: Gateway) -> Starlette:
    api = _Api(gateway)

    def guarded(route: str, handler: Any) -> Any:
        async def endpoint(request: Request) -> Response:
            try:
                response = await handler(request)
            except HTTPError as exc:
                gateway.metrics.gateway_requests.labels(route, str(exc.status)).inc()
                return JSONResponse({"error": exc.kind, "message": exc.message}, exc.status, headers=exc.headers)
            if not isinstance(response, _EventStream):
                gateway.metrics.gateway_requests.labels(route, str(response.status_code)).inc()
            return response
        return endpoint

    async def metrics(request: Request) -> Response:
        return Response(gateway.metrics.exposition(), media_type="text/plain; version=0.0.4")

    async def healthz(request: Request) -> Response:
        ok = gateway.healthy()
        return Response(b"ok\n" if ok else b"unhealthy\n", 200 if ok else 503, media_type="text/plain")

    routes = [Route(path, guarded("page", api.page)) for path in _STATIC]
    routes += [
        Route("/models", guarded("models", api.models)),
        Route("/models/{name}", guarded("model", api.model), methods=["GET"]),
        Route("/models/{name}", guarded("modify", api.modify), methods=["POST"]),
        Route("/models/{name}/events", guarded("events", api.events)),
        Route("/models/{name}/history", guarded("history", api.history)),
        Route("/models/{name}/viewers", guarded("viewers", api.viewers)),
        Route("/whoami", guarded("whoami", api.whoami)),
        Route("/metrics", metrics),
        Route("/healthz", healthz),
    ]
    return Starlette(routes=routes)
