"""etcd as the store of cluster mode: key layout, guarded transactions, reads and the watch stream.

The client is `etcd3gw <https://opendev.org/openstack/etcd3gw>`_ (OpenStack, maintained):
a synchronous client of etcd's JSON gRPC gateway (``/v3/``, etcd 3.4 and later), on
``requests``. Its client gives each endpoint an HTTP session and the gateway's paths; the
calls are posted here, each with a deadline and its TLS settings, and the watch stream is
read here, because etcd3gw's watcher drops what this module needs: the response header's
revision, ``compact_revision`` and cancellation (see ``docs/cluster.md``).

Keys of a model ``M`` under the deployment's prefix ``P`` (``MVC_ETCD_PREFIX``)::

    P/M/epoch              the model's incarnation: a random id, created once (create_revision = 0)
    P/M/head               {"revision", "values", "epoch", "time"}: the state after the last change
    P/M/events/<rev:020>   the change event of model revision <rev>
    P/M/audit/<rev:020>    the audit record of an accepted change
    P/M/requests/<id>      the model revision a request id produced (exactly-once across replicas)

A change, its event, its audit record and its request id are written by one
transaction whose compares are: ``head``'s mod revision is the one the writer
based the change on, ``epoch`` is the writer's, and none of the batch's request
ids exists. The transaction's success is the acknowledgement: etcd answers it
after a majority of members made it durable.

Every call goes to one endpoint; a connection failure or time-out moves to the
next endpoint and tries once more there; when every endpoint fails the call
raises :class:`~remote_mvc.errors.ServiceUnavailable`.
"""

from __future__ import annotations

import base64
import json
import logging
import threading
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import requests
from etcd3gw.client import Etcd3Client
from etcd3gw.exceptions import Etcd3Exception

from .errors import ServiceUnavailable

if TYPE_CHECKING:
    from .config import Settings

__all__ = ["EtcdStore", "WatchStream", "b64", "unb64", "rev_key"]

log = logging.getLogger("remote_mvc.etcd")

API_PATH = "/v3/"  # etcd 3.4+'s gateway


def b64(data: str | bytes) -> str:
    """etcd's JSON API carries keys and values base64-encoded."""
    return base64.b64encode(data.encode() if isinstance(data, str) else data).decode("ascii")


def unb64(text: str | None) -> bytes:
    """Decode an etcd base64 field (None: empty)."""
    return base64.b64decode(text) if text else b""


def rev_key(revision: int) -> str:
    """A model revision as a key suffix that sorts like the number."""
    return f"{revision:020d}"


def prefix_end(key: str) -> str:
    """The range end covering every key that starts with ``key``."""
    return key[:-1] + chr(ord(key[-1]) + 1)


class WatchStream:
    """One watch call on etcd's gateway: an iterator of watch responses (dicts with ``header``,
    ``events``, ``compact_revision``, ``canceled``), ended by :meth:`close` or a read time-out."""

    def __init__(self, base_url: str, key: str, range_end: str, start_revision: int, read_timeout: float,
                 connect_timeout: float, verify: str | bool = True, cert: tuple[str, str] | None = None) -> None:
        self._session = requests.Session()
        body: dict[str, Any] = {"create_request": {"key": b64(key), "range_end": b64(range_end),
                                   "start_revision": start_revision}}
        try:
            self._response = self._session.post(base_url + API_PATH + "watch", json=body, stream=True,
                                                timeout=(connect_timeout, read_timeout), verify=verify, cert=cert)
        except requests.RequestException as exc:
            self._session.close()
            raise ServiceUnavailable(f"etcd watch at {base_url} failed: {exc}") from exc
        if self._response.status_code != 200:
            text = self._response.text[:300]
            self.close()
            raise ServiceUnavailable(f"etcd watch at {base_url} refused: HTTP {self._response.status_code} {text}")

    def __iter__(self) -> Iterator[dict[str, Any]]:
        try:
            for line in self._response.iter_lines(chunk_size=None):  # type: ignore[call-overload]  # None: as it arrives
                if not line.strip():
                    continue
                message = json.loads(line)
                if "error" in message:
                    raise ServiceUnavailable(f"etcd watch failed: {str(message['error'])[:300]}")
                yield message.get("result", {})
        except (requests.RequestException, ValueError, AttributeError) as exc:
            # a read time-out (nothing new for a while, or a silent member) or a broken stream
            raise ServiceUnavailable(f"etcd watch ended: {type(exc).__name__}: {exc}") from exc

    def close(self) -> None:
        """End the watch stream and its HTTP session."""
        try:
            self._response.close()
        finally:
            self._session.close()


class EtcdStore:
    """The models of one deployment in an etcd cluster (implements ReadableStore)."""

    backend = "etcd"  # ModelServer commits through cluster.EtcdPipeline for this store

    def __init__(self, endpoints: list[str], prefix: str = "/remote_mvc", history_limit: int = 10000,
                 timeout: float = 1.0, ca: str = "", cert: str = "", key: str = "") -> None:
        if not endpoints:
            raise ValueError("EtcdStore needs at least one endpoint")
        self.endpoints = list(endpoints)
        self.prefix = prefix.rstrip("/")
        self.history_limit = history_limit
        self.timeout = timeout  # per HTTP call: a member without quorum answers nothing for seconds
        # https endpoints: etcd's certificate checked against ``ca`` (else the system's CAs), and
        # ``cert``/``key`` presented when etcd asks for a client certificate
        self._verify: str | bool = ca or True
        self._cert = (cert, key) if cert else None
        self._clients = []
        for endpoint in self.endpoints:
            parts = urlsplit(endpoint)
            self._clients.append(Etcd3Client(host=parts.hostname or "127.0.0.1", port=parts.port or 2379,
                                             protocol=parts.scheme or "http", timeout=timeout, api_path=API_PATH))
        self._current = 0
        self._lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings: Settings) -> EtcdStore:
        """The store ``settings`` name: endpoints, prefix, history limit, TLS files."""
        return cls(settings.etcd_endpoints(), settings.etcd_prefix, settings.history_limit,
                   timeout=max(0.2, settings.call_timeout / 3), ca=settings.etcd_ca, cert=settings.etcd_cert,
                   key=settings.etcd_key)

    # keys --------------------------------------------------------------------------
    def key(self, model: str, *parts: str) -> str:
        """The etcd key of ``model``'s ``parts`` under this deployment's prefix."""
        return "/".join([self.prefix, model, *parts])

    # calls ---------------------------------------------------------------------------
    def call(self, path: str, payload: dict[str, Any], deadline: float | None = None) -> dict[str, Any]:
        """POST to the current endpoint; on a failure once more to each other one in turn, all within
        ``deadline`` (a ``time.monotonic()`` instant) when given."""
        errors = []
        with self._lock:
            start = self._current
        for i in range(len(self._clients)):
            index = (start + i) % len(self._clients)
            client = self._clients[index]
            try:
                timeout = self.timeout
                if deadline is not None:
                    left = deadline - time.monotonic()
                    if left < 0.01:
                        errors.append("out of time")
                        break
                    timeout = min(timeout, left)
                # verify and cert per call: requests lets REQUESTS_CA_BUNDLE override a session's own
                response = client.session.post(client.get_url(path), json=payload, timeout=timeout,
                                               verify=self._verify, cert=self._cert)
                if response.status_code != 200:
                    raise Etcd3Exception(response.text[:300], response.reason)
                answer = response.json()
            except (Etcd3Exception, requests.RequestException, ValueError) as exc:
                errors.append(f"{self.endpoints[index]}: {type(exc).__name__}: {str(exc)[:200]}")
                continue
            if index != start:
                with self._lock:
                    self._current = index
            return answer
        with self._lock:  # start the next call on the next endpoint
            self._current = (start + 1) % len(self._clients)
        raise ServiceUnavailable("etcd unreachable or without quorum: " + "; ".join(errors))

    @property
    def endpoint(self) -> str:
        """The endpoint calls go to first (tests, metrics)."""
        return self.endpoints[self._current]

    def get(self, key: str, deadline: float | None = None) -> tuple[bytes | None, dict[str, Any], int]:
        """(value or None, its key-value record, the store revision of the answer): linearizable."""
        answer = self.call("kv/range", {"key": b64(key)}, deadline)
        kvs = answer.get("kvs") or []
        revision = int(answer.get("header", {}).get("revision", 0))
        if not kvs:
            return None, {}, revision
        return unb64(kvs[0].get("value")), kvs[0], revision

    def range(self, start: str, end: str, limit: int = 0, revision: int = 0,
              keys_only: bool = False) -> tuple[list[dict[str, Any]], int, bool]:
        """(key-values in [start, end) in key order, store revision of the answer, more left)."""
        payload: dict[str, Any] = {"key": b64(start), "range_end": b64(end)}
        if limit:
            payload["limit"] = limit
        if revision:
            payload["revision"] = revision
        if keys_only:
            payload["keys_only"] = True
        answer = self.call("kv/range", payload)
        return (answer.get("kvs") or [], int(answer.get("header", {}).get("revision", 0)),
                bool(answer.get("more", False)))

    def txn(self, compare: list[dict], success: list[dict], failure: list[dict],
            deadline: float | None = None) -> dict[str, Any]:
        """One etcd transaction: ``success`` when every ``compare`` holds, else ``failure``."""
        return self.call("kv/txn", {"compare": compare, "success": success, "failure": failure}, deadline)

    def compact(self, revision: int) -> None:
        """Compact etcd's own MVCC history up to ``revision`` (tests, operators)."""
        self.call("kv/compaction", {"revision": revision, "physical": True})

    def watch(self, start: str, end: str, start_revision: int, read_timeout: float) -> WatchStream:
        """A watch on [start, end) from ``start_revision``, on the current endpoint (or the next)."""
        errors = []
        with self._lock:
            first = self._current
        for i in range(len(self.endpoints)):
            index = (first + i) % len(self.endpoints)
            try:
                stream = WatchStream(self.endpoints[index], start, end, start_revision, read_timeout,
                                     connect_timeout=self.timeout, verify=self._verify, cert=self._cert)
            except ServiceUnavailable as exc:
                errors.append(str(exc))
                continue
            with self._lock:
                self._current = index
            return stream
        raise ServiceUnavailable("; ".join(errors))

    # ReadableStore ----------------------------------------------------------------------
    def load(self, model: str) -> tuple[int, dict[str, Any] | None]:
        """``model``'s head revision and values (None when it has none)."""
        value, _, _ = self.get(self.key(model, "head"))
        if value is None:
            return 0, None
        head = json.loads(value)
        return head["revision"], head["values"]

    def events(self, model: str, since_revision: int, limit: int) -> list[dict[str, Any]]:
        """Up to ``limit`` of ``model``'s events after ``since_revision``."""
        start = self.key(model, "events", rev_key(since_revision + 1))
        kvs, _, _ = self.range(start, prefix_end(self.key(model, "events/")), limit=limit)
        return [json.loads(unb64(kv.get("value"))) for kv in kvs]

    def first_revision(self, model: str) -> int | None:
        """The oldest revision ``model``'s history still holds, or None."""
        kvs, _, _ = self.range(self.key(model, "events/"), prefix_end(self.key(model, "events/")), limit=1,
                               keys_only=True)
        if not kvs:
            return None
        return int(unb64(kvs[0]["key"]).decode().rsplit("/", 1)[1])

    def close(self) -> None:
        """Close the HTTP sessions to the etcd endpoints."""
        for client in self._clients:
            client.session.close()
