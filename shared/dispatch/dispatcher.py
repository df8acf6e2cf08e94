"""The dispatcher's core: one provider's devices of an event's users claimed against the delivery
ledger, counted against the limits, then sent at once or queued for the privacy delay, and the
outcomes recorded so that a redelivered event sends only what is still owed.

The collaborators it holds each do one job: :mod:`~shared.dispatch.admission` (the HTTP side),
:mod:`~shared.dispatch.limits`, :mod:`~shared.dispatch.sending` (the send loop),
:mod:`~shared.dispatch.flush` (delayed and kept wake-ups), :mod:`~shared.dispatch.echo` (Echo's
request) and :mod:`~shared.dispatch.dead_tokens` (the answer and its dead-token report).
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from datetime import datetime, timedelta

from sqlalchemy import Connection
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response

from shared import metrics
from shared.batching import Batcher
from shared.core import Clock, Device, Outcome, SendResult, WakeUp, utcnow
from shared.db import SchemaGate, get_engine, run_transaction
from shared.deliveries import Claims, DeliveryLedger, Outcomes, new_claim_token
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
from shared.recorder import Recorder, until_reachable, written
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
        # Concurrent events share their claim transactions (shared.batching); every send's
        # outcome is written as soon as it answers, by group commit (shared.recorder).
        self._claims: Batcher[tuple[Sequence[str], str, str], tuple[list[Device], Claims]] = Batcher(
            self._load_and_claim
        )
        self._records: Recorder[tuple[str, Claims, Outcomes]] = Recorder(ledger.record_many, "delivery outcomes")

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
        already served by an earlier delivery of the same event are skipped. Through a database
        blip, its writes are tried again until the deadline (the claim, the limits) and then the
        drain (the outcomes; :mod:`shared.recorder`): an outage shorter than that costs time,
        not a wake-up sent twice.
        """
        wakeup = WakeUp(notification.message_type, notification.ttl_seconds, notification.dry_run)
        report = DispatchReport()
        until_sent = time.monotonic() + self.settings.deadline_seconds
        until_recorded = until_sent + self.settings.drain_seconds
        if key is None or notification.dry_run:
            subscriptions = await run_in_threadpool(
                self.store.for_users, notification.users, self.provider.name
            )
            report.found = len(subscriptions)
            await self.sender.send_all(subscriptions, wakeup, report)
            return report
        # The claim's token is chosen before its first try: a try that committed but whose
        # answer was lost is found to be ours by the next one.
        token = new_claim_token()
        subscriptions, claims = await until_reachable(
            lambda: self._claims.submit((notification.users, key, token)), until_sent, "claim an event's devices")
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
        to_send, held = await until_reachable(
            lambda: self.limits.apply(to_send, notification.event_type, counted_at), until_sent,
            "count the event's limits")
        report.limited = len(held)
        recording: list[asyncio.Future[None]] = []
        if self.delivery.privacy_delay is not None:
            report.queued = len(to_send)
            await until_reachable(lambda: run_in_threadpool(
                self.pending.enqueue, self.provider.name, [s.id for s in to_send],
                notification.message_type, notification.ttl_seconds, {s.id: s.app for s in to_send},
            ), until_sent, "queue wake-ups for the privacy delay")
            queued = SendResult(Outcome.DELIVERED, "queued")
            rest = Outcomes({s.id: (queued, self.clock()) for s in to_send} | held)
        else:
            def record(sub_id: int, result: tuple[SendResult, datetime]) -> None:
                recording.append(self._records.add((key, claims, Outcomes({sub_id: result})), until_recorded))

            outcomes = await self.sender.send_all(
                to_send, wakeup, report, record, deadline_seconds=until_sent - time.monotonic(),
                room=self._records.room)
            # Every final outcome is on its way already; what is left: the transient ones (their
            # claims given back) and the limited ones.
            rest = Outcomes({sub_id: r for sub_id, r in outcomes.results.items()
                             if r[0].outcome is Outcome.TRANSIENT} | held)
        if rest.results:
            recording.append(self._records.add((key, claims, rest), until_recorded))
        # Answered once every outcome is written: a 503 (given up) leaves the claims to their
        # lease, and the devices already sent to may get the wake-up again after it.
        await written(recording)
        if report.transient and self.delivery.privacy_delay is None:
            await until_reachable(
                lambda: self.limits.refund_transient(to_send, notification.event_type, outcomes, counted_at),
                until_recorded, "give back the limits of transient sends")
        return report

    def _load_and_claim(
        self, requests: Sequence[tuple[Sequence[str], str, str]]
    ) -> list[tuple[list[Device], Claims]]:
        """For each (users, event key, claim token): the users' devices with this provider,
        claimed for the event. One transaction for the whole batch, so an event costs the database a share of
        two (this and the outcomes') in the common case."""

        def work(connection: Connection) -> list[tuple[list[Device], Claims]]:
            everyone = {user for users, _, _ in requests for user in users}
            by_user = self.store.devices_by_user_in(connection, everyone, self.provider.name)
            targets = [devices_of(by_user, users) for users, _, _ in requests]
            claims = self.ledger.claim_many_in(
                connection, [(key, [d.id for d in devices]) for devices, (_, key, _) in zip(targets, requests)],
                [token for _, _, token in requests],
            )
            return list(zip(targets, claims))

        return run_transaction(self.store.engine, work)

    async def flush(self, seconds: float | None = None) -> DispatchReport:
        """Send the due wake-ups: see :meth:`shared.dispatch.flush.Flush.run`."""
        return await self.flusher.run(seconds)

    async def aclose(self) -> None:
        await self.provider.aclose()
        await self.dead_tokens.aclose()
