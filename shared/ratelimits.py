"""Fixed-window rate limits kept in the database, so every replica sees the same counts.

A limit is "at most ``count`` per ``window`` seconds" for a key (a device and event type, a
user). A hit is one upsert of the window's counter row: created at 1, or incremented while under
the limit, and one past the limit once a hit is refused; a count at most the limit says the hit
went through. The upsert locks the row as it finds it, so concurrent hits on one key never let
more than ``count`` through, and never deadlock on it (an INSERT IGNORE finding the row would take
a shared lock, and two hits each holding one deadlock when both then need the exclusive); keys
are locked in one order. Many keys cost the one statement (a dispatcher counts every device of an
event, subscribe every request of a batch); engines that cannot return the counts from the
upsert (MySQL) read them back.
"""
from __future__ import annotations

import functools
import hashlib
from collections.abc import Sequence
from datetime import datetime, timedelta, timezone

from sqlalchemy import Connection, Engine, Insert, case, delete, select, update
from sqlalchemy.dialects import mysql, sqlite

from shared.core import Clock, utcnow
from shared.db import run_transaction
from shared.models import RateCounter
from shared.settings import Limit

class RateLimiter:
    def __init__(self, engine: Engine, clock: Clock = utcnow) -> None:
        self.engine = engine
        self.clock = clock

    def hit(self, keys: Sequence[str], limit: Limit, at: datetime | None = None) -> list[bool]:
        """Count one hit on each key, in the window of ``at`` (default: now); for each, whether it
        was within the limit. Keep ``at`` to :meth:`refund` the hit later."""
        return run_transaction(self.engine, lambda connection: self.hit_in(connection, keys, limit, at))

    def hit_in(
        self, connection: Connection, keys: Sequence[str], limit: Limit, at: datetime | None = None
    ) -> list[bool]:
        """:meth:`hit` inside the caller's transaction (subscribe counts its request in the
        transaction that writes the subscription)."""
        window = _epoch(at or self.clock()) // limit.window_seconds
        expires_at = datetime.fromtimestamp((window + 1) * limit.window_seconds, timezone.utc).replace(
            tzinfo=None
        ) + timedelta(seconds=60)
        rows = [_row_key(key, limit.window_seconds, window) for key in keys]
        # One upsert counts each key once: a key hit n times goes to n of them, in order.
        rounds: list[dict[str, int]] = []  # row key -> its position in ``rows``
        for position, row in enumerate(rows):
            free = next((round_ for round_ in rounds if row not in round_), None)
            if free is None:
                rounds.append(free := {})
            free[row] = position
        allowed = [False] * len(rows)
        for round_ in rounds:
            counts = _count_hits(connection, sorted(round_), limit, expires_at)
            for row, position in round_.items():
                allowed[position] = counts[row] <= limit.count
        return allowed

    def refund(self, keys: Sequence[str], limit: Limit, counted_at: datetime | None = None) -> None:
        """Take back hits whose push never happened (a transient failure will be retried), in the
        window they were counted in: ``counted_at``, the ``at`` they were hit with. Without it,
        the window of now, which is another one once a window boundary has passed since."""
        window = _epoch(counted_at or self.clock()) // limit.window_seconds
        rows = [_row_key(key, limit.window_seconds, window) for key in keys]
        table = RateCounter.__table__
        if rows:
            run_transaction(
                self.engine,
                lambda connection: connection.execute(
                    update(table).where(table.c.key.in_(rows), table.c.count > 0)
                    # past the limit: hits were refused, and this frees one slot all the same
                    .values(count=case((table.c.count > limit.count, limit.count - 1), else_=table.c.count - 1))
                ),
            )

    def expire(self) -> int:
        now = self.clock()
        return run_transaction(
            self.engine,
            lambda connection: connection.execute(delete(RateCounter).where(RateCounter.expires_at < now)).rowcount,
        )


def _count_hits(connection: Connection, rows: list[str], limit: Limit, expires_at: datetime) -> dict[str, int]:
    """Count a hit on each of these distinct counter rows, in the dialect's upsert; each row's
    count after it."""
    dialect = connection.dialect
    statement = _upsert(dialect.name, dialect.insert_returning, limit.count)
    params = [{"key": row, "count": 1, "expires_at": expires_at} for row in rows]
    if dialect.insert_returning:
        counted_rows = connection.execute(statement, params)
    else:
        table = RateCounter.__table__
        connection.execute(statement, params)
        counted_rows = connection.execute(select(table.c.key, table.c.count).where(table.c.key.in_(rows)))
    return {key: count for key, count in counted_rows}


@functools.cache
def _upsert(dialect: str, returning: bool, limit: int) -> Insert:
    """The upsert of :func:`_count_hits`, built once per dialect and limit: building it and its
    cache key on every hit cost more CPU than running it."""
    table = RateCounter.__table__
    counted = case((table.c.count < limit, table.c.count + 1), else_=limit + 1)
    statement: Insert
    if dialect == "sqlite":
        statement = sqlite.insert(table).on_conflict_do_update(index_elements=[table.c.key], set_={"count": counted})
    else:
        statement = mysql.insert(table).on_duplicate_key_update(count=counted)
    return statement.returning(table.c.key, table.c.count) if returning else statement


def _row_key(key: str, window_seconds: int, window: int) -> str:
    return hashlib.sha256(f"{key}\n{window_seconds}\n{window}".encode()).hexdigest()


def _epoch(moment: datetime) -> int:
    """Seconds since the epoch of a naive UTC datetime (what the database stores)."""
    return int(moment.replace(tzinfo=timezone.utc).timestamp())
