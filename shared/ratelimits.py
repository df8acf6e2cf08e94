"""Fixed-window rate limits kept in the database, so every replica sees the same counts.

A limit is "at most ``count`` per ``window`` seconds" for a key (a device and event type, a
user). Each hit is one atomic statement pair: create the window's counter row if missing, then
increment it only while it is under the limit; the row count of that UPDATE says whether the hit
was allowed. Concurrent hits on one key therefore never let more than ``count`` through.
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

    def hit(self, keys: Sequence[str], limit: Limit) -> list[bool]:
        """Count one hit on each key; for each, whether it was within the limit."""
        window = _epoch(self.clock()) // limit.window_seconds
        expires_at = datetime.fromtimestamp((window + 1) * limit.window_seconds, timezone.utc).replace(
            tzinfo=None
        ) + timedelta(seconds=60)
        rows = [_row_key(key, limit.window_seconds, window) for key in keys]

        def work(session: Session) -> list[bool]:
            if not rows:
                return []
            session.execute(
                insert_ignore(session, RateCounter),
                [{"key": r, "count": 0, "expires_at": expires_at} for r in rows],
            )
            table = RateCounter.__table__
            return [
                session.execute(
                    update(table).where(table.c.key == row, table.c.count < limit.count)
                    .values(count=table.c.count + 1)
                ).rowcount == 1
                for row in rows
            ]

        return run_transaction(self.engine, work)

    def refund(self, keys: Sequence[str], limit: Limit) -> None:
        """Take back hits whose push never happened (a transient failure will be retried)."""
        window = _epoch(self.clock()) // limit.window_seconds
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
