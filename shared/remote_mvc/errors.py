"""The one error tree of remote-mvc.

Every error raised on purpose by the library derives from :class:`MVCError`.
Errors raised inside a server method cross the Pyro5 wire with their type and
message intact: ``remote_mvc.setup()`` registers each class of this module with
Pyro5's serializer (:mod:`remote_mvc.pyro.setup`), so a client catches
``ValidationError`` rather than a generic error. This module itself imports no
Pyro5 and changes nothing at import.

::

    MVCError
    ├── ConfigError            bad or unknown settings (MVC_* variables)
    │   ├── UsageError            a command-line argument a tool cannot use (remote-mvc-ctl exits 2)
    │   └── SetupRequired         remote_mvc.setup() was not called (or with other TLS settings)
    ├── ValidationError        a change that the model's schema refuses
    ├── ConflictError          expected_revision did not match (optimistic concurrency)
    ├── AuthError
    │   ├── AuthenticationError   credentials missing, wrong, stale or replayed
    │   └── PermissionDenied      authenticated, but the role may not call this
    ├── PersistenceError       the state or audit log could not be made durable
    ├── SubscriptionError      unknown or expired subscription (lease ran out)
    ├── LimitExceeded          a per-identity or per-address limit was reached (subscriptions)
    ├── HistoryCompacted       the history no longer reaches back that far: take a snapshot
    ├── ServiceUnavailable     a service could not be found or reached in time
    └── GatewayError           the web gateway answered with an HTTP error no other class fits
"""

from __future__ import annotations

__all__ = [
    "MVCError",
    "ConfigError",
    "UsageError",
    "SetupRequired",
    "ValidationError",
    "ConflictError",
    "AuthError",
    "AuthenticationError",
    "PermissionDenied",
    "PersistenceError",
    "SubscriptionError",
    "LimitExceeded",
    "HistoryCompacted",
    "ServiceUnavailable",
    "GatewayError",
]


class MVCError(Exception):
    """Base of every error the library raises on purpose."""


class ConfigError(MVCError):
    """A setting is unknown, malformed or out of range."""


class UsageError(ConfigError):
    """A command-line argument the tool accepted syntactically but cannot use (e.g. ``--ns`` without a port)."""


class SetupRequired(ConfigError):
    """A client or service was used before ``remote_mvc.setup()`` configured Pyro5 for this process
    (or with TLS settings other than those it applied)."""


class ValidationError(MVCError):
    """A change was refused by the model's schema; nothing was changed."""


class ConflictError(MVCError):
    """The model's revision was not the one the caller expected."""


class AuthError(MVCError):
    """Base of authentication and authorization failures."""


class AuthenticationError(AuthError):
    """The caller's credentials are missing, wrong, stale or replayed."""


class PermissionDenied(AuthError):
    """The caller's role does not allow this call."""


class PersistenceError(MVCError):
    """State or audit could not be written durably; the change was not applied."""


class SubscriptionError(MVCError):
    """The subscription is unknown to the server (expired lease or server restart)."""


class LimitExceeded(MVCError):
    """A limit on what one identity or one address may hold was reached (e.g. subscriptions)."""


class HistoryCompacted(MVCError):
    """The history asked for was pruned; ``first_revision`` is the oldest kept."""

    def __init__(self, message: str, first_revision: int = 0) -> None:
        super().__init__(message)
        self.first_revision = first_revision


class ServiceUnavailable(MVCError):
    """A service could not be located or reached within the time allowed."""


class GatewayError(MVCError):
    """An HTTP error from the web gateway (unknown model 404, body too large 413, ...)."""

    def __init__(self, message: str, status: int = 0) -> None:
        super().__init__(message)
        self.status = status

