"""The database schema, as SQLAlchemy 2 models. One schema serves SQLite and MySQL/MariaDB.

Migrations in ``shared/migrations`` create and change these tables; the models are what the code
reads and writes. Times are naive UTC with microseconds (``DATETIME(6)`` on MySQL), because
clean-up compares a row's ``updated_at`` with the moment a provider called its token dead, and
those can be milliseconds apart.
"""
from __future__ import annotations

from datetime import datetime

from sqlalchemy import (
    BigInteger,
    Boolean,
    DateTime,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.dialects import mysql
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

#: A timestamp with microseconds on every engine (MySQL's plain DATETIME drops them).
Timestamp = DateTime().with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")
#: A 64-bit id that SQLite still auto-increments (it only does so for INTEGER PRIMARY KEY).
BigId = BigInteger().with_variant(Integer(), "sqlite")


class Base(DeclarativeBase):
    pass


class Subscription(Base):
    """One device's push subscription, owned by one wiki user.

    ``token`` is the provider's token; for Web Push, the subscription JSON (endpoint and keys).
    ``token_sha256`` hashes what identifies the device (the token, or the Web Push endpoint) and is
    unique across all users: a device belongs to one user at a time, and lookups and clean-up
    reports use the hash, never the token. ``user_id`` compares exactly on every engine: on MySQL
    and MariaDB its collation is a NO PAD binary one (migration 0005), so ``"123 "`` is never
    ``"123"``.
    """

    __tablename__ = "subscriptions"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    user_id: Mapped[str] = mapped_column(String(64), nullable=False)
    provider: Mapped[str] = mapped_column(String(16), nullable=False)
    token: Mapped[str] = mapped_column(Text, nullable=False)
    token_sha256: Mapped[str] = mapped_column(String(64), nullable=False)
    topic: Mapped[str | None] = mapped_column(String(255))
    environment: Mapped[str | None] = mapped_column(String(16))
    app: Mapped[str | None] = mapped_column(String(64))
    """The app (in ``PUSH_APPS``) whose credentials reach this device; ``None``: the default."""
    created_at: Mapped[datetime] = mapped_column(Timestamp, nullable=False)
    updated_at: Mapped[datetime] = mapped_column(Timestamp, nullable=False)

    __table_args__ = (
        UniqueConstraint("token_sha256", name="uq_subscriptions_token_sha256"),
        # Dispatchers read "these users' subscriptions of my provider" on every notification.
        Index("ix_subscriptions_user_provider", "user_id", "provider"),
        # Expiry deletes rows not refreshed for months.
        Index("ix_subscriptions_updated_at", "updated_at"),
        {"sqlite_autoincrement": True},  # ids are never reused, as on MySQL
    )


class Delivery(Base):
    """What one event did for one subscription, so a redelivered event never pushes twice.

    A dispatcher claims the row (``state = "sending"``, its own ``claim``, a lease) before it
    sends, and records the outcome after: ``delivered``, ``dead`` (reported to clean-up, again on
    redelivery) or ``rejected``. A transient failure deletes the claim so the redelivery sends
    again; a claim whose lease ran out (its dispatcher died) may be taken over. Rows expire.
    """

    __tablename__ = "deliveries"

    event_key: Mapped[str] = mapped_column(String(64), primary_key=True)
    subscription_id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=False)
    state: Mapped[str] = mapped_column(String(16), nullable=False)
    claim: Mapped[str | None] = mapped_column(String(32))
    lease_until: Mapped[datetime | None] = mapped_column(Timestamp)
    reason: Mapped[str | None] = mapped_column(String(64))
    observed_at: Mapped[datetime | None] = mapped_column(Timestamp)
    expires_at: Mapped[datetime] = mapped_column(Timestamp, nullable=False)

    __table_args__ = (Index("ix_deliveries_expires_at", "expires_at"),)


class RateCounter(Base):
    """A fixed-window counter shared by every replica: how many times ``key`` was counted in
    the window starting at ``window_start``. Used for per-event-type push limits and for
    per-user request limits; rows expire with their window."""

    __tablename__ = "rate_counters"

    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    count: Mapped[int] = mapped_column(Integer, nullable=False)
    expires_at: Mapped[datetime] = mapped_column(Timestamp, nullable=False)

    __table_args__ = (Index("ix_rate_counters_expires_at", "expires_at"),)


class PendingPush(Base):
    """A wake-up waiting for its privacy delay: one per device and message type, so several
    events within the delay collapse into one push.

    ``due_at`` is drawn at random per pending push when it is first stored. A flush claims due
    rows (``claim``, ``claimed_until``) before sending, so two flushing replicas never send one
    row twice, and a row whose flusher died is claimed again after the lease. ``version`` counts
    the events coalesced into the row: a flush deletes the row only if no event joined it
    meanwhile.
    """

    __tablename__ = "pending_pushes"

    subscription_id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=False)
    message_type: Mapped[str] = mapped_column(String(64), primary_key=True)
    provider: Mapped[str] = mapped_column(String(16), nullable=False)
    ttl_seconds: Mapped[int] = mapped_column(Integer, nullable=False)
    created_at: Mapped[datetime] = mapped_column(Timestamp, nullable=False)
    due_at: Mapped[datetime] = mapped_column(Timestamp, nullable=False)
    version: Mapped[int] = mapped_column(Integer, nullable=False)
    claim: Mapped[str | None] = mapped_column(String(32))
    claimed_until: Mapped[datetime | None] = mapped_column(Timestamp)
    app: Mapped[str] = mapped_column(String(64), nullable=False, server_default="")
    """The subscription's app (``""``: the default app), so a hold on one app holds its rows."""
    kept: Mapped[str | None] = mapped_column(String(16))
    """Why a hold keeps it (``paused``, ``credentials``); ``None``: it only waits for its delay."""
    expires_at: Mapped[datetime | None] = mapped_column(Timestamp)
    """When its TTL runs out for a kept wake-up: past it, it is dropped (counted as expired)."""

    __table_args__ = (Index("ix_pending_pushes_provider_due", "provider", "due_at"),)


class Hold(Base):
    """Sends to one provider and app held back (see :mod:`shared.holds`).

    ``kind`` ``pause``: an operator's ``pushctl pause`` (``provider`` and ``app`` may be ``*``:
    all), with its ``reason``, who (``held_by``) and ``discard`` (drop instead of keep).
    ``kind`` ``credentials``: the provider refused our credentials for this app; ``reason`` is
    the provider's word, ``probe_at`` when the next real send may test them, ``failures`` how
    many probes failed (the backoff). ``app`` ``""`` is the default app.
    """

    __tablename__ = "holds"

    kind: Mapped[str] = mapped_column(String(16), primary_key=True)
    provider: Mapped[str] = mapped_column(String(16), primary_key=True)
    app: Mapped[str] = mapped_column(String(64), primary_key=True)
    reason: Mapped[str] = mapped_column(String(255), nullable=False)
    held_by: Mapped[str | None] = mapped_column(String(64))
    since: Mapped[datetime] = mapped_column(Timestamp, nullable=False)
    discard: Mapped[bool] = mapped_column(Boolean, nullable=False, default=False)
    probe_at: Mapped[datetime | None] = mapped_column(Timestamp)
    failures: Mapped[int] = mapped_column(Integer, nullable=False, default=0)


class ProviderToken(Base):
    """One signed APNs provider token per team and key, shared by every replica.

    Apple accepts a new provider token at most every 20 minutes and wants one at least every 60;
    replicas that each minted their own would trip ``TooManyProviderTokenUpdates``. Whichever
    replica finds the token older than the refresh age replaces it, with a conditional update on
    ``issued_at`` so only one of several racing replicas wins.
    """

    __tablename__ = "provider_tokens"

    team_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    key_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    token: Mapped[str] = mapped_column(Text, nullable=False)
    issued_at: Mapped[datetime] = mapped_column(Timestamp, nullable=False)


class DeadLetter(Base):
    """An event the broker gave up on after every retry, kept until it is replayed.

    The broker posts it to clean-up's ``/dead-letters`` route with Knative's error attributes
    (``knativeerrordest``: the subscriber that failed, ``knativeerrorcode``, ``knativeerrordata``).
    ``key_sha256`` hashes the event's source, id and that destination: a dead letter posted twice
    is kept once, while the same event failing at two dispatchers is kept once per dispatcher.
    ``attributes`` is the event's attributes as JSON (the error attributes included), ``data`` its
    body as received; ``pushctl dead-letters replay`` posts them again and deletes what was taken.
    """

    __tablename__ = "dead_letters"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    key_sha256: Mapped[str] = mapped_column(String(64), nullable=False)
    event_id: Mapped[str] = mapped_column(String(255), nullable=False)
    event_type: Mapped[str] = mapped_column(String(255), nullable=False)
    destination: Mapped[str | None] = mapped_column(Text)
    error_code: Mapped[int | None] = mapped_column(Integer)
    attributes: Mapped[str] = mapped_column(Text, nullable=False)
    data: Mapped[bytes] = mapped_column(LargeBinary().with_variant(mysql.LONGBLOB(), "mysql", "mariadb"), nullable=False)
    received_at: Mapped[datetime] = mapped_column(Timestamp, nullable=False)
    replay_attempts: Mapped[int] = mapped_column(Integer, nullable=False)
    last_replay_error: Mapped[str | None] = mapped_column(String(255))

    __table_args__ = (
        UniqueConstraint("key_sha256", name="uq_dead_letters_key_sha256"),
        Index("ix_dead_letters_received_at", "received_at"),
        {"sqlite_autoincrement": True},
    )
