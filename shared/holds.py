"""Holds: sends to a provider (or one app of it) held back, with nothing lost meanwhile.

Two kinds, kept in the ``holds`` table (with the ``refused`` marks below) so every replica sees
them within :data:`shared.hold_gate.CACHE_SECONDS`:

- **pause**: an operator's emergency stop (``pushctl pause [--provider P] [--app A] --reason
  TEXT [--discard]``; ``pushctl resume``). Nothing is sent to what it covers. Its wake-ups are
  kept in the pending table, due at once, and sent once when the pause ends, unless their TTL
  ran out first (counted ``push_sends_total{outcome="expired"}``); with ``--discard`` they are
  counted (``outcome="discarded"``) and dropped instead, those already kept included.
- **credentials**: a provider refused our credentials for an app (``Outcome.CREDENTIALS``: a
  deleted or wrongly rotated key, a missing permission). Every message would be refused alike
  until a person fixes them, so the wake-up is kept as for a pause, the hold is set, and further
  sends of that app to that provider are kept without contacting it. One real send, the probe,
  is let through at a time with backoff (:data:`FIRST_PROBE_SECONDS` doubling up to
  :data:`MAX_PROBE_SECONDS`); when it gets through, the hold lifts and the kept wake-ups go out.

A Web Push service refusing our VAPID header (``Outcome.KEY_REFUSED``: 401 or 403) says less: a
subscription is bound for life to the key it was made with (RFC 8292 section 4), so after a
key rotation the old subscriptions are refused one by one while the others deliver, and no
status tells that apart from our key being wrong for every device (Mozilla answers 401 to both,
FCM and Apple 403 to both). So such a refusal is first the device's: its wake-up is kept
(``kept = "refused"``, not sent by flushes) and the app is marked **refused** (a ``refused`` row
in ``holds``, which holds no send). Then either

- a delivery to another device of the app shows our key works: the mark goes, and the refused
  wake-ups are sent once more (``kept = "recheck"``); one refused again is that device's key
  mismatch, rejected as ``vapid_key_mismatch`` (counted; the subscription is kept, not dead);
- or :data:`KEY_REFUSALS_TO_HOLD` distinct devices of the app refuse with no delivery in between:
  the app's key is wrong, and the app gets a credentials hold as above, its refused wake-ups
  among those it keeps;
- or neither (an app with few devices, or quiet): the mark is probed as a credentials hold is
  (one refused wake-up, with the same backoff), and a probe that gets through is the delivery.

This module keeps them in the database; :class:`shared.hold_gate.HoldGate` applies them to each
send.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import Connection, Engine, delete, func, select, update

from shared.core import Clock, utcnow
from shared.db import insert_ignore, read_session, run_transaction, unavailable_as_503
from shared.models import Hold as HoldRow
from shared.models import PendingPush
from shared.pending import RECHECK, REFUSED, FlushScope, PendingStore

PAUSE = "pause"
CREDENTIALS = "credentials"
KEY_REFUSALS_TO_HOLD = 5
"""Distinct devices of an app that must refuse our Web Push key, with no delivery to the app in
between, before the key is taken to be wrong for every device and the app held. After a key
rotation, stale subscriptions are refused one by one among healthy ones (each a delivery apart);
a wrong key refuses every device, so the few sends this lets through before holding are cheap."""
ALL = "*"
"""A pause's provider or app that covers every one."""
FIRST_PROBE_SECONDS = 60.0
MAX_PROBE_SECONDS = 1800.0

@dataclass(frozen=True)
class Hold:
    kind: str
    provider: str
    app: str
    reason: str
    held_by: str | None
    since: datetime
    discard: bool = False
    probe_at: datetime | None = None
    failures: int = 0

    @property
    def paused(self) -> bool:
        """An operator's pause (``push_paused``)."""
        return self.kind == PAUSE

    @property
    def credentials_refused(self) -> bool:
        """A credentials hold (``push_credentials_refused``)."""
        return self.kind == CREDENTIALS


@dataclass(frozen=True)
class Holds:
    """Every hold, as read at one moment."""

    holds: tuple[Hold, ...] = ()

    def hold_for(self, provider: str, app: str) -> Hold | None:
        """What holds ``provider``'s sends for ``app``: the most specific pause, else a
        credentials hold, else ``None``."""
        pauses = {(h.provider, h.app): h for h in self.holds if h.kind == PAUSE}
        for key in ((provider, app), (provider, ALL), (ALL, app), (ALL, ALL)):
            if key in pauses:
                return pauses[key]
        return self._find(CREDENTIALS, provider, app)

    def refused(self, provider: str, app: str) -> Hold | None:
        """The mark of ``app``'s devices refusing our key (it holds no send)."""
        return self._find(REFUSED, provider, app)

    def _find(self, kind: str, provider: str, app: str) -> Hold | None:
        return next((h for h in self.holds if h.kind == kind and (h.provider, h.app) == (provider, app)), None)

    def of(self, provider: str) -> list[Hold]:
        return [h for h in self.holds if h.provider in (provider, ALL)]

    def flush_scope(self, provider: str, now: datetime) -> tuple[FlushScope, dict[str, str], frozenset[str]]:
        """For a flush of ``provider``: what it leaves alone (apps held, probes due), the held
        apps' kinds, and the apps whose wake-ups it drops (paused with ``--discard``)."""
        mine = self.of(provider)
        held = {h.app: h.kind for h in mine if h.kind == CREDENTIALS}
        held |= {h.app: h.kind for h in mine if h.kind == PAUSE}  # a pause wins
        discard = frozenset(h.app for h in mine if h.kind == PAUSE and h.discard)
        probe = frozenset(h.app for h in mine if h.kind == CREDENTIALS and _probe_due(h, now)
                          and self.hold_for(provider, h.app) is h)
        probe_refused = frozenset(h.app for h in mine if h.kind == REFUSED and _probe_due(h, now)
                                  and self.hold_for(provider, h.app) is None)
        return FlushScope(frozenset(held), probe, probe_refused), held, discard


def _end_mark(connection: Connection, provider: str, app: str) -> None:
    """Delete ``app``'s ``refused`` mark."""
    table = HoldRow.__table__
    connection.execute(delete(table).where(table.c.kind == REFUSED, table.c.provider == provider, table.c.app == app))


def _probe_due(hold: Hold, now: datetime) -> bool:
    return hold.probe_at is not None and hold.probe_at <= now


class HoldStore:
    """The ``holds`` table."""

    def __init__(self, engine: Engine, clock: Clock = utcnow) -> None:
        self.engine = engine
        self.clock = clock

    def read(self) -> Holds:
        with unavailable_as_503(), read_session(self.engine) as session:
            rows = session.execute(select(HoldRow.__table__)).all()
        return Holds(tuple(
            Hold(r.kind, r.provider, r.app, r.reason, r.held_by, r.since, bool(r.discard), r.probe_at, r.failures)
            for r in rows
        ))

    def pause(self, provider: str, app: str, reason: str, by: str | None, discard: bool) -> Hold:
        """Pause ``provider`` (``*``: all) for ``app`` (``*``: all); a pause of the same scope
        is replaced (its start kept, so its age stays true)."""
        table = HoldRow.__table__

        def work(connection: Connection) -> Hold:
            now = self.clock()
            values = {"reason": reason[:255], "held_by": (by or None) and by[:64], "discard": discard}
            key = (table.c.kind == PAUSE, table.c.provider == provider, table.c.app == app)
            if not connection.execute(update(table).where(*key).values(**values)).rowcount:
                connection.execute(insert_ignore(connection, HoldRow), [
                    {"kind": PAUSE, "provider": provider, "app": app, "since": now, "failures": 0, **values}])
            since = connection.execute(select(table.c.since).where(*key)).scalar_one()
            return Hold(PAUSE, provider, app, values["reason"], values["held_by"], since, discard)

        return run_transaction(self.engine, work)

    def resume(self, provider: str, app: str) -> int:
        """End the pause of exactly this scope; how many ended (0 or 1)."""
        table = HoldRow.__table__
        return run_transaction(self.engine, lambda connection: connection.execute(delete(table).where(
            table.c.kind == PAUSE, table.c.provider == provider, table.c.app == app)).rowcount)

    def trip(self, provider: str, app: str, reason: str) -> None:
        """Hold ``provider``'s sends for ``app``: it refused our credentials. The first probe
        comes :data:`FIRST_PROBE_SECONDS` later; a hold already there is left as it is."""
        run_transaction(self.engine, lambda connection: self._insert(connection, CREDENTIALS, provider, app, reason))

    def _insert(self, connection: Connection, kind: str, provider: str, app: str, reason: str) -> None:
        """A credentials hold or a ``refused`` mark, probed first :data:`FIRST_PROBE_SECONDS`
        from now; one already there is left as it is."""
        now = self.clock()
        connection.execute(insert_ignore(connection, HoldRow), [{
            "kind": kind, "provider": provider, "app": app, "reason": reason[:255], "held_by": None,
            "since": now, "discard": False, "probe_at": now + timedelta(seconds=FIRST_PROBE_SECONDS),
            "failures": 0}])

    def take_refused_probe(self, provider: str, app: str) -> bool:
        """:meth:`take_probe` of ``app``'s ``refused`` mark; a mark whose wake-ups are all gone
        (expired, or their devices found dead) is ended instead."""
        pending = PendingPush.__table__
        with unavailable_as_503(), read_session(self.engine) as session:
            waiting = session.execute(select(pending.c.subscription_id).where(
                pending.c.provider == provider, pending.c.app == app, pending.c.kept == REFUSED).limit(1)).first()
        if waiting is None:
            run_transaction(self.engine, lambda connection: _end_mark(connection, provider, app))
            return False
        return self.take_probe(provider, app, REFUSED)

    def take_probe(self, provider: str, app: str, kind: str = CREDENTIALS) -> bool:
        """Whether this caller may make the probe of a credentials hold (or a ``refused``
        mark) now: one replica wins, and the next probe moves away by the backoff at once (a
        probe that dies on the way is not retried sooner)."""
        table = HoldRow.__table__

        def work(connection: Connection) -> bool:
            now = self.clock()
            key = (table.c.kind == kind, table.c.provider == provider, table.c.app == app)
            failures = connection.execute(
                select(table.c.failures).where(*key, table.c.probe_at <= now)).scalar_one_or_none()
            if failures is None:
                return False
            wait = min(FIRST_PROBE_SECONDS * 2 ** (failures + 1), MAX_PROBE_SECONDS)
            return connection.execute(update(table).where(*key, table.c.probe_at <= now).values(
                probe_at=now + timedelta(seconds=wait), failures=failures + 1)).rowcount == 1

        return run_transaction(self.engine, work)

    def lift(self, provider: str, app: str) -> None:
        """The credentials work again (a probe got through)."""
        table = HoldRow.__table__
        run_transaction(self.engine, lambda connection: connection.execute(delete(table).where(
            table.c.kind == CREDENTIALS, table.c.provider == provider, table.c.app == app)))

    def refused_in(self, connection: Connection, provider: str, app: str, reason: str) -> bool:
        """In the transaction that kept a wake-up as :data:`~shared.pending.REFUSED`: mark the app
        (a mark already there stays as it is), and when :data:`KEY_REFUSALS_TO_HOLD` distinct
        devices of it have refused since the last delivery (a delivery turns their wake-ups into
        rechecks), hold the app instead, its refused wake-ups kept by the hold. Whether it held."""
        pending = PendingPush.__table__
        mine = (pending.c.provider == provider, pending.c.app == app, pending.c.kept == REFUSED)
        devices = connection.execute(select(func.count(pending.c.subscription_id.distinct())).where(*mine)).scalar_one()
        if devices < KEY_REFUSALS_TO_HOLD:
            self._insert(connection, REFUSED, provider, app, reason)
            return False
        self._insert(connection, CREDENTIALS, provider, app, reason)
        connection.execute(update(pending).where(*mine).values(kept=CREDENTIALS))
        _end_mark(connection, provider, app)
        return True

    def resolve(self, provider: str, app: str) -> int:
        """Our key works for ``app`` (a delivery): end its ``refused`` mark, and make its refused
        wake-ups due for one more try. How many."""
        pending = PendingPush.__table__

        def work(connection: Connection) -> int:
            _end_mark(connection, provider, app)
            return connection.execute(update(pending).where(
                pending.c.provider == provider, pending.c.app == app, pending.c.kept == REFUSED,
            ).values(kept=RECHECK, due_at=self.clock())).rowcount

        return run_transaction(self.engine, work)


def work_due(holds: Holds, pending: PendingStore) -> bool:
    """Whether a flush has held work to do: a probe due (of a credentials hold or a ``refused``
    mark), or kept wake-ups that no hold holds any more (a pause ended, credentials fixed, a
    recheck), to drop (``--discard``) or past their TTL. Clean-up asks this on its schedule and wakes the dispatchers only then."""
    now = pending.clock()
    if any(h.kind in (CREDENTIALS, REFUSED) and _probe_due(h, now) for h in holds.holds):
        return True
    table = PendingPush.__table__
    with unavailable_as_503(), read_session(pending.engine) as session:
        kept = session.execute(
            select(table.c.provider, table.c.app, table.c.kept, table.c.expires_at)
            .where(table.c.kept.is_not(None)).distinct()
        ).all()
    for provider, app, why, expires_at in kept:
        if why == REFUSED and (expires_at is None or expires_at >= now):
            continue  # waits for a delivery, or its mark's probe
        hold = holds.hold_for(provider, app)
        if hold is None or hold.discard or (expires_at is not None and expires_at < now):
            return True
    return False
