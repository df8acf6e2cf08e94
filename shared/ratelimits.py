"""Fixed-window rate limits kept in the database, so every replica sees the same counts.

A limit is "at most ``count`` per ``window`` seconds" for a key (a device and event type, a
user). Each hit increments the window's counter row only while it is under the limit, and the row
count of that UPDATE says whether the hit was allowed; only when it changed nothing is the row
created if missing and the UPDATE tried again. Concurrent hits on one key therefore never let
more than ``count`` through. Updating first matters on MariaDB: an INSERT IGNORE finding the row
takes a shared lock, and two hits each holding one deadlock when both then need the exclusive.
"""
from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from sqlalchemy import Engine, delete, update
from sqlalchemy.orm import Session

from shared.config import ConfigError
from shared.db import insert_ignore, run_transaction
from shared.models import RateCounter
from shared.subscriptions import Clock, utcnow

_UNITS = {"s": 1, "second": 1, "m": 60, "minute": 60, "h": 3600, "hour": 3600, "d": 86400, "day": 86400}
_LIMIT = re.compile(r"^\s*(\d+)\s*/\s*(\d*)\s*([a-z]+)\s*$")


@dataclass(frozen=True)
class Limit:
    count: int
    window_seconds: int

    @classmethod
    def parse(cls, text: str, setting: str) -> Limit:
        """``"5/hour"``, ``"10/day"``, ``"3/15m"``: count per (number of) unit."""
        match = _LIMIT.match(text.lower()) if isinstance(text, str) else None
        if not match or match.group(3) not in _UNITS:
            raise ConfigError(f"{setting}: {text!r} is not a limit like 5/hour, 10/day or 3/15m")
        count, number, unit = int(match.group(1)), int(match.group(2) or 1), match.group(3)
        if count < 1 or number < 1:
            raise ConfigError(f"{setting}: {text!r} must allow at least 1 per window")
        return cls(count, number * _UNITS[unit])


class RateLimiter:
    def __init__(self, engine: Engine, clock: Clock = utcnow) -> None:
        self.engine = engine
        self.clock = clock

    def hit(self, keys: Sequence[str], limit: Limit, at: datetime | None = None) -> list[bool]:
        """Count one hit on each key, in the window of ``at`` (default: now); for each, whether it
        was within the limit. Keep ``at`` to :meth:`refund` the hit later."""
        return run_transaction(self.engine, lambda s: self.hit_in(s, keys, limit, at))

    def hit_in(self, session: Session, keys: Sequence[str], limit: Limit, at: datetime | None = None) -> list[bool]:
        """:meth:`hit` inside the caller's transaction (subscribe counts its request in the
        transaction that writes the subscription)."""
        window = _epoch(at or self.clock()) // limit.window_seconds
        expires_at = datetime.fromtimestamp((window + 1) * limit.window_seconds, timezone.utc).replace(
            tzinfo=None
        ) + timedelta(seconds=60)
        rows = [_row_key(key, limit.window_seconds, window) for key in keys]
        table = RateCounter.__table__

        def take(session: Session, row: str) -> bool:
            return session.execute(
                update(table).where(table.c.key == row, table.c.count < limit.count)
                .values(count=table.c.count + 1)
            ).rowcount == 1

        allowed = []
        for row in rows:
            ok = take(session, row)
            if not ok:  # at the limit, or the window's counter does not exist yet
                session.execute(
                    insert_ignore(session, RateCounter), {"key": row, "count": 0, "expires_at": expires_at}
                )
                ok = take(session, row)
            allowed.append(ok)
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
                lambda s: s.execute(
                    update(table).where(table.c.key.in_(rows), table.c.count > 0)
                    .values(count=table.c.count - 1)
                ),
            )

    def expire(self) -> int:
        now = self.clock()
        return run_transaction(
            self.engine, lambda s: s.execute(delete(RateCounter).where(RateCounter.expires_at < now)).rowcount
        )


def _row_key(key: str, window_seconds: int, window: int) -> str:
    return hashlib.sha256(f"{key}\n{window_seconds}\n{window}".encode()).hexdigest()


def _epoch(moment: datetime) -> int:
    """Seconds since the epoch of a naive UTC datetime (what the database stores)."""
    return int(moment.replace(tzinfo=timezone.utc).timestamp())
