"""Who may subscribe, renew, replace or end what: a model server's subscription policy.

A subscription belongs to whoever made it: its identity, and for anonymous
callers the address they called from. Only they (or an admin) renew, replace or
end it; each identity, and each address of anonymous callers, holds a bounded
number; the callback must be on the subscriber's own address (or a host named in
``MVC_CALLBACK_HOSTS``); each gets a secret capability, which every notification
to it carries (see :mod:`remote_mvc.viewer`). A viewer host's stream (one
subscription for its viewers of a model, see :mod:`remote_mvc.hoststream`) names
its member viewers: no one claims a viewer id another client holds, and members
count against their owner's cap as viewers subscribed one by one would.

:class:`Subscriptions` holds that policy and the member lists, and makes the
fan-out registry calls it needs (:class:`~remote_mvc.fanout.Fanout`: look-ups,
renew, remove, drop). It knows nothing of the commit pipeline or of Pyro5's
calling context: :class:`~remote_mvc.server.ModelServer` passes the
:class:`Caller` in, audits what is refused, and adds subscriptions to the
fan-out (with their backlog from the pipeline's history). Methods that change
or read the member lists run under the server's pipeline lock (``lock``), as
the fan-out's ``add`` does.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable
from contextlib import AbstractContextManager
from typing import Any, NamedTuple

from Pyro5.core import URI
from Pyro5.errors import PyroError

from . import auth
from .auth import host_of
from .errors import LimitExceeded, PermissionDenied, ValidationError
from .fanout import Fanout, Subscription

__all__ = ["Caller", "Subscriptions"]

MAX_RENEW = 100_000  # subscription ids one renew call may name


class Caller(NamedTuple):
    """Who calls: the proven identity, its role, and the address it called from (None: in process)."""

    identity: str
    role: str
    address: str | None

    @property
    def host(self) -> str | None:
        """The host part of the address."""
        return host_of(self.address)

    @property
    def admin(self) -> bool:
        """The role may drop viewers (admin): it owns every subscription and is bound by no cap."""
        return auth.DROP in auth.ROLES.get(self.role, ())

    @property
    def anonymous(self) -> bool:
        """No identity proven: anonymous callers are told apart by their address alone."""
        return self.identity == auth.ANONYMOUS


class Subscriptions:
    """The subscription policy of one model server over its fan-out (see the module docstring)."""

    def __init__(self, fanout: Fanout, lock: AbstractContextManager[Any], *,
                 max_per_identity: int = 1000, max_per_address: int = 200, callback_hosts: Iterable[str] = (),
                 max_members: int = 5000) -> None:
        self.fanout = fanout  # the server replaces it when every viewer is reset (a new epoch)
        self.lock = lock
        self.max_per_identity = max_per_identity
        self.max_per_address = max_per_address
        self.max_members = max_members
        self.callback_hosts = frozenset(h.strip().strip("[]") for h in callback_hosts if h.strip())
        # a viewer host's stream names its member viewers: subscription id -> (its subscriber, the member
        # ids), and member id -> subscription id; an entry whose subscriber is no longer the fan-out's is
        # stale (dropped, replaced) and pruned (see prune)
        self._members: dict[str, tuple[Subscription, tuple[str, ...]]] = {}
        self._member_of: dict[str, str] = {}

    # subscribe -----------------------------------------------------------------------------
    def check_request(self, caller: Caller, callback_uri: Any, viewer_id: Any, since_revision: Any,
                      capability: Any, epoch: Any, members: Any) -> tuple[str, ...] | None:
        """A subscribe call's arguments, checked (no lock needed); the member ids, if any."""
        if not isinstance(callback_uri, str) or not isinstance(viewer_id, str) or not viewer_id \
                or len(callback_uri) > 1000 or len(viewer_id) > 200:
            raise ValidationError("subscribe needs a callback URI and a viewer id (strings, at most 1000 and "
                                  "200 characters)")
        if since_revision is not None and (not isinstance(since_revision, int) or isinstance(since_revision, bool)):
            raise ValidationError("since_revision must be an integer or None")
        if capability is not None and not isinstance(capability, str):
            raise ValidationError("capability must be a string or None")
        if epoch is not None and (not isinstance(epoch, str) or len(epoch) > 64):
            raise ValidationError("epoch must be a string of at most 64 characters or None")
        member_ids = None if members is None else self.valid_members(members)
        self.check_callback(callback_uri, caller.host)
        return member_ids

    def admit(self, caller: Caller, viewer_id: str, capability: str | None,
              member_ids: tuple[str, ...] | None) -> Subscription | None:
        """Whether ``caller`` may subscribe ``viewer_id`` (with these members): PermissionDenied or
        LimitExceeded when not; the subscription it replaces, if any (lock held)."""
        old = self.fanout.of_viewer(viewer_id)
        if old is not None and not (self.owns(old, caller) or self.shows(old, capability)):
            raise PermissionDenied(f"viewer id {viewer_id!r} is subscribed by another client")
        self.check_caps(caller, replacing=old)
        self.check_member_ids((viewer_id, *(member_ids or ())), caller, old)
        if member_ids:
            self.check_member_caps(caller, len(member_ids), old)
        return old

    def added(self, sub: Subscription, replaced: Subscription | None, member_ids: tuple[str, ...] | None) -> None:
        """``sub`` was added to the fan-out in place of ``replaced``: record its members (lock held)."""
        if replaced is not None:
            self._forget_members(replaced.id)
        if member_ids is not None:
            self._set_members(sub, member_ids)

    # renew, members, unsubscribe ---------------------------------------------------------------
    def renew(self, caller: Caller, subscription_ids: Any) -> tuple[list[str], list[str]]:
        """Renew the leases of the caller's own subscriptions; returns the ids the fan-out does not
        know, and those that are another client's (not renewed: the server audits them)."""
        if not isinstance(subscription_ids, (list, tuple)) or len(subscription_ids) > MAX_RENEW \
                or not all(isinstance(sid, str) for sid in subscription_ids):
            raise ValidationError("renew takes a list of subscription ids (strings)")
        mine: list[str] = []
        foreign: list[str] = []
        for sid in subscription_ids:
            sub = self.fanout.get(sid)
            (foreign if sub is not None and not self.owns(sub, caller) else mine).append(sid)
        return self.fanout.renew(mine), foreign

    def set_members(self, caller: Caller, subscription_id: Any, viewer_ids: Any) -> bool:
        """A stream's new member list (its owner's call only, or an admin's); False when the
        subscription is unknown. Takes the lock."""
        if not isinstance(subscription_id, str):
            raise ValidationError("set_members takes a subscription id (a string) and a list of viewer ids")
        ids = self.valid_members(viewer_ids)
        with self.lock:
            sub = self.fanout.get(subscription_id)
            if sub is None:
                return False
            if not self.owns(sub, caller):
                raise PermissionDenied(f"subscription {subscription_id[:100]!r} is another client's")
            self.check_member_ids(ids, caller, sub)
            self.check_member_caps(caller, len(ids), sub)
            self._set_members(sub, ids)
        return True

    def unsubscribe(self, caller: Caller, subscription_id: Any) -> bool:
        """End a subscription (its owner's or an admin's call); False when it is unknown. Takes the lock."""
        if not isinstance(subscription_id, str):
            raise ValidationError("unsubscribe takes a subscription id (a string)")
        sub = self.fanout.get(subscription_id)
        if sub is None:
            return False
        if not self.owns(sub, caller):
            raise PermissionDenied(f"subscription {subscription_id!r} is another client's")
        with self.lock:
            self._forget_members(subscription_id)
        return self.fanout.remove(subscription_id)

    def describe(self, caller: Caller) -> list[dict[str, Any]]:
        """Who is subscribed: one entry per viewer (a stream: one per member, ``stream`` naming it);
        subscription ids, callback URIs and owners only of the caller's own subscriptions (an admin's:
        all of them)."""
        out: list[dict[str, Any]] = []
        for entry in self.fanout.describe():
            sid = entry.pop("subscription")
            uri, owner = entry.pop("uri"), entry.pop("identity")
            sub = self.fanout.get(sid)
            if sub is not None and self.owns(sub, caller):
                entry.update(subscription=sid, uri=uri, identity=owner)
            members = self.live_members(sid)
            if members is None:
                out.append(entry)
                continue
            stream = entry.pop("viewer_id")
            out.extend({"viewer_id": member, "stream": stream, **entry} for member in members[1])
        return out

    def drop_viewer(self, viewer_id: Any, reason: str = "admin") -> bool:
        """Force a viewer off; a member of a stream takes its stream off (the host subscribes again).
        False when no subscription or stream holds ``viewer_id``."""
        if self.fanout.drop_viewer(viewer_id, reason):
            return True
        if isinstance(viewer_id, str):
            sid = self._member_of.get(viewer_id)
            entry = self.live_members(sid) if sid is not None else None
            if entry is not None:
                self.fanout.drop(entry[0], reason)
                return True
        return False

    @property
    def member_lists(self) -> int:
        """How many streams' member lists are held (a stream the fan-out lost: until :meth:`prune`)."""
        return len(self._members)

    def prune(self) -> None:
        """Forget the members of streams the fan-out no longer holds (dropped, expired). Takes the lock."""
        with self.lock:
            for sid in [sid for sid in self._members if self.live_members(sid) is None]:
                self._forget_members(sid)

    # the policy ---------------------------------------------------------------------------
    @staticmethod
    def owns(sub: Subscription, caller: Caller) -> bool:
        """Whether the caller may renew, replace or end ``sub``: its owner, or an admin."""
        if caller.admin:
            return True
        if sub.identity != caller.identity:
            return False
        return not caller.anonymous or sub.host == caller.host

    @staticmethod
    def shows(sub: Subscription, capability: str | None) -> bool:
        """Whether ``capability`` is ``sub``'s secret (a viewer host whose address changed proves it
        is the subscription's owner with it)."""
        return capability is not None and hmac.compare_digest(sub.capability.encode(),
                                                              capability.encode("utf-8", "surrogatepass"))

    def check_callback(self, callback_uri: str, host: str | None) -> None:
        """A callback must be a ``PYRO:object@host:port`` URI on the subscriber's own address, so the
        server never connects anywhere else for anyone (no port probing, no pushing to a third party)."""
        try:
            uri = URI(callback_uri)
        except (PyroError, ValueError, TypeError) as exc:
            raise ValidationError(f"bad callback URI: {exc}") from None
        if uri.protocol != "PYRO" or not uri.host or uri.sockname or not uri.port:
            raise ValidationError("the callback must be a PYRO:object@host:port URI")
        if host is None or "*" in self.callback_hosts:
            return  # an in-process caller, or the operator turned the check off
        target = uri.host.strip("[]")
        if target != host and target not in self.callback_hosts:
            raise PermissionDenied(f"callback host {target} is not the subscriber's own address {host} "
                                   "(set MVC_CALLBACK_HOSTS for a viewer behind NAT)")

    def check_caps(self, caller: Caller, replacing: Subscription | None) -> None:
        """Bound the subscriptions one identity (anonymous: one address) holds; admins and in-process
        callers are not bound; a replacement by the same owner adds none."""
        if caller.admin:
            return
        identity, host = caller.identity, caller.host
        per_identity, per_address = self.fanout.owned(identity, host)
        if replacing is not None and replacing.identity == identity:
            per_identity, per_address = per_identity - 1, per_address - (replacing.host == host)
        if caller.anonymous:
            if per_address >= self.max_per_address:
                raise LimitExceeded(f"{per_address} subscriptions from {host} already: the limit for anonymous "
                                    f"callers from one address is {self.max_per_address}")
        elif per_identity >= self.max_per_identity:
            raise LimitExceeded(f"{identity} holds {per_identity} subscriptions already: the limit is "
                                f"{self.max_per_identity}")

    def valid_members(self, members: Any) -> tuple[str, ...]:
        """A stream's member list, checked: a list of distinct viewer ids (1-200 characters), at most
        ``max_members`` of them (checked before anything else of it is looked at)."""
        if not isinstance(members, (list, tuple)):
            raise ValidationError("members must be a list of viewer ids")
        if len(members) > self.max_members:
            raise LimitExceeded(f"a stream may name at most {self.max_members} member viewers, not {len(members)}")
        if not all(isinstance(m, str) and 0 < len(m) <= 200 for m in members):
            raise ValidationError("every member must be a viewer id (a string of 1 to 200 characters)")
        ids = tuple(members)
        if len(set(ids)) != len(ids):
            raise ValidationError("member viewer ids must be distinct")
        return ids

    def live_members(self, sid: str) -> tuple[Subscription, tuple[str, ...]] | None:
        """A stream's subscriber and members, when that subscription is still the fan-out's."""
        entry = self._members.get(sid)
        if entry is None or self.fanout.get(sid) is not entry[0]:
            return None
        return entry

    def check_member_ids(self, ids: Iterable[str], caller: Caller, replacing: Subscription | None) -> None:
        """No one claims a viewer id another client holds: as its own subscription, or as a member of
        its stream (lock held). The caller's own ids (and its subscription being replaced) are fine."""
        for viewer_id in ids:
            other = self.fanout.of_viewer(viewer_id)
            holders = [other] if other is not None and other is not replacing else []
            sid = self._member_of.get(viewer_id)
            entry = self.live_members(sid) if sid is not None else None
            if entry is not None and entry[0] is not replacing:
                holders.append(entry[0])
            for sub in holders:
                if not self.owns(sub, caller):
                    raise PermissionDenied(f"viewer id {viewer_id[:200]!r} is subscribed by another client")

    def check_member_caps(self, caller: Caller, count: int, replacing: Subscription | None) -> None:
        """A stream's members count against its owner's subscription cap as viewers subscribed one by
        one would (a stream counts as its members, at least one), so sharing a connection never lets
        an owner claim more viewers than it could before (lock held; admins are not bound)."""
        if caller.admin:
            return
        identity, host, anonymous = caller.identity, caller.host, caller.anonymous
        per_identity, per_address = self.fanout.owned(identity, host)
        held = per_address if anonymous else per_identity

        def mine(sub: Subscription) -> bool:
            return sub.identity == identity and (not anonymous or sub.host == host)

        if replacing is not None and mine(replacing) and self.fanout.get(replacing.id) is replacing:
            held -= 1
        for sid in list(self._members):
            entry = self.live_members(sid)
            if entry is not None and entry[0] is not replacing and mine(entry[0]):
                held += max(0, len(entry[1]) - 1)
        limit = self.max_per_address if anonymous else self.max_per_identity
        if held + max(1, count) > limit:
            who = f"anonymous callers from {host}" if anonymous else identity
            raise LimitExceeded(f"{who} would hold {held + count} viewers: the limit is {limit} (a stream's "
                                "members count as viewers)")

    def _set_members(self, sub: Subscription, ids: tuple[str, ...]) -> None:
        """Record a stream's members (lock held)."""
        self._forget_members(sub.id)
        self._members[sub.id] = (sub, ids)
        for viewer_id in ids:
            self._member_of[viewer_id] = sub.id

    def _forget_members(self, sid: str) -> None:
        """Forget a stream's members (lock held)."""
        entry = self._members.pop(sid, None)
        if entry is not None:
            for viewer_id in entry[1]:
                if self._member_of.get(viewer_id) == sid:
                    del self._member_of[viewer_id]
