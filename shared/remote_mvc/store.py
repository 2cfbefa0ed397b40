"""The public store interface: where a model's values, revision and history are kept.

Two backends exist, chosen by the ``MVC_STORE`` setting (see :func:`open_store`):

* ``sqlite`` (the default): :class:`SQLiteStore`, one embedded SQLite file per
  model service; its commit pipeline is :class:`~remote_mvc.commit.GroupCommit`.
* a comma-separated list of etcd endpoints (``http://host:2379,...``):
  :class:`~remote_mvc.etcd_store.EtcdStore`, shared by any number of model-server
  replicas; its commit pipeline is :class:`~remote_mvc.cluster.EtcdPipeline`,
  made by the store's ``pipeline()`` (a store that has one brings its own pipeline).

Every store can be read through :class:`ReadableStore`; a :class:`Store` can also be
written one batch of consecutive change events at a time.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from ._store import Store as SQLiteStore

if TYPE_CHECKING:
    from .config import Settings
    from .metrics import Metrics

__all__ = ["ReadableStore", "Store", "SQLiteStore", "open_store", "is_etcd"]


@runtime_checkable
class ReadableStore(Protocol):
    """What every backend answers: the state of a model and its recent change events."""

    def load(self, model: str) -> tuple[int, dict[str, Any] | None]:
        """The stored (revision, values) of a model; (0, None) when it was never stored."""
        ...

    def events(self, model: str, since_revision: int, limit: int) -> list[dict[str, Any]]:
        """Up to ``limit`` change events after ``since_revision``, oldest first."""
        ...

    def first_revision(self, model: str) -> int | None:
        """The oldest revision still in the history, or None when it is empty."""
        ...

    def close(self) -> None:
        """Release the store's resources."""
        ...


@runtime_checkable
class Store(ReadableStore, Protocol):
    """A store one model server writes alone (the embedded SQLite file)."""

    def commit(self, model: str, event: dict[str, Any], fsync: bool = True) -> None:
        """Record one change event and the values it produced."""
        ...

    def commit_many(self, model: str, events: list[dict[str, Any]], fsync: bool = True) -> None:
        """Record consecutive change events in one transaction: all of them or none."""
        ...


def is_etcd(setting: str) -> bool:
    """True when an ``MVC_STORE`` value names etcd endpoints rather than ``sqlite``."""
    return setting.strip() not in ("", "sqlite")


def open_store(settings: Settings, metrics: Metrics | None = None) -> ReadableStore:
    """The store ``settings.store`` names: SQLite at ``settings.state_file()`` or etcd's endpoints."""
    if is_etcd(settings.store):
        from .etcd_store import EtcdStore  # only cluster mode needs the etcd client

        return EtcdStore.from_settings(settings)
    return SQLiteStore(settings.state_file(), settings.history_limit, metrics=metrics,
                       wal_limit=settings.wal_limit_bytes)
