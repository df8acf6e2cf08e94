"""The gate in front of the dispatcher's provider that applies the holds (:mod:`shared.holds`:
an operator's pause, credentials a provider refused, a Web Push key refused) to every send.

:class:`HoldGate` stands in front of the dispatcher's provider and does all of it per send, so
the dispatcher's loop only sees outcomes: ``KEPT`` / ``CREDENTIALS`` / ``KEY_REFUSED`` (kept in
the database: the event is done for that device, and the ledger keeps a redelivery from sending
it), ``DISCARDED``, ``REJECTED`` (``vapid_key_mismatch``), or ``TRANSIENT`` when keeping failed
(the database is down: the broker redelivers, nothing is lost). The event itself succeeds (202):
its wake-ups are safe in the database, and a retry from the broker would only be held again.

Kept wake-ups go out on a flush (:mod:`shared.dispatch.flush`): on the tick the privacy delay
has, on the tick clean-up sends when it finds held work due (:func:`shared.holds.work_due`), on
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
from datetime import timedelta

from sqlalchemy import Connection
from starlette.concurrency import run_in_threadpool

from shared import metrics
from shared.batching import Batcher
from shared.core import DEFAULT_APP, Device, Outcome, SendResult, WakeUp, app_name
from shared.db import DatabaseUnavailable, run_transaction
from shared.holds import (
    CREDENTIALS,
    FIRST_PROBE_SECONDS,
    KEY_REFUSALS_TO_HOLD,
    PAUSE,
    Hold,
    Holds,
    HoldStore,
)
from shared.pending import RECHECK, REFUSED, FlushScope, PendingStore
from shared.providers.base import Provider

log = logging.getLogger(__name__)

CACHE_SECONDS = 5.0
"""A replica's view of the holds is at most this old: a pause stops every replica's sends
within it, and a resume lets them go within it."""
LOG_EVERY_SECONDS = 60.0
"""The error naming an app and provider whose credentials are refused is logged at most this
often per process."""

#: Set while a flush sends, to each claimed wake-up's ``kept`` by (subscription id, message
#: type): they are rows of the pending table already, so a hold that covers one hands it back
#: (``TRANSIENT``) rather than keeping it a second time, and a :data:`RECHECK` refused again is
#: rejected.
_flushing: contextvars.ContextVar[Mapping[tuple[int, str], str | None] | None] = contextvars.ContextVar(
    "flushing", default=None)


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
