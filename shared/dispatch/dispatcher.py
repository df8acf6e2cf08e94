"""The dispatcher's core: one provider's devices of an event's users claimed against the delivery
ledger, counted against the limits, then sent at once or queued for the privacy delay, and the
outcomes recorded so that a redelivered event sends only what is still owed.

The collaborators it holds each do one job: :mod:`~shared.dispatch.admission` (the HTTP side),
:mod:`~shared.dispatch.limits`, :mod:`~shared.dispatch.sending` (the send loop),
:mod:`~shared.dispatch.flush` (delayed and kept wake-ups), :mod:`~shared.dispatch.echo` (Echo's
request) and :mod:`~shared.dispatch.dead_tokens` (the answer and its dead-token report).
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import timedelta

from sqlalchemy import Connection
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response

from shared import metrics
from shared.batching import Batcher
from shared.core import Clock, Device, Outcome, SendResult, WakeUp, utcnow
from shared.db import DatabaseUnavailable, SchemaGate, get_engine, run_transaction
from shared.deliveries import Claims, DeliveryLedger, Outcomes
from shared.dispatch.admission import Admission
from shared.dispatch.dead_tokens import DeadTokens
from shared.dispatch.echo import EchoPath
from shared.dispatch.flush import Flush
from shared.dispatch.limits import EventLimits
from shared.dispatch.report import DispatchReport
from shared.dispatch.sending import Sender
from shared.events import InvalidToken, NotificationRequest
from shared.hold_gate import HoldGate
from shared.holds import HoldStore
from shared.logs import configure_logging
from shared.pending import PendingStore
from shared.providers.base import Provider
from shared.ratelimits import RateLimiter
from shared.settings import DeliverySettings, DispatchSettings, NotificationSettings
from shared.subscriptions import SubscriptionStore, devices_of

log = logging.getLogger(__package__)


class Dispatcher:
    """The dispatcher of one provider (behind ``dispatch-fcm``, ``dispatch-apns`` or
    ``dispatch-webpush``), created once per process."""

    def __init__(
        self,
        provider: Provider,
        store: SubscriptionStore,
        ledger: DeliveryLedger,
        notification: NotificationSettings,
        settings: DispatchSettings,
        sink_url: str | None = None,
        clock: Clock = utcnow,
        delivery: DeliverySettings = DeliverySettings(),
        pending: PendingStore | None = None,
    ) -> None:
        self.delivery = delivery
        self.pending = pending or PendingStore(store.engine, clock=clock)
        # Every send passes the holds (an operator's pause, credentials a provider refused).
        self.gate = HoldGate(provider, HoldStore(store.engine, clock), self.pending)
        self.provider = self.gate
        self.store = store
        self.ledger = ledger
        self.notification = notification
        self.settings = settings
        self.clock = clock
        self.function = f"dispatch-{provider.name}"
        self.schema = SchemaGate(store.engine)
        self.limits = EventLimits(provider.name, RateLimiter(store.engine, clock), delivery, clock)
        self.sender = Sender(self.gate, settings, clock)
        self.flusher = Flush(self.gate, self.pending, store, self.sender, settings, clock)
        self.dead_tokens = DeadTokens(provider.name, f"/push-functions/{self.function}", sink_url)
        # Echo's request, for a provider that takes one (its EchoTokens say how).
        self.echo = None if provider.echo is None else EchoPath(
            provider.name, provider.echo, notification, store, settings, self.sender, self.dead_tokens)
        self.admission = Admission(self)
        # Concurrent events share their claim and record transactions (shared.batching).
        self._claims: Batcher[tuple[Sequence[str], str], tuple[list[Device], Claims]] = Batcher(
            self._load_and_claim
        )
        self._records: Batcher[tuple[str, Claims, Outcomes], None] = Batcher(ledger.record_many)

    @classmethod
    def from_env(cls, provider: Provider) -> Dispatcher:
        configure_logging()
        metrics.configure()
        settings = DispatchSettings.from_env()
        delivery = settings.delivery
        engine = get_engine()
        pending = PendingStore(engine, delivery.privacy_delay, lease_seconds=delivery.pending_lease_seconds)
        if delivery.privacy_delay is not None:
            metrics.PENDING_TOTALS.stats = pending.stats
        metrics.HOLD_TOTALS.read = HoldStore(engine).read
        metrics.HOLD_TOTALS.waiting = pending.waiting
        dispatcher = cls(
            provider,
            SubscriptionStore(engine),
            DeliveryLedger(
                engine,
                lease=timedelta(seconds=settings.delivery_lease_seconds),
                retention=timedelta(hours=settings.delivery_record_hours),
            ),
            settings.notification,
            settings,
            sink_url=settings.sink_url,
            delivery=delivery,
            pending=pending,
        )
        metrics.SUBSCRIPTION_TOTALS.count = dispatcher.store.count_by_provider
        return dispatcher

    async def handle(self, request: Request) -> Response:
        return await self.admission.handle(request)

    async def dispatch(self, notification: NotificationRequest, key: str | None) -> DispatchReport:
        """Send the wake-up to every device of the notification's users with this provider.

        With an event key (and not a dry run) the ledger makes this safe to repeat: devices
        already served by an earlier delivery of the same event are skipped.
        """
        wakeup = WakeUp(notification.message_type, notification.ttl_seconds, notification.dry_run)
        report = DispatchReport()
        if key is None or notification.dry_run:
            subscriptions = await run_in_threadpool(
                self.store.for_users, notification.users, self.provider.name
            )
            report.found = len(subscriptions)
            await self.sender.send_all(subscriptions, wakeup, report)
            return report
        subscriptions, claims = await self._claims.submit((notification.users, key))
        report.found = len(subscriptions)
        if not subscriptions:
            return report
        report.skipped = len(claims.done) + len(claims.dead)
        if claims.done or claims.dead or claims.in_flight:
            metrics.REDELIVERIES.labels(self.provider.name).inc()
            metrics.SKIPPED.labels(self.provider.name).inc(len(claims.done) + len(claims.dead))
        report.transient += len(claims.in_flight)
        report.only_rate_limited &= not claims.in_flight
        for subscription in subscriptions:
            if subscription.id in claims.dead:
                reason, observed_at = claims.dead[subscription.id]
                report.dead.append(InvalidToken(subscription.id, subscription.token_sha256, reason, observed_at))
        to_send = [s for s in subscriptions if s.id in claims.claimed]
        counted_at = self.clock()  # the limits' window: a refund goes back to the same one
        to_send, held = await self.limits.apply(to_send, notification.event_type, counted_at)
        report.limited = len(held)
        if self.delivery.privacy_delay is not None:
            report.queued = len(to_send)
            await run_in_threadpool(
                self.pending.enqueue, self.provider.name, [s.id for s in to_send],
                notification.message_type, notification.ttl_seconds, {s.id: s.app for s in to_send},
            )
            queued = SendResult(Outcome.DELIVERED, "queued")
            outcomes = Outcomes({s.id: (queued, self.clock()) for s in to_send} | held)
        else:
            recorded: set[int] = set()

            async def checkpoint(batch: Outcomes) -> None:
                try:
                    await self._records.submit((key, claims, batch))
                    recorded.update(batch.results)
                except DatabaseUnavailable:
                    log.warning("could not record delivery outcomes yet: database unavailable")

            outcomes = await self.sender.send_all(to_send, wakeup, report, checkpoint)
            await self.limits.refund_transient(to_send, notification.event_type, outcomes, counted_at)
            outcomes = Outcomes(
                {sub_id: r for sub_id, r in outcomes.results.items() if sub_id not in recorded} | held
            )
        await self._record(key, claims, outcomes)
        return report

    def _load_and_claim(
        self, requests: Sequence[tuple[Sequence[str], str]]
    ) -> list[tuple[list[Device], Claims]]:
        """For each (users, event key): the users' devices with this provider, claimed for the
        event. One transaction for the whole batch, so an event costs the database a share of
        two (this and the outcomes') in the common case."""

        def work(connection: Connection) -> list[tuple[list[Device], Claims]]:
            everyone = {user for users, _ in requests for user in users}
            by_user = self.store.devices_by_user_in(connection, everyone, self.provider.name)
            targets = [devices_of(by_user, users) for users, _ in requests]
            claims = self.ledger.claim_many_in(
                connection, [(key, [d.id for d in devices]) for devices, (_, key) in zip(targets, requests)]
            )
            return list(zip(targets, claims))

        return run_transaction(self.store.engine, work)

    async def flush(self, seconds: float | None = None) -> DispatchReport:
        """Send the due wake-ups: see :meth:`shared.dispatch.flush.Flush.run`."""
        return await self.flusher.run(seconds)

    async def _record(self, key: str, claims: Claims, outcomes: Outcomes) -> None:
        try:
            await self._records.submit((key, claims, outcomes))
        except DatabaseUnavailable:
            # The sends happened; their claims stay until the lease runs out, and the broker
            # redelivers (503). Devices already sent to may then get this wake-up twice: the
            # one case where that can happen, and only when the database fails mid-event.
            log.error("could not record delivery outcomes: database unavailable")
            raise

    async def aclose(self) -> None:
        await self.provider.aclose()
        await self.dead_tokens.aclose()
