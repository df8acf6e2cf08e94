"""The subscription store: which devices each user subscribed, one owner per device.

All writes go through :func:`shared.db.run_transaction`, so every operation is one transaction
that either happens whole or not at all, and is run again on a deadlock.
"""
from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timezone

from sqlalchemy import Engine, bindparam, delete, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from shared.db import read_session, run_transaction, unavailable_as_503
from shared.models import Subscription

PROVIDERS = ("fcm", "apns", "webpush")

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

    def subscribe(self, user_id: str, new: NewSubscription) -> SubscribeResult:
        """Create the subscription, refresh it, or move it from another user to ``user_id``.

        Over the cap, the caller's least recently updated subscriptions are evicted in the same
        transaction, after the new row is written: a request that fails deletes nothing. Two
        requests racing to insert one token make one row: the loser's insert fails on the unique
        hash and its transaction runs again, finding the row.
        """
        for attempt in range(3):
            try:
                return run_transaction(self.engine, lambda s: self._subscribe(s, user_id, new))
            except IntegrityError:
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def _subscribe(self, session: Session, user_id: str, new: NewSubscription) -> SubscribeResult:
        now = self.clock()
        # Lock the caller's rows first: concurrent subscribes of one user then take turns, so
        # the cap holds under races (MariaDB also locks the gap, SQLite has one writer anyway).
        held = list(
            session.scalars(
                select(Subscription)
                .where(Subscription.user_id == user_id)
                .order_by(Subscription.updated_at, Subscription.id)
                .with_for_update()
            )
        )
        row = session.scalars(
            select(Subscription).where(Subscription.token_sha256 == new.token_sha256).with_for_update()
        ).one_or_none()
        if row is not None and row.user_id != user_id:
            # The device changed hands. The new owner gets a new row, so nothing about it (its
            # id, its times) tells them the device was subscribed before.
            session.delete(row)
            session.flush()
            row = None
        created = row is None
        if row is None:
            row = Subscription(user_id=user_id, created_at=now, token_sha256=new.token_sha256)
            session.add(row)
        row.user_id = user_id
        row.provider = new.provider
        row.token = new.token
        row.topic = new.topic
        row.environment = new.environment
        row.app = new.app
        row.updated_at = now
        session.flush()

        others = [held_row for held_row in held if held_row.id != row.id]
        excess = len(others) + 1 - self.cap
        evicted = others[:excess] if excess > 0 else []
        if evicted:
            session.execute(delete(Subscription).where(Subscription.id.in_([r.id for r in evicted])))
        return SubscribeResult(row, created, len(evicted))

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

    def for_users(self, user_ids: Iterable[str], provider: str) -> list[Subscription]:
        """The subscriptions of these users with this provider: what a dispatcher sends to."""
        ids = list(dict.fromkeys(user_ids))
        if not ids:
            return []
        with unavailable_as_503(), read_session(self.engine) as session:
            return list(
                session.scalars(
                    select(Subscription)
                    .where(Subscription.user_id.in_(ids), Subscription.provider == provider)
                    .order_by(Subscription.id)
                )
            )

    def by_ids(self, ids: Iterable[int]) -> dict[int, Subscription]:
        wanted = list(dict.fromkeys(ids))
        if not wanted:
            return {}
        with unavailable_as_503(), read_session(self.engine) as session:
            return {row.id: row for row in session.scalars(select(Subscription).where(Subscription.id.in_(wanted)))}

    def count_by_provider(self) -> dict[str, int]:
        with unavailable_as_503(), read_session(self.engine) as session:
            rows = session.execute(
                select(Subscription.provider, func.count()).group_by(Subscription.provider)
            )
            return {provider: count for provider, count in rows}

    def by_token_hashes(self, digests: Iterable[str], provider: str) -> dict[str, Subscription]:
        """Subscriptions by token hash, for requests that name devices by token (Echo's)."""
        wanted = list(dict.fromkeys(digests))
        if not wanted:
            return {}
        with unavailable_as_503(), read_session(self.engine) as session:
            rows = session.scalars(
                select(Subscription).where(
                    Subscription.token_sha256.in_(wanted), Subscription.provider == provider
                )
            )
            return {row.token_sha256: row for row in rows}

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
