"""The subscription store: which devices each user subscribed, one owner per device.

All writes go through :func:`shared.db.run_transaction`, so every operation is one transaction
that either happens whole or not at all, and is run again on a deadlock.
"""
from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import partial

from sqlalchemy import Connection, Engine, Row, Select, bindparam, delete, func, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from shared.core import Clock, Device, utcnow
from shared.db import DatabaseUnavailable, read_session, run_transaction, unavailable_as_503
from shared.models import Subscription

_USERS_PER_QUERY = 1000  # user ids per IN (...) list

# Subscribe's statements, built once: building a statement and its cache key on every
# request cost about as much CPU as running it.
_c = Subscription.__table__.c
#: The subscriptions of these users, locked, least recently updated first.
_LOCK_USERS = (
    select(_c.id, _c.user_id, _c.token_sha256)
    .where(_c.user_id.in_(bindparam("user_ids", expanding=True)))
    .order_by(_c.updated_at, _c.id)
    .with_for_update()
)
#: The subscriptions of these devices (token hashes), locked.
_LOCK_DEVICES = (
    select(_c.id, _c.user_id, _c.token_sha256, _c.created_at)
    .where(_c.token_sha256.in_(bindparam("digests", expanding=True)))
    .with_for_update()
)
_DELETE = delete(Subscription.__table__).where(_c.id.in_(bindparam("ids", expanding=True)))
_INSERT = insert(Subscription.__table__)
_INSERT_RETURNING_IDS = _INSERT.returning(_c.id, sort_by_parameter_order=True)
_REFRESHED_COLUMNS = ("user_id", "provider", "token", "topic", "environment", "app", "updated_at")
#: A refresh of one subscription, by id (parameters ``b_id`` and ``b_`` + each column).
_REFRESH = (
    update(Subscription.__table__)
    .where(_c.id == bindparam("b_id"))
    .values({name: bindparam(f"b_{name}") for name in _REFRESHED_COLUMNS})
)

def token_sha256(identity: str) -> str:
    """The hash that identifies a device: of the token, or of a Web Push endpoint."""
    return hashlib.sha256(identity.encode()).hexdigest()


@dataclass(frozen=True)
class NewSubscription:
    """A validated subscribe request. ``identity`` is what makes the device unique: the token,
    or for Web Push the endpoint (its keys may change while it stays the same device)."""

    provider: str
    token: str
    identity: str
    topic: str | None = None
    environment: str | None = None
    app: str | None = None

    @property
    def token_sha256(self) -> str:
        return token_sha256(self.identity)


@dataclass(frozen=True)
class SubscribeRequest:
    """One subscribe request of :meth:`SubscriptionStore.subscribe_many`: who, and what."""

    user_id: str
    new: NewSubscription


#: Counts one request of each of these users (a rate limit) in the transaction that writes their
#: subscriptions; for each, whether it may go ahead.
Admit = Callable[[Connection, Sequence[str]], list[bool]]


@dataclass(frozen=True)
class SubscribeResult:
    subscription: Subscription
    created: bool
    """True when the caller did not hold this device before (new, or moved from another user)."""
    evicted: int
    """How many of the caller's least recently updated subscriptions made room under the cap."""


class SubscriptionStore:
    """Subscriptions in one database. ``cap`` bounds how many devices one user may hold."""

    def __init__(self, engine: Engine, cap: int = 10, clock: Clock = utcnow) -> None:
        self.engine = engine
        self.cap = cap
        self.clock = clock

    def subscribe_many(
        self, requests: Sequence[SubscribeRequest], admit: Admit | None = None
    ) -> list[SubscribeResult | None | Exception]:
        """Subscribe each request's device (created, refreshed, or moved from another user),
        with the result of each, ``None`` for those ``admit`` refused.

        Requests of distinct users and devices share a transaction and its statements (group
        commit: the subscribe function hands over every request that arrived meanwhile); a
        request naming a user or device already in the current one starts the next. So each
        request is written whole or not at all, and the outcome is that of running the requests
        one by one, in order. Over the cap, a user's least recently updated subscriptions are
        evicted in the same transaction. Two replicas racing to insert one token make one row:
        the loser's insert fails on the unique hash and its transaction runs again, finding it.

        A transaction that fails gives its requests the exception in place of a result, and
        the other groups go on (their callers must not hear of a failure that was not theirs);
        once the database is unavailable, the groups left get that without trying.
        """
        results: list[SubscribeResult | None | Exception] = []
        unavailable: DatabaseUnavailable | None = None
        for group in _independent_groups(requests):
            if unavailable is not None:
                results.extend([unavailable] * len(group))
                continue
            try:
                results.extend(self._subscribe_group(group, admit))
            except Exception as exc:  # noqa: BLE001 - handed to this group's callers
                results.extend([exc] * len(group))
                if isinstance(exc, DatabaseUnavailable):
                    unavailable = exc
        return results

    def _subscribe_group(
        self, group: Sequence[SubscribeRequest], admit: Admit | None
    ) -> list[SubscribeResult | None]:
        """One group of :meth:`subscribe_many` in one transaction, run again when a concurrent
        insert of the same device won the race."""
        for attempt in range(3):
            try:
                return run_transaction(self.engine, partial(self._subscribe, group=group, admit=admit))
            except IntegrityError:
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def _subscribe(
        self, connection: Connection, group: Sequence[SubscribeRequest], admit: Admit | None
    ) -> list[SubscribeResult | None]:
        # Core statements, not the ORM's unit of work: this runs on every app start, and the
        # ORM's bookkeeping cost more CPU than the statements themselves.
        now = self.clock()
        allowed = admit(connection, [request.user_id for request in group]) if admit else [True] * len(group)
        admitted = [request for request, ok in zip(group, allowed, strict=True) if ok]
        if not admitted:
            return [None] * len(group)
        digests = [request.new.token_sha256 for request in admitted]
        # Lock the callers' rows first: concurrent subscribes of one user then take turns, so
        # the cap holds under races (MariaDB also locks the gap, SQLite has one writer anyway).
        held: dict[str, list[tuple[int, str]]] = {request.user_id: [] for request in admitted}
        for sub_id, user_id, digest in connection.execute(_LOCK_USERS, {"user_ids": list(held)}):
            held[user_id].append((sub_id, digest))  # least recently updated first
        owners = {row.token_sha256: row for row in connection.execute(_LOCK_DEVICES, {"digests": digests})}
        doomed: list[int] = []
        plans = []  # (values, the row refreshed or None for a new one, evicted count)
        for request, digest in zip(admitted, digests, strict=True):
            row = owners.get(digest)
            if row is not None and row.user_id != request.user_id:
                # The device changed hands. The new owner gets a new row, so nothing about it
                # (its id, its times) tells them the device was subscribed before.
                doomed.append(row.id)
                previous = held.get(row.user_id)
                if previous is not None:
                    previous[:] = [item for item in previous if item[0] != row.id]
                row = None
            others = [item for item in held[request.user_id] if row is None or item[0] != row.id]
            evicted = others[: max(0, len(others) + 1 - self.cap)]
            for sub_id, evicted_digest in evicted:
                doomed.append(sub_id)
                owners.pop(evicted_digest, None)  # another user of the group subscribes it anew
            new = request.new
            values = {
                "user_id": request.user_id, "provider": new.provider, "token": new.token,
                "topic": new.topic, "environment": new.environment, "app": new.app, "updated_at": now,
            }
            plans.append((values, row, len(evicted)))
        if doomed:
            connection.execute(_DELETE, {"ids": doomed})
        fresh = [
            {"token_sha256": digest, "created_at": now, **values}
            for (values, row, _), digest in zip(plans, digests, strict=True)
            if row is None
        ]
        new_ids = iter(_insert(connection, fresh))
        refreshed = [
            {"b_id": row.id, **{f"b_{name}": value for name, value in values.items()}}
            for values, row, _ in plans
            if row is not None
        ]
        if refreshed:
            connection.execute(_REFRESH, refreshed)
        done = []
        for (values, row, evicted_count), digest in zip(plans, digests, strict=True):
            if row is None:
                sub_id, created_at = next(new_ids), now
            else:
                sub_id, created_at = row.id, row.created_at
            subscription = Subscription(id=sub_id, token_sha256=digest, created_at=created_at, **values)
            done.append(SubscribeResult(subscription, row is None, evicted_count))
        results = iter(done)
        return [next(results) if ok else None for ok in allowed]

    def list_for_user(self, user_id: str) -> list[Subscription]:
        """The user's subscriptions, oldest first."""
        with unavailable_as_503(), read_session(self.engine) as session:
            return list(
                session.scalars(
                    select(Subscription)
                    .where(Subscription.user_id == user_id)
                    .order_by(Subscription.created_at, Subscription.id)
                )
            )

    def unsubscribe(self, user_id: str, identity: str) -> int:
        """Delete the caller's subscription of this device; 0 when the caller does not hold it
        (whether or not somebody else does: nobody learns of other users' tokens)."""
        digest = token_sha256(identity)
        return run_transaction(
            self.engine,
            lambda connection: connection.execute(
                delete(Subscription).where(
                    Subscription.user_id == user_id, Subscription.token_sha256 == digest
                )
            ).rowcount,
        )

    def unsubscribe_all(self, user_id: str) -> int:
        """Delete every subscription of the caller (on logout)."""
        return run_transaction(
            self.engine,
            lambda connection: connection.execute(delete(Subscription).where(Subscription.user_id == user_id)).rowcount,
        )

    def for_users(self, user_ids: Iterable[str], provider: str) -> list[Device]:
        """The subscriptions of these users with this provider: what a dispatcher sends to."""
        users = list(user_ids)
        with unavailable_as_503(), read_session(self.engine) as session:
            return devices_of(self.devices_by_user_in(session, users, provider), users)

    @staticmethod
    def devices_by_user_in(
        connection: Connection | Session, user_ids: Iterable[str], provider: str
    ) -> dict[str, list[Device]]:
        """These users' devices with this provider, by user: one query serves several events.

        ``connection`` is a transaction's Core connection (the dispatcher claims the devices in
        the same transaction) or a read session (:meth:`for_users`): both run the Core query."""
        ids = list(dict.fromkeys(user_ids))
        by_user: dict[str, list[Device]] = {}
        for start in range(0, len(ids), _USERS_PER_QUERY):
            rows = connection.execute(
                _USERS_DEVICES, {"user_ids": ids[start : start + _USERS_PER_QUERY], "provider": provider}
            )
            for row in rows:
                by_user.setdefault(row.user_id, []).append(_device(row))
        return by_user

    def by_ids(self, ids: Iterable[int]) -> dict[int, Device]:
        wanted = list(dict.fromkeys(ids))
        if not wanted:
            return {}
        with unavailable_as_503(), read_session(self.engine) as session:
            rows = session.execute(_select_devices().where(Subscription.__table__.c.id.in_(wanted)))
            return {row.id: _device(row) for row in rows}

    def count_by_provider(self) -> dict[str, int]:
        with unavailable_as_503(), read_session(self.engine) as session:
            rows = session.execute(
                select(Subscription.provider, func.count()).group_by(Subscription.provider)
            )
            return {provider: count for provider, count in rows}

    def by_token_hashes(self, digests: Iterable[str], provider: str) -> dict[str, Device]:
        """Subscriptions by token hash, for requests that name devices by token (Echo's)."""
        wanted = list(dict.fromkeys(digests))
        if not wanted:
            return {}
        table = Subscription.__table__
        with unavailable_as_503(), read_session(self.engine) as session:
            rows = session.execute(
                _select_devices().where(table.c.token_sha256.in_(wanted), table.c.provider == provider)
            )
            return {row.token_sha256: _device(row) for row in rows}

    def delete_invalid(self, items: Iterable[tuple[int, str, datetime]]) -> int:
        """Delete subscriptions a provider called dead, given as (id, token hash, observed at).

        A row is kept when it was refreshed after the observation (the device re-registered) or
        when its id now holds another token; deleting twice deletes nothing more.
        """
        rows = [{"b_id": sub_id, "b_hash": digest, "b_seen": seen} for sub_id, digest, seen in items]
        if not rows:
            return 0
        table = Subscription.__table__
        statement = delete(table).where(
            table.c.id == bindparam("b_id"),
            table.c.token_sha256 == bindparam("b_hash"),
            table.c.updated_at <= bindparam("b_seen"),
        )
        return run_transaction(self.engine, lambda connection: connection.execute(statement, rows).rowcount)

    def expire(self, not_updated_since: datetime, batch: int = 1000) -> int:
        """Delete subscriptions not refreshed since the cutoff, in batches of ``batch`` rows."""

        def one_batch(connection: Connection) -> int:
            ids = list(
                connection.scalars(
                    select(Subscription.id)
                    .where(Subscription.updated_at < not_updated_since)
                    .limit(batch)
                )
            )
            if ids:
                connection.execute(
                    delete(Subscription).where(
                        Subscription.id.in_(ids), Subscription.updated_at < not_updated_since
                    )
                )
            return len(ids)

        total = 0
        while True:
            deleted = run_transaction(self.engine, one_batch)
            total += deleted
            if deleted < batch:
                return total


def _independent_groups(requests: Sequence[SubscribeRequest]) -> list[list[SubscribeRequest]]:
    """The requests in order, cut into groups in which no user and no device appears twice."""
    groups: list[list[SubscribeRequest]] = []
    users: set[str] = set()
    digests: set[str] = set()
    for request in requests:
        digest = request.new.token_sha256
        if not groups or request.user_id in users or digest in digests:
            groups.append([])
            users, digests = set(), set()
        groups[-1].append(request)
        users.add(request.user_id)
        digests.add(digest)
    return groups


def _insert(connection: Connection, rows: list[dict[str, object]]) -> list[int]:
    """Insert the subscriptions, in one statement where the engine returns the ids of several
    rows (MariaDB 10.5+, SQLite 3.35+); their ids, in order."""
    if not rows:
        return []
    if connection.dialect.insert_executemany_returning_sort_by_parameter_order:
        return list(connection.execute(_INSERT_RETURNING_IDS, rows).scalars())
    return [connection.execute(_INSERT, row).inserted_primary_key[0] for row in rows]


def devices_of(by_user: dict[str, list[Device]], users: Iterable[str]) -> list[Device]:
    """The devices of these users, from :meth:`SubscriptionStore.devices_by_user_in`'s answer,
    each once, in id order."""
    devices = {device.id: device for user in users for device in by_user.get(user, ())}
    return sorted(devices.values(), key=lambda device: device.id)


def _select_devices() -> Select:
    """The columns of a :class:`Device` (:func:`_device` makes one of a row). Dispatchers read
    these on every notification: plain rows cost a third of what loading ORM objects does."""
    c = Subscription.__table__.c
    return select(c.id, c.token, c.topic, c.environment, c.app, c.token_sha256)


def _device(row: Row) -> Device:
    """The device a row of :func:`_select_devices` names, field by field by name (a column added
    to the query, or a field to :class:`Device`, cannot shift the others)."""
    return Device(
        id=row.id, token=row.token, topic=row.topic, environment=row.environment, app=row.app,
        token_sha256=row.token_sha256,
    )


#: The devices of these users with one provider, each with its user id: what a dispatcher reads
#: for every batch of events, built once (building it and its cache key each time cost about as
#: much CPU as running it).
_USERS_DEVICES = (
    _select_devices()
    .add_columns(_c.user_id)
    .where(_c.user_id.in_(bindparam("user_ids", expanding=True)), _c.provider == bindparam("provider"))
)
