"""One settings object for every service and client.

Defaults live in :class:`Settings`; each field can be overridden from the
environment as ``MVC_<FIELD>`` (upper case). Unknown ``MVC_*`` variables are an
error, like Pyro5's own ``PYRO_*`` handling, so a typo never silently falls back
to a default. Pyro5's settings keep their ``PYRO_`` names and go to Pyro5.
"""

from __future__ import annotations

import dataclasses
import os
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .errors import ConfigError

__all__ = ["Settings", "PREFIX"]

PREFIX = "MVC_"


@dataclasses.dataclass(frozen=True)
class Settings:
    """Every knob of remote-mvc, with its default."""

    service: str = "remote-mvc"
    log_level: str = "INFO"
    # where services are found
    ns_host: str = "127.0.0.1"
    ns_port: int = 9090
    model_name: str = "remote_mvc.model"
    ticker_name: str = "remote_mvc.ticker"
    watch: str = ""  # the name a viewer subscribes to; empty means model_name
    # where this process listens and what address it puts in its URIs
    host: str = "127.0.0.1"
    advertise_host: str = ""  # empty: host, or this machine's address when host is 0.0.0.0
    port: int = 0
    metrics_port: int = 0  # 0: an ephemeral port; -1: no metrics server
    threadpool_size: int = 1200  # Pyro5 workers; idle ones exit, so a high cap costs nothing
    handshake_timeout: float = 10.0  # a connection that does not complete its handshake by then is closed
    idle_timeout: float = 300.0  # servers close client connections idle this long (clients reconnect)
    anonymous_idle_timeout: float = 30.0  # ... and connections that proved no identity this long
    max_connections_per_address: int = 256  # connections one address may hold on a daemon (each holds a worker)
    max_request_bytes: int = 1024 * 1024  # the largest call an authenticated identity may send
    max_anonymous_request_bytes: int = 64 * 1024  # the largest call an anonymous connection may send
    # durable state
    state_dir: str = "runtime"
    state_path: str = ""  # empty: <state_dir>/<service>.sqlite3
    audit_path: str = ""  # empty: <state_dir>/<service>-audit.jsonl
    history_limit: int = 10000  # change events kept for catch-up
    # where the model's state lives: "sqlite" (one embedded file per model service, the default) or
    # etcd endpoints "http://host:2379,http://host2:2379" for cluster mode: any number of model-server
    # replicas share the state (docs/cluster.md)
    store: str = "sqlite"
    etcd_prefix: str = "/remote_mvc"  # the etcd key prefix every model of this deployment lives under
    replica: str = ""  # cluster mode: this replica's name (empty: <hostname>-<pid>); registered as <model>.<replica>
    # cluster mode over https endpoints: the CA that signed etcd's certificate, and this process's client
    # certificate and key when etcd requires one (--client-cert-auth)
    etcd_ca: str = ""
    etcd_cert: str = ""
    etcd_key: str = ""
    # write-ahead log bytes past which the store empties it (TRUNCATE checkpoint); keeps the WAL from
    # eating a small state volume (the volume should hold several times this plus the database)
    wal_limit_bytes: int = 4 * 1024 * 1024
    # credentials
    credentials: str = ""  # inline table: "identity:role:secret[:secret2],..."
    credentials_file: str = ""  # empty: <state_dir>/credentials.json when it exists
    identity: str = ""
    secret: str = ""
    max_clock_skew: float = 60.0
    # transport security: all three set turns on TLS with client certificates for every connection
    tls_ca: str = ""  # the private CA's certificate
    tls_cert: str = ""  # this process's certificate (used as server and as client)
    tls_key: str = ""
    # subscriptions and fan-out
    viewer_id: str = ""  # empty: <hostname>-<pid>
    lease_seconds: float = 10.0
    call_timeout: float = 3.0
    queue_limit: int = 1000  # how many events a viewer may fall behind before it gets a snapshot instead
    batch_max: int = 500  # events sent in one notification call at most
    # how a viewer host's daemon serves its connections: "thread" (a worker per connection; with one
    # stream per host that is one, and the fast path, TLS included) or "multiplex" (one thread for all;
    # no longer faster with streams, refuses TLS; kept for existing settings, see docs/performance.md)
    viewer_server: str = "thread"
    # one stream per viewer host (see remote_mvc.hoststream): the viewers of one model in one host share one
    # subscription; each viewer has its own backlog of at most this many events; a viewer further behind
    # (its handler slower than the change rate) is conflated: it gets the stream's latest state instead
    viewer_backlog: int = 256
    viewer_dispatch_threads: int = 4  # threads running viewers' handlers (a viewer on at most one at a time)
    # a handler running longer than this is stalled: while work waits, the host adds a spare worker so
    # the other viewers go on, up to viewer_dispatch_threads_max workers in all
    viewer_stall_seconds: float = 2.0
    viewer_dispatch_threads_max: int = 32
    viewer_spare_idle_seconds: float = 30.0  # a spare worker idle this long retires
    # model server: how many member viewers one stream subscription may claim (viewers() lists each)
    max_stream_members: int = 5000
    # who may hold how many subscriptions: an identity at most this many (admins are not bounded)...
    max_subscriptions_per_identity: int = 1000
    # ... and anonymous callers at most this many from one address
    max_subscriptions_per_address: int = 200
    # hosts a callback URI may name besides the subscriber's own address (comma-separated; for viewers
    # behind NAT, whose advertised address is not the one the server sees them call from); "*": any host
    callback_hosts: str = ""
    # audit records of refusals from one address: this many a second (and a burst of audit_refusal_burst),
    # beyond that they are counted into one summary record per address and second, never dropped
    audit_refusals_per_second: float = 20.0
    audit_refusal_burst: int = 100
    register_interval: float = 2.0  # how often services check their name server registration
    # a service's stop (SIGTERM) returns within about this many seconds, whatever its peers do: keep it
    # below the orchestrator's grace period (compose and Swarm stop_grace_period 10 s in our files,
    # Kubernetes terminationGracePeriodSeconds), or the process is killed before it has said goodbye
    stop_timeout: float = 8.0
    # cap of the jittered exponential backoff of every retry and reconnect loop (viewers re-subscribing,
    # services re-registering, clients reconnecting): after a restart, clients come back spread over it
    retry_backoff_max: float = 5.0
    # ticker
    ticker_interval: float = 1.0
    # web gateway (remote-mvc-gateway): HTTP API, event streams and the live page
    gateway_port: int = 8080  # where its HTTP server listens (on MVC_HOST); 0: an ephemeral port
    gateway_models: str = ""  # comma-separated model names it serves; empty: the model and the ticker
    gateway_ring: int = 1000  # recent change events kept per model so a stream resumes exactly
    gateway_client_buffer: int = 256  # events queued for one stream client; beyond, it gets a snapshot
    gateway_send_timeout: float = 10.0  # a stream client that takes longer to accept a write is dropped
    gateway_heartbeat: float = 15.0  # seconds between keep-alive comments on an idle stream
    gateway_max_clients: int = 10000  # stream clients at once (all models); beyond, 503
    gateway_max_body: int = 65536  # bytes of a modify request body; beyond, 413
    gateway_header_timeout: float = 10.0  # a connection must send a whole request head within this (slowloris)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Build settings from ``MVC_*`` variables, then explicit overrides."""
        environ = os.environ if environ is None else environ
        fields = {f.name: f for f in dataclasses.fields(cls)}
        values: dict[str, Any] = {}
        for key, raw in environ.items():
            if not key.startswith(PREFIX):
                continue
            name = key[len(PREFIX):].lower()
            if name not in fields:
                known = ", ".join(PREFIX + n.upper() for n in sorted(fields))
                raise ConfigError(f"unknown setting {key}; known settings: {known}")
            values[name] = _parse(key, raw, fields[name].type)
        for name in overrides:
            if name not in fields:
                raise ConfigError(f"unknown setting {name!r}")
        values.update(overrides)
        return cls(**values)

    def replace(self, **changes: Any) -> Settings:
        """A copy with some fields changed (unknown names are an error)."""
        try:
            return dataclasses.replace(self, **changes)
        except TypeError as exc:
            raise ConfigError(str(exc)) from None

    def __post_init__(self) -> None:
        for name in ("lease_seconds", "call_timeout", "ticker_interval", "register_interval", "handshake_timeout",
                     "idle_timeout", "anonymous_idle_timeout", "gateway_send_timeout", "gateway_heartbeat",
                     "gateway_header_timeout", "stop_timeout",
                     "retry_backoff_max"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{PREFIX}{name.upper()} must be positive")
        tls = [self.tls_ca, self.tls_cert, self.tls_key]
        if any(tls) and not all(tls):
            raise ConfigError(f"TLS needs all of {PREFIX}TLS_CA, {PREFIX}TLS_CERT and {PREFIX}TLS_KEY")
        if self.viewer_server not in ("thread", "multiplex"):
            raise ConfigError(f"{PREFIX}VIEWER_SERVER must be thread or multiplex, not {self.viewer_server!r}")
        if self.viewer_server == "multiplex" and any(tls):
            # Pyro5's multiplex server selects on the raw socket: a second message already decrypted
            # into the TLS layer's buffer would wait there unseen until more bytes arrive
            raise ConfigError(f"{PREFIX}VIEWER_SERVER=multiplex does not work with TLS; use thread")
        if self.store.strip() not in ("", "sqlite"):
            bad = [e for e in self.etcd_endpoints() if not e.startswith(("http://", "https://")) or e.count(":") != 2]
            if bad:
                raise ConfigError(f"{PREFIX}STORE must be sqlite or etcd endpoints like http://host:2379, not {bad}")
        if bool(self.etcd_cert) != bool(self.etcd_key):
            raise ConfigError(f"{PREFIX}ETCD_CERT and {PREFIX}ETCD_KEY go together")
        if self.viewer_stall_seconds <= 0 or self.viewer_spare_idle_seconds <= 0:
            raise ConfigError(f"{PREFIX}VIEWER_STALL_SECONDS and {PREFIX}VIEWER_SPARE_IDLE_SECONDS must be positive")
        if self.viewer_dispatch_threads_max < self.viewer_dispatch_threads:
            raise ConfigError(f"{PREFIX}VIEWER_DISPATCH_THREADS_MAX must be at least {PREFIX}VIEWER_DISPATCH_THREADS")
        if self.audit_refusals_per_second <= 0:
            raise ConfigError(f"{PREFIX}AUDIT_REFUSALS_PER_SECOND must be positive")
        for name in ("queue_limit", "batch_max", "history_limit", "threadpool_size", "max_subscriptions_per_identity",
                     "max_subscriptions_per_address", "audit_refusal_burst", "max_connections_per_address",
                     "max_request_bytes", "max_anonymous_request_bytes", "gateway_ring", "gateway_client_buffer",
                     "gateway_max_clients", "gateway_max_body", "wal_limit_bytes", "viewer_backlog",
                     "viewer_dispatch_threads", "max_stream_members"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{PREFIX}{name.upper()} must be at least 1")

    # derived values -------------------------------------------------------
    @property
    def tls(self) -> bool:
        """True when TLS is configured (``MVC_TLS_CA``)."""
        return bool(self.tls_ca)

    @property
    def gateway_model_names(self) -> list[str]:
        """The models the gateway relays: ``gateway_models``, else the model and the ticker."""
        names = [n.strip() for n in self.gateway_models.split(",") if n.strip()]
        return names or [self.model_name, self.ticker_name]

    @property
    def watched_name(self) -> str:
        """The model a viewer watches: ``watch``, else ``model_name``."""
        return self.watch or self.model_name

    def etcd_endpoints(self) -> list[str]:
        """The etcd endpoints ``store`` names (empty for sqlite)."""
        if self.store.strip() in ("", "sqlite"):
            return []
        return [e.strip().rstrip("/") for e in self.store.split(",") if e.strip()]

    def replica_name(self) -> str:
        """This replica's name: ``replica``, else host name and process id."""
        return self.replica or f"{socket.gethostname()}-{os.getpid()}"

    def state_file(self) -> Path:
        """The SQLite state file: ``state_path``, else ``<state_dir>/<service>.sqlite3``."""
        return Path(self.state_path or Path(self.state_dir) / f"{self.service}.sqlite3")

    def audit_file(self) -> Path:
        """The audit log: ``audit_path``, else ``<state_dir>/<service>-audit.jsonl``."""
        return Path(self.audit_path or Path(self.state_dir) / f"{self.service}-audit.jsonl")

    def credentials_path(self) -> Path:
        """The credentials file: ``credentials_file``, else ``<state_dir>/credentials.json``."""
        return Path(self.credentials_file or Path(self.state_dir) / "credentials.json")

    def advertised_host(self) -> str:
        """The host others reach us at: ``advertise_host``, else our own address when bound to all."""
        if self.advertise_host:
            return self.advertise_host
        if self.host in ("0.0.0.0", "", "::"):
            return _own_address()
        return self.host

    def default_viewer_id(self) -> str:
        """A viewer's id: ``viewer_id``, else host name and process id."""
        return self.viewer_id or f"{socket.gethostname()}-{os.getpid()}"


def _own_address() -> str:
    """The address other hosts on our network reach us at (a container's IP)."""
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return "127.0.0.1"


def _parse(key: str, raw: str, annotation: Any) -> Any:
    kind = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", str(annotation))
    try:
        if kind == "int":
            return int(raw)
        if kind == "float":
            return float(raw)
    except ValueError:
        raise ConfigError(f"{key}={raw!r} is not a valid {kind}") from None
    return raw
