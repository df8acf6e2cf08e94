"""Clean-up behind ``cleanup-invalid-tokens``: deletes dead subscriptions and expires old ones.

- ``org.wikimedia.push.subscription.invalid.v1`` (from the dispatchers): delete each reported
  subscription, unless it was refreshed after the provider called it dead (the device registered
  again) or its id now holds another token.
- a schedule tick (``dev.knative.sources.ping``, or a plain request from a cron connector, which
  sends no CloudEvent headers): delete subscriptions not refreshed for ``PUSH_SUBSCRIPTION_MAX_AGE_DAYS``
  (default 270, the age after which FCM itself considers a token stale), delivery records past
  their retention and rate counters of past windows.
- a held-work tick (``dev.knative.sources.ping`` with ``pushtick: held``, every few minutes,
  and every cron-connector tick): when something held is due (a credentials probe, wake-ups a
  hold kept that may go now: :func:`shared.holds.work_due`), a flush tick for the dispatchers,
  as the reply event (through the broker to their ``flush-tick-to-*`` Triggers), or posted to
  each URL of ``PUSH_FLUSH_TICK_URLS`` (OpenFaaS: the dispatchers' routes). Only then are the
  scaled-to-zero dispatchers woken.
- any event at ``POST /dead-letters`` (the broker's dead-letter sink): keep it for
  ``pushctl dead-letters`` (:mod:`shared.dead_letters`).

All are idempotent: a redelivered event deletes nothing more, and a dead letter is kept once.
"""
from __future__ import annotations

import logging
from datetime import timedelta

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response

from shared import logs, metrics
from shared.core import Clock, utcnow
from shared.db import SchemaGate, get_engine
from shared.dead_letters import DeadLetterStore
from shared.deliveries import DeliveryLedger
from shared.events import (
    NOTIFICATION_REQUESTED,
    PING,
    SUBSCRIPTION_INVALID,
    binary_http,
    flush_tick_event,
    data_object,
    is_cloud_event,
    parse_invalid_tokens,
    post_flush_tick,
    read_cloud_event,
)
from shared.holds import HoldStore, work_due
from shared.http import ApiError, read_body, require_method, serve
from shared.logs import configure_logging
from shared.pending import PendingStore
from shared.ratelimits import RateLimiter
from shared.settings import CleanupSettings
from shared.subscriptions import SubscriptionStore

log = logging.getLogger(__name__)

DEAD_LETTERS_PATH = "/dead-letters"
#: Event types named in the dead-letter counter's label; any other is counted as "other".
KNOWN_TYPES = frozenset({NOTIFICATION_REQUESTED, SUBSCRIPTION_INVALID, PING})
#: The ``pushtick`` of the schedule that asks whether held work is due.
HELD_TICK = "held"
SOURCE = "/push-functions/cleanup-invalid-tokens"


class Cleanup:
    def __init__(
        self,
        store: SubscriptionStore,
        ledger: DeliveryLedger,
        max_age: timedelta = timedelta(days=270),
        clock: Clock = utcnow,
        tick_urls: tuple[str, ...] = (),
    ) -> None:
        self.store = store
        self.tick_urls = tick_urls
        self.holds = HoldStore(store.engine, clock)
        self.pending = PendingStore(store.engine, clock=clock)
        self.ledger = ledger
        self.max_age = max_age
        self.clock = clock
        self.schema = SchemaGate(store.engine)
        self.dead_letters = DeadLetterStore(store.engine, clock)

    @classmethod
    def from_env(cls) -> Cleanup:
        configure_logging()
        metrics.configure()
        settings = CleanupSettings.from_env()
        engine = get_engine()
        cleanup = cls(
            SubscriptionStore(engine),
            DeliveryLedger(engine),
            max_age=timedelta(days=settings.subscription_max_age_days),
            tick_urls=settings.flush_tick_urls,
        )
        metrics.HOLD_TOTALS.read = cleanup.holds.read
        metrics.HOLD_TOTALS.waiting = cleanup.pending.waiting
        metrics.SUBSCRIPTION_TOTALS.count = cleanup.store.count_by_provider
        metrics.DEAD_LETTER_TOTAL.count = cleanup.dead_letters.count
        return cleanup

    async def handle(self, request: Request) -> Response:
        return await serve(request, self._handle, self.schema.ready, "cleanup-invalid-tokens", internal=True)

    async def _handle(self, request: Request) -> Response:
        require_method(request, ("POST",))
        if request.url.path == DEAD_LETTERS_PATH:
            return await self._keep_dead_letter(request)
        if not is_cloud_event(request):
            await read_body(request)  # a cron connector's tick: whatever it sends is not used
            await run_in_threadpool(self.expire)
            return await self._held_work_tick()
        event = await read_cloud_event(request)
        logs.event_id.set(str(event["id"])[:128])
        if event["type"] == PING and event.get("pushtick") == HELD_TICK:
            return await self._held_work_tick()
        if event["type"] == PING:
            await run_in_threadpool(self.expire)
        elif event["type"] == SUBSCRIPTION_INVALID:
            invalid = parse_invalid_tokens(data_object(event))
            deleted = await run_in_threadpool(
                self.store.delete_invalid, [(i.id, i.token_sha256, i.observed_at) for i in invalid]
            )
            metrics.INVALID_DELETED.inc(deleted)
            log.info("deleted dead subscriptions", extra={"reported": len(invalid), "deleted": deleted})
        else:
            raise ApiError(
                400, "unsupported_event_type", f"this function takes {SUBSCRIPTION_INVALID} and {PING}"
            )
        return Response(status_code=202)

    async def _held_work_tick(self) -> Response:
        """Wake the dispatchers (a flush tick) only when something held is due for them."""
        due = await run_in_threadpool(lambda: work_due(self.holds.read(), self.pending))
        if not due:
            return Response(status_code=202)
        if not self.tick_urls:  # the reply goes back through the broker to the dispatchers
            headers, body = binary_http(flush_tick_event(SOURCE))
            return Response(body or b"", status_code=200, headers=headers)
        for url in self.tick_urls:
            problem = await run_in_threadpool(post_flush_tick, url, SOURCE, 10.0)
            if problem is not None:
                log.warning("could not post a flush tick to a dispatcher", extra={"url": url, "problem": problem})
        return Response(status_code=202)

    async def _keep_dead_letter(self, request: Request) -> Response:
        """Any event the broker gave up on: kept (ticks only counted), answered 202 once stored,
        so the broker moves on only when the letter is safe."""
        event = await read_cloud_event(request)
        logs.event_id.set(str(event["id"])[:128])
        kept = await run_in_threadpool(self.dead_letters.keep, event)
        event_type = event["type"] if event["type"] in KNOWN_TYPES else "other"
        metrics.DEAD_LETTERS_RECEIVED.labels(event_type, "false" if event["type"] == PING else "true").inc()
        log.warning(
            "dead letter received",
            extra={"type": event_type, "destination": event.get("knativeerrordest"),
                   "code": event.get("knativeerrorcode"), "new": kept},
        )
        return Response(status_code=202)

    def expire(self) -> tuple[int, int]:
        """Delete stale subscriptions and expired delivery records; how many of each."""
        subscriptions = self.store.expire(self.clock() - self.max_age)
        deliveries = self.ledger.expire()
        RateLimiter(self.store.engine, self.clock).expire()
        metrics.EXPIRED.inc(subscriptions)
        log.info("expired", extra={"subscriptions": subscriptions, "deliveries": deliveries})
        return subscriptions, deliveries
