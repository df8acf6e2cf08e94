"""Wake-ups waiting in the database: those of the privacy delay, and those a hold keeps.

Both are kept in the database, not in a process: replicas come and go, and a restart must lose
nothing.

- The privacy delay (``PUSH_PRIVACY_DELAY``, :class:`shared.settings.PrivacyDelay`): wake-ups are
  stored as pending, one per device and message type, each due after its own random delay in
  [MIN, MAX], so push traffic is harder to link to on-wiki actions; events arriving meanwhile for
  the same device collapse into that one wake-up. A periodic tick (``dev.knative.sources.ping`` to
  each dispatcher) sends what is due.
- A hold (:mod:`shared.holds`) keeps the wake-ups it holds back here, due at once, until it lifts.
- ``PUSH_PENDING_LEASE_SECONDS``: how long a flush's claim keeps other flushes off the wake-ups
  it is sending (default 120). It must be above ``PUSH_DISPATCH_DEADLINE_SECONDS`` plus
  ``PUSH_DISPATCH_DRAIN_SECONDS``, the time a flush may spend sending and then recording
  (:mod:`shared.recorder`): a claim running out meanwhile would let the next tick send again
  (:data:`shared.settings.RULES`).
"""
from __future__ import annotations

import random
import secrets
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import partial

from sqlalchemy import Connection, Engine, case, delete, func, select, tuple_, update

from shared.core import Clock, utcnow
from shared.db import insert_ignore, read_session, run_transaction, unavailable_as_503
from shared.models import PendingPush
from shared.settings import DeliverySettings, PrivacyDelay


def _later(deadline: datetime, column):
    """The later of ``deadline`` and a deadline column (``deadline`` where the column has none)."""
    return case(((column.is_(None)) | (column < deadline), deadline), else_=column)


def _keys_in(items: Iterable[Due] | Iterable[tuple[int, str]]):
    """``(subscription_id, message_type) IN (...)`` for these pending wake-ups or keys."""
    table = PendingPush.__table__
    keys = [(i.subscription_id, i.message_type) if isinstance(i, Due) else tuple(i) for i in items]
    return tuple_(table.c.subscription_id, table.c.message_type).in_(keys)


REFUSED = "refused"
"""``kept`` of a wake-up whose device refused our Web Push key, while it is not known yet whether
the key is wrong for that subscription or for every one (:mod:`shared.holds`): no flush sends
it, but as a probe; a delivery to the app makes it a :data:`RECHECK`."""
RECHECK = "recheck"
"""``kept`` of a wake-up whose device refused our key before a delivery showed that key to work:
sent once more, and rejected as ``vapid_key_mismatch`` if refused again."""


@dataclass(frozen=True)
class Due:
    """A pending wake-up a flush claimed: send it, then :meth:`PendingStore.finish` it."""

    subscription_id: int
    message_type: str
    ttl_seconds: int
    version: int
    expires_at: datetime | None = None
    """When its TTL runs out; ``None`` for a privacy-delay wake-up never kept by a hold."""
    kept: str | None = None
    """Why a hold kept it, if one did."""

    def ttl_at(self, now: datetime) -> int | None:
        """The TTL to send it with at ``now``: what is left of its own (a wake-up kept for an
        hour by a hold goes out with an hour less), ``None`` once that ran out."""
        if self.expires_at is None:
            return self.ttl_seconds
        if self.expires_at < now:
            return None
        return int((self.expires_at - now).total_seconds())


@dataclass(frozen=True)
class FlushScope:
    """What a flush of one provider leaves alone: the apps whose sends are held (``"*"``: all),
    except one wake-up of each app in ``probe`` (a credentials probe is due), and the
    :data:`REFUSED` wake-ups, except one of each app in ``probe_refused``."""

    held: frozenset[str] = frozenset()
    probe: frozenset[str] = frozenset()
    probe_refused: frozenset[str] = frozenset()
    """Apps one of whose :data:`REFUSED` wake-ups goes out as a probe: does our key work now?"""

    @property
    def everything_held(self) -> bool:
        return "*" in self.held


class PendingStore:
    """Wake-ups waiting in the database, shared by every replica: those of the privacy delay
    (``delay``), and those a hold keeps (:mod:`shared.holds`), due at once and sent when it lifts.
    Without a ``delay`` only kept wake-ups are stored."""

    def __init__(
        self,
        engine: Engine,
        delay: PrivacyDelay | None = None,
        clock: Clock = utcnow,
        uniform: Callable[[float, float], float] = random.SystemRandom().uniform,
        lease_seconds: float = DeliverySettings.pending_lease_seconds,
    ) -> None:
        self.engine = engine
        self.delay = delay
        self.lease = timedelta(seconds=lease_seconds)
        """How long a flush's claim keeps other flushes off the wake-ups it sends
        (``PUSH_PENDING_LEASE_SECONDS``)."""
        self.clock = clock
        self.uniform = uniform

    def _due_at(self, now: datetime) -> datetime:
        """A delay drawn afresh for every pending push (not once per process); none without it."""
        if self.delay is None:
            return now
        return now + timedelta(seconds=self.uniform(self.delay.min_seconds, self.delay.max_seconds))

    def keep(self, provider: str, items: Iterable[tuple[int, str]], message_type: str, ttl: int, why: str) -> None:
        """Keep a wake-up per (subscription id, app), due at once but held back by ``why`` (a
        hold's kind), until its TTL runs out; folded into one already waiting for the device,
        whose deadline it extends."""
        rows = list(items)
        if rows:
            run_transaction(self.engine, partial(self.keep_in, provider=provider, rows=rows,
                                                 message_type=message_type, ttl=ttl, why=why))

    def keep_in(
        self, connection: Connection, provider: str, rows: list[tuple[int, str]], message_type: str, ttl: int,
        why: str,
    ) -> None:
        """:meth:`keep`, in the caller's transaction."""
        table = PendingPush.__table__
        now = self.clock()
        deadline = now + timedelta(seconds=ttl)
        # A statement for the rows already there and one for the new ones (the INSERT leaves
        # those alone), not one per row: a paused app's event keeps a wake-up per device. A
        # privacy-delay wake-up it folds into has no deadline yet: it takes this one's.
        connection.execute(
            update(table).where(_keys_in((sub_id, message_type) for sub_id, _ in rows)).values(
                version=table.c.version + 1, ttl_seconds=ttl, kept=why, expires_at=_later(deadline, table.c.expires_at),
            )
        )
        connection.execute(insert_ignore(connection, PendingPush), [
            {"subscription_id": sub_id, "message_type": message_type, "provider": provider, "app": app,
             "ttl_seconds": ttl, "created_at": now, "due_at": now, "version": 1, "kept": why,
             "expires_at": deadline}
            for sub_id, app in rows
        ])

    def enqueue(
        self, provider: str, subscription_ids: Iterable[int], message_type: str, ttl: int,
        apps: Mapping[int, str | None] | None = None,
    ) -> None:
        """Store a wake-up per device, or fold it into the one already pending (which keeps its
        due time and takes the newest event's TTL). ``apps`` names each device's app."""
        ids = list(subscription_ids)
        apps = apps or {}
        table = PendingPush.__table__

        def work(connection: Connection) -> None:
            now = self.clock()
            fresh = []
            for sub_id in ids:
                # A kept wake-up it joins (a hold ended, not yet flushed) keeps its deadline
                # unless this event's is later; one of the privacy delay has none.
                joined = connection.execute(
                    update(table)
                    .where(table.c.subscription_id == sub_id, table.c.message_type == message_type)
                    .values(version=table.c.version + 1, ttl_seconds=ttl, expires_at=case(
                        (table.c.expires_at.is_(None), None),
                        else_=_later(now + timedelta(seconds=ttl), table.c.expires_at)))
                ).rowcount
                if not joined:
                    fresh.append(
                        {"subscription_id": sub_id, "message_type": message_type, "provider": provider,
                         "app": apps.get(sub_id) or "", "ttl_seconds": ttl, "created_at": now,
                         "due_at": self._due_at(now), "version": 1}
                    )
            if fresh:
                connection.execute(insert_ignore(connection, PendingPush), fresh)

        run_transaction(self.engine, work)

    def claim_due(
        self, provider: str, limit: int = 500, batch: int = 500, scope: FlushScope = FlushScope()
    ) -> tuple[str, list[Due]]:
        """Claim up to ``limit`` due wake-ups of ``provider`` that no live flush holds, ``batch``
        per transaction so that none holds many row locks for long; none of the apps ``scope``
        holds, nor any :data:`REFUSED` wake-up, but one of each app it names for a probe."""
        token = secrets.token_hex(16)
        table = PendingPush.__table__

        def claim_batch(connection: Connection, size: int, app: str | None = None, refused: bool = False) -> int:
            """How many due rows the SELECT found (some may have gone to a racing flush: the
            UPDATE takes only those still free). With ``app``, that app's rows only (a probe):
            its :data:`REFUSED` ones when ``refused``."""
            now = self.clock()
            free = (table.c.claim.is_(None)) | (table.c.claimed_until < now)
            where = [table.c.provider == provider, table.c.due_at <= now, free]
            if app is not None:
                where.append(table.c.app == app)
            elif scope.held:
                where.append(table.c.app.not_in(scope.held))
            if refused:
                where.append(table.c.kept == REFUSED)
            elif app is None:
                where.append(table.c.kept.is_(None) | (table.c.kept != REFUSED))
            keys = connection.execute(
                select(table.c.subscription_id, table.c.message_type)
                .where(*where)
                .order_by(table.c.due_at)
                .limit(size)
            ).all()
            if keys:
                connection.execute(
                    update(table)
                    .where(_keys_in(keys), free)
                    .values(claim=token, claimed_until=now + self.lease)
                )
            return len(keys)

        for app in sorted(scope.probe):
            run_transaction(self.engine, partial(claim_batch, size=1, app=app))
        for app in sorted(scope.probe_refused):
            run_transaction(self.engine, partial(claim_batch, size=1, app=app, refused=True))
        seen = 0
        while seen < limit and not scope.everything_held:
            size = min(batch, limit - seen)
            found = run_transaction(self.engine, partial(claim_batch, size=size))
            seen += found
            if found < size:
                break
        with unavailable_as_503(), read_session(self.engine) as session:
            rows = session.execute(
                select(table.c.subscription_id, table.c.message_type, table.c.ttl_seconds, table.c.version,
                       table.c.expires_at, table.c.kept)
                .where(table.c.claim == token)
            ).all()
        return token, [
            Due(subscription_id=row.subscription_id, message_type=row.message_type, ttl_seconds=row.ttl_seconds,
                version=row.version, expires_at=row.expires_at, kept=row.kept)
            for row in rows
        ]

    def finish(
        self, token: str, sent: Iterable[Due], retry: Iterable[Due] = (), retry_after: timedelta = timedelta()
    ) -> None:
        """Delete what was sent, unless an event joined it meanwhile (then it waits for a new
        delay); hand back what must be retried, due again after ``retry_after``. A wake-up
        handed back is as old as this hand-back: its age in ``stats`` counts from now. Safe to
        repeat: only rows still claimed with ``token`` at the version sent are touched."""
        self.finish_many([(token, list(sent), list(retry), retry_after)])

    def finish_many(self, items: Sequence[tuple[str, Sequence[Due], Sequence[Due], timedelta]]) -> list[None]:
        """:meth:`finish` for several (token, sent, retry, retry_after) in one transaction (a
        flush's outcomes, written as its sends answer: :class:`shared.recorder.Recorder`)."""

        def work(connection: Connection) -> None:
            for token, sent, retry, retry_after in items:
                self._finish_in(connection, token, sent, retry, retry_after)

        run_transaction(self.engine, work)
        return [None] * len(items)

    def _finish_in(
        self, connection: Connection, token: str, sent: Sequence[Due], retry: Sequence[Due], retry_after: timedelta
    ) -> None:
        # A statement per kind of change, not per row: a flush's rounds finish a thousand
        # wake-ups at a time, and row-by-row statements once took most of a flush's time.
        table = PendingPush.__table__
        now = self.clock()
        mine = table.c.claim == token
        if sent:
            versions = tuple_(table.c.subscription_id, table.c.message_type, table.c.version)
            connection.execute(delete(table).where(
                mine, versions.in_([(d.subscription_id, d.message_type, d.version) for d in sent])))
            joined = connection.execute(  # an event joined it meanwhile: it waits anew
                select(table.c.subscription_id, table.c.message_type).where(mine, _keys_in(sent))).all()
            for sub_id, message_type in joined:
                connection.execute(update(table).where(
                    mine, table.c.subscription_id == sub_id, table.c.message_type == message_type,
                ).values(claim=None, claimed_until=None, version=1, created_at=now, due_at=self._due_at(now)))
        if retry:
            connection.execute(
                update(table).where(mine, _keys_in(retry))
                .values(claim=None, claimed_until=None, created_at=now, due_at=now + retry_after)
            )

    def drop(self, subscription_ids: Iterable[int]) -> None:
        """Forget wake-ups of subscriptions that no longer exist."""
        ids = list(subscription_ids)
        if ids:
            run_transaction(
                self.engine,
                lambda connection: connection.execute(delete(PendingPush).where(PendingPush.subscription_id.in_(ids))),
            )

    def stats(self) -> dict[str, tuple[int, float]]:
        """Per provider: how many wake-ups wait for their privacy delay (not those a hold keeps:
        they wait for a person), and the oldest one's age in seconds."""
        now = self.clock()
        with unavailable_as_503(), read_session(self.engine) as session:
            rows = session.execute(
                select(PendingPush.provider, func.count(), func.min(PendingPush.created_at))
                .where(PendingPush.kept.is_(None))
                .group_by(PendingPush.provider)
            ).all()
        return {provider: (count, (now - oldest).total_seconds()) for provider, count, oldest in rows}

    def waiting(self) -> dict[tuple[str, str], tuple[int, int]]:
        """Per (provider, app): the wake-ups waiting, and how many of them a hold keeps."""
        kept = func.sum(case((PendingPush.kept.is_not(None), 1), else_=0))
        with unavailable_as_503(), read_session(self.engine) as session:
            rows = session.execute(
                select(PendingPush.provider, PendingPush.app, func.count(), kept)
                .group_by(PendingPush.provider, PendingPush.app)
            ).all()
        return {(provider, app): (count, int(held or 0)) for provider, app, count, held in rows}

    def tidy(self, provider: str, held: dict[str, str], discard: frozenset[str]) -> tuple[int, int]:
        """Before a flush of ``provider``: drop the wake-ups no flush holds whose TTL ran out, and
        those of the apps in ``discard`` (``"*"``: all); mark the due ones of ``held`` apps (app
        -> the hold's kind) as kept, so the privacy delay's figures leave them out. How many
        expired and how many were discarded."""
        table = PendingPush.__table__

        def work(connection: Connection) -> tuple[int, int]:
            now = self.clock()
            free = (table.c.claim.is_(None)) | (table.c.claimed_until < now)
            mine = (table.c.provider == provider, free)
            expired = connection.execute(
                delete(table).where(*mine, table.c.expires_at < now)).rowcount
            discarded = 0
            if discard:
                apps = () if "*" in discard else (table.c.app.in_(discard),)
                discarded = connection.execute(delete(table).where(*mine, *apps)).rowcount
            for app, why in held.items():
                apps = () if app == "*" else (table.c.app == app,)
                connection.execute(update(table).where(
                    *mine, *apps, table.c.due_at <= now, table.c.kept.is_(None)).values(kept=why))
            return expired, discarded

        return run_transaction(self.engine, work)
