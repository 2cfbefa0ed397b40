"""remote-mvc: remote observable models over Pyro5.

A model server holds a typed, versioned, durable model; controllers change it
through authenticated, audited calls; viewers anywhere on the network are told
of every change, in order, and catch up after any gap.

Call :func:`setup` once at the start of a process (before any client or
service): it is the one place that configures Pyro5 process-wide.
"""

from .audit import AuditLog, read_audit
from .auth import Credentials, Identity, generate_credentials
from .client import AuthProxy, ModelClient, connect, resolve
from .config import Settings
from .errors import (
    AuthenticationError,
    AuthError,
    ConfigError,
    ConflictError,
    GatewayError,
    HistoryCompacted,
    LimitExceeded,
    MVCError,
    PermissionDenied,
    PersistenceError,
    ServiceUnavailable,
    SetupRequired,
    SubscriptionError,
    UsageError,
    ValidationError,
)
from .logs import configure_logging, log_event
from .metrics import Metrics, MetricsServer
from .model import ExampleModel, Field, Model, between, max_length, non_empty, one_of
from .nameserver import NameServer
from .pyro.setup import setup
from .server import ModelServer, ModelService
from .service import Service
from .ticker import Ticker, TickerModel, TickerService
from .viewer import Viewer, ViewerHost

__version__ = "0.1.0"

__all__ = [
    "AuditLog", "read_audit",
    "Credentials", "Identity", "generate_credentials",
    "Settings",
    "AuthProxy", "ModelClient", "connect", "resolve",
    "MVCError", "ConfigError", "UsageError", "ValidationError", "ConflictError", "AuthError", "AuthenticationError",
    "PermissionDenied", "PersistenceError", "SubscriptionError", "LimitExceeded", "HistoryCompacted",
    "ServiceUnavailable", "GatewayError", "SetupRequired",
    "configure_logging", "log_event",
    "Metrics", "MetricsServer",
    "Model", "Field", "ExampleModel", "between", "max_length", "non_empty", "one_of",
    "NameServer",
    "setup",
    "ModelServer", "ModelService",
    "Service",
    "Ticker", "TickerModel", "TickerService",
    "Viewer", "ViewerHost",
]
