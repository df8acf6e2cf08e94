"""Holds: sends to a provider (or one app of it) held back, with nothing lost meanwhile.

Two kinds, kept in the ``holds`` table (with the ``refused`` marks below) so every replica sees
them within :data:`CACHE_SECONDS`:

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

:class:`HoldGate` stands in front of the dispatcher's provider and does all of it per send, so
the dispatcher's loop only sees outcomes: ``KEPT`` / ``CREDENTIALS`` / ``KEY_REFUSED`` (kept in
the database: the event is done for that device, and the ledger keeps a redelivery from sending
it), ``DISCARDED``, ``REJECTED`` (``vapid_key_mismatch``), or ``TRANSIENT`` when keeping failed (the database is down: the broker redelivers, nothing is
lost). The event itself succeeds (202): its wake-ups are safe in the database, and a retry from
the broker would only be held again.

Kept wake-ups go out on a flush (:meth:`shared.dispatch.Dispatcher.flush`): on the tick the
privacy delay has, on the tick clean-up sends when it finds held work due (:func:`work_due`), on
``pushctl resume --tick-to URL``, and after the next event a dispatcher handles once it saw a
hold end (:attr:`HoldGate.release_wanted`).
"""
from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta

from sqlalchemy import Connection, Engine, delete, func, select, update
from starlette.concurrency import run_in_threadpool

from shared import metrics
from shared.batching import Batcher
from shared.db import DatabaseUnavailable, insert_ignore, read_session, run_transaction, unavailable_as_503
from shared.models import Hold as HoldRow
from shared.models import PendingPush
from shared.policy import RECHECK, REFUSED, FlushScope, PendingStore
from shared.providers.base import Device, Outcome, Provider, SendResult, WakeUp
from shared.subscriptions import Clock, utcnow

log = logging.getLogger(__name__)

PAUSE = "pause"
CREDENTIALS = "credentials"
KEY_REFUSALS_TO_HOLD = 5
"""Distinct devices of an app that must refuse our Web Push key, with no delivery to the app in
between, before the key is taken to be wrong for every device and the app held. After a key
rotation, stale subscriptions are refused one by one among healthy ones (each a delivery apart);
a wrong key refuses every device, so the few sends this lets through before holding are cheap."""
ALL = "*"
"""A pause's provider or app that covers every one."""
DEFAULT_APP = ""
"""How the default app (subscriptions naming none) is stored; ``pushctl`` calls it ``default``."""
CACHE_SECONDS = 5.0
"""A replica's view of the holds is at most this old: a pause stops every replica's sends
within it, and a resume lets them go within it."""
FIRST_PROBE_SECONDS = 60.0
MAX_PROBE_SECONDS = 1800.0
LOG_EVERY_SECONDS = 60.0
"""The error naming an app and provider whose credentials are refused is logged at most this
often per process."""

#: Set while a flush sends, to each claimed wake-up's ``kept`` by (subscription id, message
#: type): they are rows of the pending table already, so a hold that covers one hands it back
#: (``TRANSIENT``) rather than keeping it a second time, and a :data:`RECHECK` refused again is
#: rejected.
_flushing: contextvars.ContextVar[Mapping[tuple[int, str], str | None] | None] = contextvars.ContextVar(
    "flushing", default=None)


def app_name(app: str) -> str:
    """An app as operators name it: ``default`` for the default app, ``*`` for all."""
    return "default" if app == DEFAULT_APP else app


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
        """In the transaction that kept a wake-up as :data:`~shared.policy.REFUSED`: mark the app
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


def post_flush_tick(url: str, source: str, timeout: float = 30.0) -> str | None:
    """Post a flush tick to ``url`` (the broker, or a dispatcher's route): ``None`` when it was
    taken, else what went wrong. Blocking (urllib: clean-up's image has no httpx)."""
    import urllib.error
    import urllib.request

    from shared.events import flush_tick_headers
    from shared.http import internal_headers

    request = urllib.request.Request(
        url, data=b"", method="POST", headers=flush_tick_headers(source) | internal_headers())
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return None if response.status < 300 else f"HTTP {response.status}"
    except urllib.error.HTTPError as exc:
        return f"HTTP {exc.code}"
    except OSError as exc:
        return f"not reachable ({getattr(exc, 'reason', exc)})"


@dataclass
class _View:
    holds: Holds = field(default_factory=Holds)
    read_at: float = float("-inf")


class HoldGate:
    """The dispatcher's provider, behind the holds (see the module doc). ``store`` and
    ``pending`` share the dispatcher's database."""

    def __init__(
        self, provider: Provider, store: HoldStore, pending: PendingStore, cache_seconds: float | None = None
    ) -> None:
        self.provider = provider
        self.name = provider.name
        self.store = store
        self.pending = pending
        self.cache_seconds = CACHE_SECONDS if cache_seconds is None else cache_seconds
        self.release_wanted = False
        """A hold this process knew of ended: kept wake-ups wait for a flush."""
        self._view = _View()
        self._reading: tuple[asyncio.AbstractEventLoop, asyncio.Lock] | None = None
        self._logged: dict[tuple[str, str], float] = {}
        self._keeps: Batcher[tuple[str, tuple[int, str], str, int], None] = Batcher(self._keep_many)
        self._refusals: Batcher[tuple[str, int, str, int, str], bool] = Batcher(self._refuse_many)

    # -- the view of the holds -------------------------------------------------------------------

    async def holds(self) -> Holds:
        """The holds, read again when the view is older than ``cache_seconds``."""
        if time.monotonic() - self._view.read_at <= self.cache_seconds:
            return self._view.holds
        loop = asyncio.get_running_loop()
        if self._reading is None or self._reading[0] is not loop:  # locks belong to one loop
            self._reading = (loop, asyncio.Lock())
        async with self._reading[1]:
            if time.monotonic() - self._view.read_at > self.cache_seconds:
                try:
                    self._see(await run_in_threadpool(self.store.read))
                except DatabaseUnavailable:
                    log.warning("could not read the holds: database unavailable; using the last seen")
        return self._view.holds

    def _see(self, holds: Holds) -> None:
        mine = {(h.kind, h.app) for h in holds.of(self.name)}
        if any(key not in mine for key in ((h.kind, h.app) for h in self._view.holds.of(self.name))):
            self.release_wanted = True
        self._view = _View(holds, time.monotonic())

    def _changed(self, holds: tuple[Hold, ...]) -> None:
        """This process changed the holds: its own view follows at once."""
        self._view = replace(self._view, holds=Holds(holds))

    # -- sending ---------------------------------------------------------------------------------

    async def send(self, device: Device, wakeup: WakeUp) -> SendResult:
        app = device.app or DEFAULT_APP
        hold = (await self.holds()).hold_for(self.name, app)
        if hold is None:
            return await self._send(device, wakeup, app)
        if wakeup.dry_run:  # validates nothing while held: says why instead
            return SendResult(Outcome.REJECTED, hold.kind)
        if hold.kind == PAUSE:
            if hold.discard:
                return SendResult(Outcome.DISCARDED, "paused")
            return await self._keep(device, wakeup, app, PAUSE, SendResult(Outcome.KEPT, "paused"))
        if await self._take_probe(app):
            return await self._send(device, wakeup, app, probe=True)
        self._log_refused(app, hold.reason)
        return await self._keep(device, wakeup, app, CREDENTIALS, SendResult(Outcome.CREDENTIALS, "held"))

    async def _send(self, device: Device, wakeup: WakeUp, app: str, probe: bool = False) -> SendResult:
        result = await self.provider.send(device, wakeup)
        if result.outcome is Outcome.KEY_REFUSED and not probe:
            return await self._key_refused(device, wakeup, app, result.reason)
        if result.outcome in (Outcome.CREDENTIALS, Outcome.KEY_REFUSED):
            self._log_refused(app, result.reason, force=probe)
            if not probe:
                await self._trip(app, result.reason)
            return await self._keep(device, wakeup, app, CREDENTIALS, SendResult(Outcome.CREDENTIALS, result.reason))
        if result.outcome is Outcome.DELIVERED and not wakeup.dry_run:
            await self._key_works(app)
        if probe and result.outcome is not Outcome.TRANSIENT:
            await self._lift(app)
        return result

    async def _keep(self, device: Device, wakeup: WakeUp, app: str, why: str, kept: SendResult) -> SendResult:
        if _flushing.get() is not None:
            return SendResult(Outcome.TRANSIENT, "held")  # its row stays where it is
        if not device.id:  # a device Echo named that is not subscribed: nowhere to keep it
            return SendResult(Outcome.TRANSIENT, "held")
        try:
            await self._keeps.submit((why, (device.id, app), wakeup.message_type, wakeup.ttl_seconds))
        except DatabaseUnavailable:
            log.warning("could not keep a held wake-up: database unavailable; the event is retried")
            return SendResult(Outcome.TRANSIENT, "held")
        return kept

    def _keep_many(self, requests: list[tuple[str, tuple[int, str], str, int]]) -> list[None]:
        groups: dict[tuple[str, str, int], list[tuple[int, str]]] = {}
        for why, item, message_type, ttl in requests:
            groups.setdefault((why, message_type, ttl), []).append(item)
        for (why, message_type, ttl), items in groups.items():
            self.pending.keep(self.name, items, message_type, ttl, why)
        return [None] * len(requests)

    # -- a Web Push key refused: the device's fault, or ours? ------------------------------------

    async def _key_refused(self, device: Device, wakeup: WakeUp, app: str, reason: str) -> SendResult:
        """A device refused our key (see the module doc): keep its wake-up until a delivery or
        a probe tells whose fault it is; reject it when it was already a recheck."""
        flushed = _flushing.get()
        if flushed is not None and flushed.get((device.id, wakeup.message_type)) == RECHECK:
            log.info("%s device %s: refused our key again after a delivery with it: the subscription was "
                     "made with another key", self.name, device.id)
            return SendResult(Outcome.REJECTED, "vapid_key_mismatch")
        if not device.id:
            return SendResult(Outcome.TRANSIENT, "held")
        try:
            held = await self._refusals.submit((app, device.id, wakeup.message_type, wakeup.ttl_seconds, reason))
        except DatabaseUnavailable:
            log.warning("could not keep a refused wake-up: database unavailable; the event is retried")
            return SendResult(Outcome.TRANSIENT, "held")
        if held:
            if self._view.holds.hold_for(self.name, app) is None:
                self._log_refused(app, f"{reason} from {KEY_REFUSALS_TO_HOLD} devices")
                self._hold_in_view(app, reason)
        elif self._view.holds.refused(self.name, app) is None:
            now = self.store.clock()
            self._changed((*self._view.holds.holds, Hold(REFUSED, self.name, app, reason, None, now)))
        if flushed is not None:
            return SendResult(Outcome.TRANSIENT, "held")  # its row stays, now as refused
        return SendResult(Outcome.CREDENTIALS, reason) if held else SendResult(Outcome.KEY_REFUSED, reason)

    def _refuse_many(self, requests: list[tuple[str, int, str, int, str]]) -> list[bool]:
        """Keep refused wake-ups and mark (or hold) their apps, in one transaction: whether each
        one's app is held now."""
        groups: dict[tuple[str, int], list[tuple[int, str]]] = {}
        reasons: dict[str, str] = {}
        for app, sub_id, message_type, ttl, reason in requests:
            groups.setdefault((message_type, ttl), []).append((sub_id, app))
            reasons.setdefault(app, reason)

        def work(connection: Connection) -> dict[str, bool]:
            for (message_type, ttl), items in groups.items():
                self.pending.keep_in(connection, self.name, items, message_type, ttl, REFUSED)
            return {app: self.store.refused_in(connection, self.name, app, reason) for app, reason in reasons.items()}

        held = run_transaction(self.store.engine, work)
        return [held[request[0]] for request in requests]

    async def _key_works(self, app: str) -> None:
        """A delivery: if devices of ``app`` refused our key meanwhile, they go once more."""
        view = self._view.holds
        mark = view.refused(self.name, app)
        if mark is None:
            return
        self._changed(tuple(h for h in view.holds if h is not mark))
        self.release_wanted = True
        try:
            count = await run_in_threadpool(self.store.resolve, self.name, app)
        except DatabaseUnavailable:
            log.warning("could not recheck refused wake-ups: database unavailable; the next delivery will")
            return
        log.info("%s delivers with our key for app %s: %d wake-ups whose devices refused it go once more",
                 self.name, app_name(app), count)

    # -- credentials holds -----------------------------------------------------------------------

    async def _trip(self, app: str, reason: str) -> None:
        self._hold_in_view(app, reason)
        try:
            await run_in_threadpool(self.store.trip, self.name, app, reason)
        except DatabaseUnavailable:
            log.warning("could not record the credentials hold: database unavailable")

    def _hold_in_view(self, app: str, reason: str) -> None:
        now = self.store.clock()
        held = Hold(CREDENTIALS, self.name, app, reason, None, now, probe_at=now + timedelta(seconds=FIRST_PROBE_SECONDS))
        self._changed((*(h for h in self._view.holds.holds
                         if (h.kind, h.provider, h.app) != (REFUSED, self.name, app)), held))

    async def _take_probe(self, app: str) -> bool:
        view = self._view.holds
        hold = view.hold_for(self.name, app)
        now = self.store.clock()
        if hold is None or hold.probe_at is None or hold.probe_at > now:
            return False
        # Not again from this process before the next backoff step, whoever wins the probe.
        later = replace(hold, probe_at=now + timedelta(seconds=FIRST_PROBE_SECONDS))
        self._changed(tuple(later if h is hold else h for h in view.holds))
        try:
            return await run_in_threadpool(self.store.take_probe, self.name, app)
        except DatabaseUnavailable:
            return False

    async def _lift(self, app: str) -> None:
        log.warning("%s accepts the credentials of app %s again: sending what was kept", self.name, app_name(app))
        self._changed(tuple(h for h in self._view.holds.holds
                            if not (h.kind == CREDENTIALS and (h.provider, h.app) == (self.name, app))))
        self.release_wanted = True
        try:
            await run_in_threadpool(self.store.lift, self.name, app)
        except DatabaseUnavailable:
            log.warning("could not lift the credentials hold: database unavailable")

    def _log_refused(self, app: str, reason: str, force: bool = False) -> None:
        """The error an operator must see, at most once a minute per app: never the key, only
        the provider's word for the refusal."""
        now = time.monotonic()
        key = (self.name, app)
        if force or now - self._logged.get(key, float("-inf")) >= LOG_EVERY_SECONDS:
            self._logged[key] = now
            log.error(
                "%s refuses our credentials for app %s (%s): wake-ups are kept until they are fixed",
                self.name, app_name(app), reason,
                extra={"provider": self.name, "app": app_name(app), "reason": reason},
            )

    # -- flushing --------------------------------------------------------------------------------

    @contextlib.contextmanager
    def flushing(self, kept: Mapping[tuple[int, str], str | None]) -> Iterator[None]:
        """While a flush sends the wake-ups ``kept`` names (each one's ``kept``, by
        (subscription id, message type))."""
        token = _flushing.set(kept)
        try:
            yield
        finally:
            _flushing.reset(token)

    async def prepare_flush(self) -> tuple[FlushScope, int, int]:
        """Read the holds afresh, drop what expired or is discarded (counted), mark the held
        wake-ups kept, take the probes of ``refused`` marks that are due: what the flush must
        leave alone, and how many expired and were discarded."""
        self._view = _View()  # a flush acts on the holds as they are now
        holds = await self.holds()
        self.release_wanted = False
        scope, held, discard = holds.flush_scope(self.name, self.store.clock())
        probes = [app for app in sorted(scope.probe_refused)
                  if await run_in_threadpool(self.store.take_refused_probe, self.name, app)]
        scope = replace(scope, probe_refused=frozenset(probes))
        expired, discarded = await run_in_threadpool(self.pending.tidy, self.name, held, discard)
        if expired:
            metrics.SENDS.labels(self.name, "expired", "ttl").inc(expired)
            log.info("kept wake-ups expired before they could be sent", extra={"count": expired})
        if discarded:
            metrics.SENDS.labels(self.name, "discarded", "paused").inc(discarded)
        return scope, expired, discarded

    async def aclose(self) -> None:
        await self.provider.aclose()
