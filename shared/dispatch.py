"""The dispatcher behind ``dispatch-fcm``, ``dispatch-apns`` and ``dispatch-webpush``.

Each receives every ``notification.requested.v1`` event (the broker fans it out), serves only its
own provider's subscriptions of the event's users, and answers so that the broker redelivers the
event exactly when some device still needs it:

- 202, empty: done (every device delivered, dead, or refused for good);
- 200 with a ``subscription.invalid.v1`` reply event: done, and these tokens are dead (when no
  ``K_SINK`` is bound; with one, the report is posted there and the answer is 202);
- 429 or 503 with Retry-After: some sends were transient, or in flight in another invocation;
  the redelivered event skips the devices already served (see :mod:`shared.deliveries`);
- 400/422: the event is malformed and retrying will not help.

The same dispatcher also accepts today's Echo request, ``POST /v1/message/{fcm,apns}``, so an Echo
install can point its push service URL here.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from sqlalchemy import Connection
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from shared import logs, metrics
from shared.batching import Batcher
from shared.config import env, env_float, env_int, env_list
from shared.db import DatabaseUnavailable, SchemaGate, get_engine, run_transaction
from shared.deliveries import Claims, DeliveryLedger, Outcomes
from shared.holds import HoldGate, HoldStore
from shared.events import (
    NOTIFICATION_REQUESTED,
    PING,
    InvalidToken,
    NotificationPolicy,
    NotificationRequest,
    binary_http,
    data_object,
    event_key,
    invalid_tokens_event,
    parse_echo_request,
    parse_notification,
    read_cloud_event,
)
from shared.http import ApiError, internal_headers, read_json, require_method, serve
from shared.logs import configure_logging
from shared.policy import DeliveryPolicy, Due, FlushScope, PendingStore
from shared.providers.base import Device, Outcome, Provider, SendResult, WakeUp
from shared.ratelimits import RateLimiter
from shared.subscriptions import Clock, SubscriptionStore, devices_of, token_sha256, utcnow

if TYPE_CHECKING:
    import httpx

log = logging.getLogger(__name__)

DEFAULT_RETRY_AFTER = 30
CHECKPOINT_SECONDS = 0.1
OVERLOAD_RETRY_AFTER = 5
#: Due wake-ups one round of a flush claims and sends; a flush takes round after round.
FLUSH_BATCH = 1000
#: A flush starts no new round with less than this share of its deadline left: a round started
#: then would mostly be cut off, and its wake-ups handed back for a later tick.
FLUSH_LAST_ROUND_SHARE = 0.2
#: What a device over its per-event-type limit gets: nothing sent, recorded as done.
LIMITED = SendResult(Outcome.REJECTED, "limited")
#: What a device gets when its provider raised instead of answering (a bug, or an unsendable token).
PROVIDER_ERROR = SendResult(Outcome.REJECTED, "provider_error")
ECHO_PROVIDERS = ("fcm", "apns")
#: Transient reasons that mean "slow down": the answer is then 429, and metrics say rate_limited.
RATE_LIMITED = frozenset({"TooManyRequests", "TooManyProviderTokenUpdates", "QUOTA_EXCEEDED", "http_429"})


@dataclass(frozen=True)
class DispatchSettings:
    concurrency: int = 100
    """Sends in flight at once for one event."""
    deadline_seconds: float = 60.0
    """Sends not finished by then count as transient: the event is redelivered for them. Keep it
    below the platform's request timeout and below the claim lease."""
    echo_apns_environment: str = "production"
    """The APNs environment of tokens that Echo's request names and we do not know."""
    max_in_flight: int = 100
    """Requests one process works on at once; more are answered 503 so the broker backs off
    (load shedding instead of unbounded memory)."""


@dataclass
class DispatchReport:
    """What one event (or Echo request) came to for one provider."""

    found: int = 0
    """The devices of the event's users with this provider (for a flush: the due wake-ups)."""
    delivered: int = 0
    dead_count: int = 0
    rejected: int = 0
    transient: int = 0
    skipped: int = 0
    """Devices an earlier delivery of the same event already served (or found dead)."""
    limited: int = 0
    """Devices over their per-event-type limit: nothing sent."""
    queued: int = 0
    """Wake-ups left for the privacy delay's flush."""
    kept: int = 0
    """Wake-ups an operator's pause kept in the database (:mod:`shared.holds`)."""
    credentials: int = 0
    """Wake-ups kept because the provider refuses our credentials for their app."""
    key_refused: int = 0
    """Web Push wake-ups kept because their device refused our key (its fault or ours: to be
    told by the next delivery)."""
    discarded: int = 0
    """Wake-ups a pause with ``--discard`` dropped."""
    expired: int = 0
    """Kept wake-ups whose TTL ran out before they could be sent (flushes only)."""
    dead: list[InvalidToken] = field(default_factory=list)
    retry_after: float | None = None
    only_rate_limited: bool = True

    def count(self, result: SendResult) -> None:
        if result.outcome is Outcome.TRANSIENT:
            self.transient += 1
            self.only_rate_limited &= result.reason in RATE_LIMITED
            if result.retry_after is not None:
                self.retry_after = max(self.retry_after or 0, result.retry_after)
        else:
            setattr(self, _COUNTED[result.outcome], getattr(self, _COUNTED[result.outcome]) + 1)

    def summary(self, provider: str, notification: NotificationRequest | None) -> str:
        """What the event came to, in words: a user without devices, a redelivery with nothing
        left to send, a flush and a delivery each read differently."""
        devices = _count(self.found, f"{provider} device")
        if notification is None:
            if not self.found and not self.expired and not self.discarded:
                return "flush, nothing due"
            return f"flush, {self.found} due: {self.counts()}"
        users = _count(len(notification.users), "user")
        dry_run = "dry run: " if notification.dry_run else ""
        if not self.found:
            return f"{dry_run}no {provider} devices for the event's {users}; nothing sent"
        if self.skipped == self.found:
            return f"redelivery: {devices}, all already served; nothing sent again"
        return f"{dry_run}{devices} of {users}: {self.counts()}"

    def counts(self) -> str:
        counts = [f"{self.delivered} delivered", f"{self.dead_count} dead", f"{self.transient} transient",
                  f"{self.skipped} skipped (already served)", f"{self.limited} limited"]
        optional = [
            (self.rejected, "rejected"), (self.queued, "queued for the privacy delay"),
            (self.kept, "kept (paused)"), (self.credentials, "kept (credentials refused)"),
            (self.key_refused, "kept (device refused our key)"), (self.discarded, "discarded (paused)"),
            (self.expired, "expired"),
        ]
        return ", ".join(counts + [f"{number} {what}" for number, what in optional if number])

    def fields(self) -> dict[str, int]:
        """The counts, as fields of the event's log line."""
        return {
            "devices": self.found, "delivered": self.delivered, "dead": self.dead_count,
            "transient": self.transient, "skipped": self.skipped, "limited": self.limited,
            "rejected": self.rejected, "kept": self.kept, "credentials": self.credentials,
            "key_refused": self.key_refused, "discarded": self.discarded, "expired": self.expired,
        }


#: The report's count of each final outcome.
_COUNTED = {
    Outcome.DELIVERED: "delivered", Outcome.DEAD: "dead_count", Outcome.REJECTED: "rejected",
    Outcome.KEPT: "kept", Outcome.CREDENTIALS: "credentials", Outcome.KEY_REFUSED: "key_refused",
    Outcome.DISCARDED: "discarded",
}


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}{'' if number == 1 else 's'}"


class Dispatcher:
    def __init__(
        self,
        provider: Provider,
        store: SubscriptionStore,
        ledger: DeliveryLedger,
        policy: NotificationPolicy,
        settings: DispatchSettings,
        sink_url: str | None = None,
        clock: Clock = utcnow,
        delivery: DeliveryPolicy = DeliveryPolicy(),
        pending: PendingStore | None = None,
    ) -> None:
        self.delivery = delivery
        self.limiter = RateLimiter(store.engine, clock)
        self.pending = pending or PendingStore(store.engine, clock=clock)
        # Every send passes the holds (an operator's pause, credentials a provider refused).
        self.gate = HoldGate(provider, HoldStore(store.engine, clock), self.pending)
        self.provider: Provider = self.gate
        self.store = store
        self.ledger = ledger
        self.policy = policy
        self.settings = settings
        self.sink_url = sink_url
        self.clock = clock
        self.function = f"dispatch-{provider.name}"
        self.source = f"/push-functions/{self.function}"
        self.schema = SchemaGate(store.engine)
        self._in_flight = 0
        self._sink_client: httpx.AsyncClient | None = None
        # Concurrent events share their claim and record transactions (shared.batching).
        self._claims: Batcher[tuple[Sequence[str], str], tuple[list[Device], Claims]] = Batcher(
            self._load_and_claim
        )
        self._records: Batcher[tuple[str, Claims, Outcomes], None] = Batcher(ledger.record_many)

    @classmethod
    def from_env(cls, provider: Provider) -> Dispatcher:
        configure_logging()
        metrics.configure()
        engine = get_engine()
        delivery = DeliveryPolicy.from_env()
        pending = PendingStore(engine, delivery.privacy_delay)
        if delivery.privacy_delay is not None:
            metrics.PENDING_TOTALS.stats = pending.stats
        metrics.HOLD_TOTALS.read = HoldStore(engine).read
        metrics.HOLD_TOTALS.waiting = pending.waiting
        dispatcher = cls(
            provider,
            SubscriptionStore(engine),
            DeliveryLedger(
                engine,
                lease=timedelta(seconds=env_int("PUSH_DELIVERY_LEASE_SECONDS", 120, minimum=1)),
                retention=timedelta(hours=env_int("PUSH_DELIVERY_RECORD_HOURS", 24, minimum=1)),
            ),
            notification_policy_from_env(),
            DispatchSettings(
                concurrency=env_int("PUSH_DISPATCH_CONCURRENCY", 100, minimum=1),
                deadline_seconds=env_float("PUSH_DISPATCH_DEADLINE_SECONDS", 60.0, minimum=1.0),
                echo_apns_environment=env("PUSH_ECHO_APNS_ENVIRONMENT", "production"),
                max_in_flight=env_int("PUSH_DISPATCH_MAX_IN_FLIGHT", 100, minimum=1),
            ),
            sink_url=env("K_SINK"),
            delivery=delivery,
            pending=pending,
        )
        metrics.SUBSCRIPTION_TOTALS.count = dispatcher.store.count_by_provider
        return dispatcher

    async def handle(self, request: Request) -> Response:
        return await serve(request, self._handle, self.schema.ready, self.function, internal=True)

    async def _handle(self, request: Request) -> Response:
        require_method(request, ("POST",))
        if self._in_flight >= self.settings.max_in_flight:
            raise ApiError(
                503, "overloaded", "too many requests in progress; try again later",
                headers={"Retry-After": str(OVERLOAD_RETRY_AFTER)},
            )
        self._in_flight += 1
        try:
            return await self._handle_admitted(request)
        except ApiError as error:
            event_id = logs.event_id.get()
            log.info(
                "%s refused: %d %s: %s%s", f"event {event_id}" if event_id else "request",
                error.status, error.code, error.message, f" [{error.field}]" if error.field else "",
                extra={"status": error.status},
            )
            raise
        finally:
            self._in_flight -= 1

    async def _handle_admitted(self, request: Request) -> Response:
        if request.url.path == f"/v1/message/{self.provider.name}" and self.provider.name in ECHO_PROVIDERS:
            return await self._handle_echo(request)
        started = time.perf_counter()
        event = await read_cloud_event(request)
        logs.event_id.set(str(event["id"])[:128])
        if event["type"] == PING:
            report = await self.flush()
            report.transient = 0  # what failed stays pending for the next tick
            return self._logged(await self._answer(report), report, started)
        if event["type"] != NOTIFICATION_REQUESTED:
            raise ApiError(
                400, "unsupported_event_type", f"this function takes {NOTIFICATION_REQUESTED} and {PING}"
            )
        notification = parse_notification(data_object(event), self.policy)
        metrics.NOTIFICATIONS_REQUESTED.labels(self.provider.name, "cloudevent").inc()
        report = await self.dispatch(notification, event_key(event))
        if self.gate.release_wanted:  # a hold ended: send what it kept, in what time is left
            flushed = await self.flush(self.settings.deadline_seconds - (time.perf_counter() - started))
            log.info("event %s: a hold ended; then %s", logs.event_id.get(),
                     flushed.summary(self.provider.name, None), extra=flushed.fields())
            report.dead += flushed.dead  # reported with the event's own
        return self._logged(await self._answer(report), report, started, notification)

    def _logged(
        self, response: Response, report: DispatchReport, started: float,
        notification: NotificationRequest | None = None,
    ) -> Response:
        """``response``, once the event's one info line is logged (its counts also as fields)."""
        elapsed = round((time.perf_counter() - started) * 1000)
        log.info(
            "event %s: %s; answered %d in %d ms", logs.event_id.get(),
            report.summary(self.provider.name, notification), response.status_code, elapsed,
            extra={**report.fields(), "status": response.status_code, "elapsed_ms": elapsed},
        )
        return response

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
            await self._send_all(subscriptions, wakeup, report)
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
        to_send, held = await self._apply_limits(to_send, notification.event_type, counted_at)
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

            outcomes = await self._send_all(to_send, wakeup, report, checkpoint)
            await self._refund_transient(to_send, notification.event_type, outcomes, counted_at)
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

    async def _apply_limits(
        self, subscriptions: list[Device], event_type: str | None, counted_at: datetime
    ) -> tuple[list[Device], dict[int, tuple[SendResult, object]]]:
        """Split off the devices over their per-event-type limit: they get no push this time,
        and the event still succeeds for them."""
        limit = self.delivery.limits.get(event_type) if event_type else None
        if limit is None or not subscriptions:
            return subscriptions, {}
        allowed = await run_in_threadpool(
            self.limiter.hit, [f"{s.id}\n{event_type}" for s in subscriptions], limit, counted_at
        )
        held = {s.id: (LIMITED, self.clock()) for s, ok in zip(subscriptions, allowed) if not ok}
        if held:
            metrics.SENDS.labels(self.provider.name, "limited", event_type).inc(len(held))
        return [s for s, ok in zip(subscriptions, allowed) if ok], held

    async def _refund_transient(
        self, subscriptions: list[Device], event_type: str | None, outcomes: Outcomes, counted_at: datetime
    ) -> None:
        """Give back the limit of pushes that will be retried: only pushes sent count."""
        limit = self.delivery.limits.get(event_type) if event_type else None
        retried = [s for s in subscriptions if outcomes.results[s.id][0].outcome is Outcome.TRANSIENT]
        if limit is not None and retried:
            await run_in_threadpool(
                self.limiter.refund, [f"{s.id}\n{event_type}" for s in retried], limit, counted_at
            )

    async def flush(self, seconds: float | None = None) -> DispatchReport:
        """Send the pending wake-ups that are due (privacy delay, and those a hold kept once it
        lifted: :mod:`shared.holds`), round after round, until none is due or the flush's
        deadline is near; transient failures stay pending for a later tick.

        Every tick drains the queue rather than sending a share of it, so the queue empties at
        the rate the dispatcher sends, and a tick that never came (a PingSource tick is not
        retried for ever) is made up by the next. The whole flush shares one deadline
        (``PUSH_DISPATCH_DEADLINE_SECONDS`` from the tick), so it ends within its claims' lease
        (``PUSH_PENDING_LEASE_SECONDS``, kept above it): no later tick claims a wake-up this flush
        may still send.
        """
        report = DispatchReport()
        deadline = time.monotonic() + (self.settings.deadline_seconds if seconds is None else seconds)
        last_round = self.settings.deadline_seconds * FLUSH_LAST_ROUND_SHARE
        scope, report.expired, report.discarded = await self.gate.prepare_flush()
        while deadline - time.monotonic() > last_round:
            claimed = await self._flush_round(report, deadline - time.monotonic(), scope)
            if claimed < FLUSH_BATCH:
                break
        return report

    async def _flush_round(self, report: DispatchReport, seconds: float, scope: FlushScope = FlushScope()) -> int:
        """Claim up to :data:`FLUSH_BATCH` due wake-ups and send them within ``seconds``: every
        message type at once, each wake-up with what is left of its TTL. As for events, what was
        sent is recorded as the sends go on, so a flush that dies midway does not send it again.
        How many were claimed."""
        token, due = await run_in_threadpool(
            self.pending.claim_due, self.provider.name, FLUSH_BATCH, scope=scope)
        if not due:
            return 0
        rows = await run_in_threadpool(self.store.by_ids, [d.subscription_id for d in due])
        report.found += len(rows)
        gone = [d.subscription_id for d in due if d.subscription_id not in rows]
        if gone:
            await run_in_threadpool(self.pending.drop, gone)
        # One group per message type (a device has at most one wake-up of each), each wake-up
        # with what is left of its TTL; one whose TTL ran out since the claim is not sent.
        now = self.clock()
        groups: dict[str, dict[int, Due]] = {}
        wakeups: dict[str, dict[int, WakeUp]] = {}
        expired: list[Due] = []
        for item in due:
            if item.subscription_id not in rows:
                continue
            ttl = item.ttl_at(now)
            if ttl is None:
                expired.append(item)
            else:
                groups.setdefault(item.message_type, {})[item.subscription_id] = item
                wakeups.setdefault(item.message_type, {})[item.subscription_id] = WakeUp(item.message_type, ttl)
        if expired:
            report.expired += len(expired)
            metrics.SENDS.labels(self.provider.name, "expired", "ttl").inc(len(expired))
        recorded: set[Due] = set()

        def checkpoint_of(items: dict[int, Due]) -> Callable[[Outcomes], Awaitable[None]]:
            async def checkpoint(batch: Outcomes) -> None:
                sent = [items[sub_id] for sub_id in batch.results]
                try:
                    await run_in_threadpool(self.pending.finish, token, sent)
                    recorded.update(sent)
                except DatabaseUnavailable:
                    log.warning("could not record flushed wake-ups yet: database unavailable")

            return checkpoint

        with self.gate.flushing({(d.subscription_id, d.message_type): d.kept for d in due}):
            results = await asyncio.gather(*(
                self._send_all([rows[sub_id] for sub_id in items], wakeups[message_type], report,
                               checkpoint_of(items), deadline_seconds=seconds)
                for message_type, items in groups.items()
            ))
        sent: list[Due] = list(expired)
        retry: list[Due] = []
        for items, outcomes in zip(groups.values(), results):
            for sub_id, item in items.items():
                if item not in recorded:
                    transient = outcomes.results[sub_id][0].outcome is Outcome.TRANSIENT
                    (retry if transient else sent).append(item)
        await run_in_threadpool(
            self.pending.finish, token, sent, retry,
            timedelta(seconds=report.retry_after or DEFAULT_RETRY_AFTER),
        )
        return len(due)

    async def _record(self, key: str, claims: Claims, outcomes: Outcomes) -> None:
        try:
            await self._records.submit((key, claims, outcomes))
        except DatabaseUnavailable:
            # The sends happened; their claims stay until the lease runs out, and the broker
            # redelivers (503). Devices already sent to may then get this wake-up twice: the
            # one case where that can happen, and only when the database fails mid-event.
            log.error("could not record delivery outcomes: database unavailable")
            raise

    async def _send_all(
        self,
        subscriptions: Sequence[Device],
        wakeup: WakeUp | Mapping[int, WakeUp],
        report: DispatchReport,
        checkpoint: Callable[[Outcomes], Awaitable[None]] | None = None,
        deadline_seconds: float | None = None,
    ) -> Outcomes:
        """Send ``wakeup`` to every device (or each its own, by subscription id), at most
        ``concurrency`` at once, until the deadline (the dispatch deadline, or
        ``deadline_seconds`` when given: what is left of a flush's).

        With ``checkpoint``, final outcomes are handed over in small batches while the other sends
        go on, so a process killed mid-event has recorded what it already sent and the
        redelivered event does not send it again.
        """
        limit = asyncio.Semaphore(self.settings.concurrency)
        results: dict[int, tuple[SendResult, object]] = {}
        unrecorded: dict[int, tuple[SendResult, object]] = {}
        provider = self.provider.name

        async def send(subscription: Device) -> None:
            async with limit:
                started = time.perf_counter()
                try:
                    result = await self.provider.send(
                        subscription, wakeup if isinstance(wakeup, WakeUp) else wakeup[subscription.id])
                except Exception as exc:  # noqa: BLE001 - see below
                    # Providers classify every answer; what escapes is a device they cannot
                    # send to at all (a stored Web Push endpoint the HTTP client refuses, say).
                    # Retrying will not help, and must not hold the other devices' event.
                    log.error(
                        "%s provider failed on subscription %d: %s",
                        provider, subscription.id, type(exc).__name__,
                    )
                    result = PROVIDER_ERROR
                elapsed = time.perf_counter() - started
            results[subscription.id] = (result, self.clock())
            if result.outcome is not Outcome.TRANSIENT:
                unrecorded[subscription.id] = results[subscription.id]
            metrics.PROVIDER_LATENCY.labels(provider, result.outcome.value).observe(elapsed)

        async def record_as_we_go() -> None:
            while True:
                await asyncio.sleep(CHECKPOINT_SECONDS)
                if unrecorded:
                    batch = Outcomes(dict(unrecorded))
                    unrecorded.clear()
                    await checkpoint(batch)

        tasks = [asyncio.create_task(send(s)) for s in subscriptions]
        recorder = asyncio.create_task(record_as_we_go()) if checkpoint and tasks else None
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=deadline_seconds or self.settings.deadline_seconds)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.gather(*pending, return_exceptions=True)
        if recorder is not None:
            recorder.cancel()
            await asyncio.gather(recorder, return_exceptions=True)
        now = self.clock()
        for subscription in subscriptions:
            if subscription.id not in results:
                results[subscription.id] = (SendResult(Outcome.TRANSIENT, "deadline"), now)
            result, observed_at = results[subscription.id]
            report.count(result)
            outcome = result.outcome.value
            if result.outcome is Outcome.TRANSIENT and result.reason in RATE_LIMITED:
                outcome = "rate_limited"
            metrics.SENDS.labels(provider, outcome, result.reason or "none").inc()
            if result.outcome is Outcome.DEAD and subscription.id:
                report.dead.append(
                    InvalidToken(subscription.id, subscription.token_sha256, result.reason, observed_at)
                )
        return Outcomes(results)

    async def _answer(self, report: DispatchReport) -> Response:
        reported = await self._report_dead(report.dead) if report.dead else None
        if report.transient:
            retry_after = max(int(report.retry_after or DEFAULT_RETRY_AFTER), 1)
            return ApiError(
                429 if report.only_rate_limited else 503,
                "retry",
                f"{report.transient} sends must be retried",
                headers={"Retry-After": str(retry_after)},
            ).response()
        if reported is False:
            return ApiError(
                503,
                "sink_unavailable",
                "could not report dead tokens",
                headers={"Retry-After": str(DEFAULT_RETRY_AFTER)},
            ).response()
        if report.dead and self.sink_url is None:
            headers, body = binary_http(invalid_tokens_event(self.source, self.provider.name, report.dead))
            return Response(body, status_code=200, headers=headers)
        return Response(status_code=202)

    async def _report_dead(self, dead: list[InvalidToken]) -> bool | None:
        """Post the dead-token report to ``K_SINK``; ``None`` when no sink is bound (the report
        then goes back as the reply), ``False`` when the sink did not take it."""
        if self.sink_url is None:
            return None
        # Imported here: only a dispatcher bound to a K_SINK needs httpx, and its import is a
        # twentieth of a cold start.
        import httpx

        if self._sink_client is None:
            self._sink_client = httpx.AsyncClient(timeout=5.0)
        headers, body = binary_http(invalid_tokens_event(self.source, self.provider.name, dead))
        try:
            response = await self._sink_client.post(
                self.sink_url, headers=headers | internal_headers(), content=body
            )
        except httpx.HTTPError as exc:
            log.warning("could not post dead-token report to K_SINK: %s", type(exc).__name__)
            return False
        if response.status_code >= 300:
            log.warning("K_SINK refused the dead-token report: HTTP %d", response.status_code)
            return False
        return True

    async def _handle_echo(self, request: Request) -> Response:
        echo = parse_echo_request(await read_json(request), self.policy)
        metrics.NOTIFICATIONS_REQUESTED.labels(self.provider.name, "echo").inc()
        tokens = [token.lower() for token in echo.tokens] if self.provider.name == "apns" else list(echo.tokens)
        known = await run_in_threadpool(
            self.store.by_token_hashes, [token_sha256(t) for t in tokens], self.provider.name
        )
        subscriptions = []
        for token in tokens:
            digest = token_sha256(token)
            row = known.get(digest)
            environment = row.environment if row else self.settings.echo_apns_environment
            subscriptions.append(
                Device(
                    id=row.id if row else 0, token=token, token_sha256=digest,
                    # Echo leaves the topic out for devices it stored without one: a known
                    # device has its own; an unknown one without a topic is refused (MissingTopic).
                    topic=echo.topic or (row.topic if row else None),
                    environment=environment if self.provider.name == "apns" else None,
                    app=row.app if row else None,
                )
            )
        report = DispatchReport()
        await self._send_all(
            subscriptions, WakeUp(echo.message_type, self.policy.default_ttl_seconds, echo.dry_run), report
        )
        if report.transient:
            return await self._answer(report)
        if report.dead:
            await self._report_dead(report.dead)
        return JSONResponse(
            {"delivered": report.delivered, "invalid": report.dead_count, "rejected": report.rejected}
        )

    async def aclose(self) -> None:
        await self.provider.aclose()
        if self._sink_client is not None:
            await self._sink_client.aclose()


def notification_policy_from_env() -> NotificationPolicy:
    return NotificationPolicy(
        message_types=env_list("PUSH_MESSAGE_TYPES", ("checkEchoV1",)),
        max_users=env_int("PUSH_MAX_USERS_PER_EVENT", 1000, minimum=1),
        default_ttl_seconds=env_int("PUSH_DEFAULT_TTL_SECONDS", 86400, minimum=0),
    )
