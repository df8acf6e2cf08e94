"""One APNs provider token per team and key, shared by every replica through the database.

Apple accepts a new provider token (an ES256 JWT naming the key and team, with its issue time) at
most every 20 minutes per key and refuses one older than 60 minutes; replicas that each signed
their own token on a cold start would trip ``429 TooManyProviderTokenUpdates``. So the token lives
in ``provider_tokens`` (:class:`shared.models.ProviderToken`), and whichever replica finds it
older than the refresh age (``PUSH_APNS_TOKEN_REFRESH_MINUTES``, default 40, 20 to 55) replaces it:

No stampede
    The replacement is a conditional ``UPDATE ... WHERE issued_at = <the value read>`` (for the
    very first token, an insert that ignores an existing key). Of several replicas finding the
    token stale at once, one changes the row; the others change nothing, read the row again and
    use the winner's token. The winner signs only after its write took the row (it writes the new
    ``issued_at`` with an empty token and fills in the signed token in the same transaction: the
    row lock, or SQLite's write lock, holds the others back, and no reader sees the empty token),
    so one refresh signs exactly one token, however many replicas race.

Memory first
    Each store keeps the token it last got per team and key, and goes to the database only when
    that copy reaches the refresh age, so a send costs no query. Threads of one process that find
    the copy stale together make one trip to the database (a lock per team and key).

Never too old
    A token is served only while younger than the refresh age (at most 55 minutes), so never past
    Apple's hour. ``issued_at`` is stored in whole seconds, equal to the token's ``iat``.

Time comes from an injectable clock (naive UTC, :func:`shared.core.utcnow`), so tests
advance it rather than sleep. Replicas' clocks are assumed to agree to well within minutes (NTP).
"""
from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import datetime, timedelta
from functools import partial

from sqlalchemy import Connection, Engine, delete, select, update

from shared.config import ConfigError
from shared.core import Clock, IssuedToken, utcnow
from shared.db import (
    get_engine,
    insert_ignore,
    read_session,
    run_transaction,
    unavailable_as_503,
)
from shared.models import ProviderToken
from shared.settings import DECLARED, read_setting

_REFRESH = DECLARED["PUSH_APNS_TOKEN_REFRESH_MINUTES"]
DEFAULT_REFRESH_MINUTES: int = _REFRESH.default
MIN_REFRESH_MINUTES = int(_REFRESH.minimum or 0)
"""Apple's minimum interval between new provider tokens."""
MAX_REFRESH_MINUTES = int(_REFRESH.maximum or 0)
"""Below Apple's 60-minute limit, with room for clock skew and a send in flight."""
_ATTEMPTS = 3

Signer = Callable[[datetime], str]
"""Signs a provider token issued at the given (naive UTC, whole-second) time (the APNs provider's
:func:`shared.providers.apns.sign_provider_token`, bound to its key: the store never sees keys)."""


class ApnsTokenStore:
    """The shared provider tokens in ``engine``'s database. Thread-safe; one per process."""

    def __init__(
        self,
        engine: Engine,
        *,
        refresh_minutes: int = DEFAULT_REFRESH_MINUTES,
        clock: Clock = utcnow,
    ) -> None:
        if not MIN_REFRESH_MINUTES <= refresh_minutes <= MAX_REFRESH_MINUTES:
            raise ConfigError(
                f"PUSH_APNS_TOKEN_REFRESH_MINUTES must be at least {MIN_REFRESH_MINUTES} and at "
                f"most {MAX_REFRESH_MINUTES}, not {refresh_minutes}"
            )
        self.engine = engine
        self.clock = clock
        self.refresh_age = timedelta(minutes=refresh_minutes)
        self._cache: dict[tuple[str, str], IssuedToken] = {}
        self._locks: dict[tuple[str, str], threading.Lock] = {}
        self._locks_guard = threading.Lock()

    @classmethod
    def from_env(cls, engine: Engine | None = None) -> ApnsTokenStore:
        """The store in ``engine`` (default: ``PUSH_DATABASE_URL``'s) with the configured age."""
        refresh = read_setting("PUSH_APNS_TOKEN_REFRESH_MINUTES")
        return cls(engine if engine is not None else get_engine(), refresh_minutes=refresh)

    def is_fresh(self, issued_at: datetime, now: datetime | None = None) -> bool:
        """Whether a token issued at ``issued_at`` may still be used (is younger than the
        refresh age)."""
        return (now if now is not None else self.clock()) - issued_at < self.refresh_age

    def get(self, team_id: str, key_id: str, sign: Signer) -> IssuedToken:
        """The shared token for the team and key, refreshed with ``sign`` when it is too old.
        Blocking (it may query the database): from async code, call it in a thread. Raises
        :class:`shared.db.DatabaseUnavailable` when the database cannot be reached."""
        key = (team_id, key_id)
        cached = self._cache.get(key)
        if cached is not None and self.is_fresh(cached.issued_at):
            return cached
        with self._lock(key):
            cached = self._cache.get(key)  # another thread may have just fetched it
            if cached is not None and self.is_fresh(cached.issued_at):
                return cached
            issued = self._load_or_refresh(team_id, key_id, sign)
            self._cache[key] = issued
            return issued

    def forget(self, team_id: str, key_id: str, issued_at: datetime) -> None:
        """Drop the token issued at ``issued_at``, which Apple refused (``InvalidProviderToken``:
        signed by another key than Apple holds under this key id, say, before an operator fixed
        the key): the next :meth:`get` signs a new one with the caller's key. A token replaced
        meanwhile is left alone."""
        key = (team_id, key_id)
        with self._lock(key):
            cached = self._cache.get(key)
            if cached is not None and cached.issued_at == issued_at:
                del self._cache[key]
            run_transaction(self.engine, lambda connection: connection.execute(
                delete(ProviderToken).where(
                    ProviderToken.team_id == team_id, ProviderToken.key_id == key_id,
                    ProviderToken.issued_at == issued_at)))

    def _lock(self, key: tuple[str, str]) -> threading.Lock:
        with self._locks_guard:
            return self._locks.setdefault(key, threading.Lock())

    def _load_or_refresh(self, team_id: str, key_id: str, sign: Signer) -> IssuedToken:
        for _ in range(_ATTEMPTS):
            now = self.clock()
            found = self._read(team_id, key_id)
            if found is not None and self.is_fresh(found.issued_at, now):
                return found
            replace = partial(
                self._replace, team_id=team_id, key_id=key_id, found=found, sign=sign, now=now
            )
            won = run_transaction(self.engine, replace)
            if won is not None:
                return won
            # Another replica replaced it first: read theirs.
        raise RuntimeError(
            f"APNs provider token for team {team_id} key {key_id}: still stale after {_ATTEMPTS}"
            " refresh attempts (are the replicas' clocks far apart?)"
        )

    def _read(self, team_id: str, key_id: str) -> IssuedToken | None:
        with unavailable_as_503(), read_session(self.engine) as session:
            row = session.execute(
                select(ProviderToken.token, ProviderToken.issued_at).where(
                    ProviderToken.team_id == team_id, ProviderToken.key_id == key_id
                )
            ).one_or_none()
        return None if row is None else IssuedToken(row.token, row.issued_at)

    @staticmethod
    def _replace(
        connection: Connection,
        team_id: str,
        key_id: str,
        found: IssuedToken | None,
        sign: Signer,
        now: datetime,
    ) -> IssuedToken | None:
        """Take the row if it still holds ``found`` (or is still missing), then sign the new token
        into it; ``None`` when another replica got there first."""
        issued_at = now.replace(microsecond=0)
        if found is None:
            taken = connection.execute(
                insert_ignore(connection, ProviderToken).values(
                    team_id=team_id, key_id=key_id, token="", issued_at=issued_at
                )
            )
        else:
            taken = connection.execute(
                update(ProviderToken)
                .where(
                    ProviderToken.team_id == team_id,
                    ProviderToken.key_id == key_id,
                    ProviderToken.issued_at == found.issued_at,
                )
                .values(token="", issued_at=issued_at)
            )
        if taken.rowcount != 1:
            return None
        token = sign(issued_at)
        connection.execute(
            update(ProviderToken)
            .where(ProviderToken.team_id == team_id, ProviderToken.key_id == key_id)
            .values(token=token)
        )
        return IssuedToken(token, issued_at)
