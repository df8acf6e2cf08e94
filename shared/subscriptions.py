"""The subscription store: which devices each user subscribed, one owner per device.

All writes go through :func:`shared.db.run_transaction`, so every operation is one transaction
that either happens whole or not at all, and is run again on a deadlock.
"""
from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timezone

from sqlalchemy import Engine, Select, bindparam, delete, func, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from shared.db import read_session, run_transaction, unavailable_as_503
from shared.models import Subscription
from shared.providers.base import Device

PROVIDERS = ("fcm", "apns", "webpush")
_USERS_PER_QUERY = 1000  # user ids per IN (...) list

Clock = Callable[[], datetime]


def utcnow() -> datetime:
    """Now, as the naive UTC datetime the database stores."""
    return datetime.now(timezone.utc).replace(tzinfo=None)


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

    def subscribe(
        self, user_id: str, new: NewSubscription, admit: Callable[[Session], bool] | None = None
    ) -> SubscribeResult | None:
        """Create the subscription, refresh it, or move it from another user to ``user_id``.

        Over the cap, the caller's least recently updated subscriptions are evicted in the same
        transaction, after the new row is written: a request that fails deletes nothing. Two
        requests racing to insert one token make one row: the loser's insert fails on the unique
        hash and its transaction runs again, finding the row.

        ``admit`` runs first in the same transaction (a rate limit counting the request); when
        it answers no, nothing is written and the result is ``None``.
        """

        def work(session: Session) -> SubscribeResult | None:
            if admit is not None and not admit(session):
                return None
            return self._subscribe(session, user_id, new)

        for attempt in range(3):
            try:
                return run_transaction(self.engine, work)
            except IntegrityError:
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def _subscribe(self, session: Session, user_id: str, new: NewSubscription) -> SubscribeResult:
        # Core statements, not the ORM's unit of work: this runs on every app start, and the
        # ORM's bookkeeping cost more CPU than the statements themselves.
        table = Subscription.__table__
        now = self.clock()
        digest = new.token_sha256
        # Lock the caller's rows first: concurrent subscribes of one user then take turns, so
        # the cap holds under races (MariaDB also locks the gap, SQLite has one writer anyway).
        held = session.scalars(
            select(table.c.id)
            .where(table.c.user_id == user_id)
            .order_by(table.c.updated_at, table.c.id)
            .with_for_update()
        ).all()
        row = session.execute(
            select(table.c.id, table.c.user_id, table.c.created_at)
            .where(table.c.token_sha256 == digest)
            .with_for_update()
        ).one_or_none()
        if row is not None and row.user_id != user_id:
            # The device changed hands. The new owner gets a new row, so nothing about it (its
            # id, its times) tells them the device was subscribed before.
            session.execute(delete(table).where(table.c.id == row.id))
            row = None
        values = {
            "user_id": user_id, "provider": new.provider, "token": new.token, "topic": new.topic,
            "environment": new.environment, "app": new.app, "updated_at": now,
        }
        if row is None:
            created_at = now
            inserted = session.execute(
                insert(table).values(token_sha256=digest, created_at=created_at, **values)
            )
            sub_id = inserted.inserted_primary_key[0]
        else:
            created_at, sub_id = row.created_at, row.id
            session.execute(update(table).where(table.c.id == sub_id).values(**values))

        others = [held_id for held_id in held if held_id != sub_id]
        excess = len(others) + 1 - self.cap
        evicted = others[:excess] if excess > 0 else []
        if evicted:
            session.execute(delete(table).where(table.c.id.in_(evicted)))
        subscription = Subscription(id=sub_id, token_sha256=digest, created_at=created_at, **values)
        return SubscribeResult(subscription, row is None, len(evicted))

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
            lambda s: s.execute(
                delete(Subscription).where(
                    Subscription.user_id == user_id, Subscription.token_sha256 == digest
                )
            ).rowcount,
        )

    def unsubscribe_all(self, user_id: str) -> int:
        """Delete every subscription of the caller (on logout)."""
        return run_transaction(
            self.engine,
            lambda s: s.execute(delete(Subscription).where(Subscription.user_id == user_id)).rowcount,
        )

    def for_users(self, user_ids: Iterable[str], provider: str) -> list[Device]:
        """The subscriptions of these users with this provider: what a dispatcher sends to."""
        users = list(user_ids)
        with unavailable_as_503(), read_session(self.engine) as session:
            return devices_of(self.devices_by_user_in(session, users, provider), users)

    @staticmethod
    def devices_by_user_in(session: Session, user_ids: Iterable[str], provider: str) -> dict[str, list[Device]]:
        """These users' devices with this provider, by user: one query serves several events."""
        ids = list(dict.fromkeys(user_ids))
        by_user: dict[str, list[Device]] = {}
        table = Subscription.__table__
        for start in range(0, len(ids), _USERS_PER_QUERY):
            rows = session.execute(
                _select_devices()
                .add_columns(table.c.user_id)
                .where(table.c.user_id.in_(ids[start : start + _USERS_PER_QUERY]), table.c.provider == provider)
            )
            for *device, user_id in rows:
                by_user.setdefault(user_id, []).append(Device(*device))
        return by_user

    def by_ids(self, ids: Iterable[int]) -> dict[int, Device]:
        wanted = list(dict.fromkeys(ids))
        if not wanted:
            return {}
        with unavailable_as_503(), read_session(self.engine) as session:
            rows = session.execute(_select_devices().where(Subscription.__table__.c.id.in_(wanted)))
            return {row.id: Device(*row) for row in rows}

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
            return {row.token_sha256: Device(*row) for row in rows}

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
        return run_transaction(self.engine, lambda s: s.execute(statement, rows).rowcount)

    def expire(self, not_updated_since: datetime, batch: int = 1000) -> int:
        """Delete subscriptions not refreshed since the cutoff, in batches of ``batch`` rows."""

        def one_batch(session: Session) -> int:
            ids = list(
                session.scalars(
                    select(Subscription.id)
                    .where(Subscription.updated_at < not_updated_since)
                    .limit(batch)
                )
            )
            if ids:
                session.execute(
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


def devices_of(by_user: dict[str, list[Device]], users: Iterable[str]) -> list[Device]:
    """The devices of these users, from :meth:`SubscriptionStore.devices_by_user_in`'s answer,
    each once, in id order."""
    devices = {device.id: device for user in users for device in by_user.get(user, ())}
    return sorted(devices.values(), key=lambda device: device.id)


def _select_devices() -> Select:
    """The columns of a :class:`Device`, in its field order. Dispatchers read these on every
    notification: plain rows cost a third of what loading ORM objects does."""
    c = Subscription.__table__.c
    return select(c.id, c.token, c.topic, c.environment, c.app, c.token_sha256)
