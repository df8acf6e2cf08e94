"""Per-event-type limits on the pushes a device gets (``PUSH_EVENT_LIMITS``): a device over its limit
gets no push this time, and the event still succeeds for it; a push that will be retried gives
its share of the limit back."""
from __future__ import annotations

from datetime import datetime

from starlette.concurrency import run_in_threadpool

from shared import metrics
from shared.core import Clock, Device, Outcome, SendResult
from shared.deliveries import Outcomes
from shared.ratelimits import RateLimiter
from shared.settings import DeliverySettings

#: What a device over its per-event-type limit gets: nothing sent, recorded as done.
LIMITED = SendResult(Outcome.REJECTED, "limited")


class EventLimits:
    """One provider's devices counted against the per-event-type limits (``PUSH_EVENT_LIMITS``)."""

    def __init__(self, provider: str, limiter: RateLimiter, delivery: DeliverySettings, clock: Clock) -> None:
        self.provider = provider
        self.limiter = limiter
        self.delivery = delivery
        self.clock = clock

    async def apply(
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
            metrics.SENDS.labels(self.provider, "limited", event_type).inc(len(held))
        return [s for s, ok in zip(subscriptions, allowed) if ok], held

    async def refund_transient(
        self, subscriptions: list[Device], event_type: str | None, outcomes: Outcomes, counted_at: datetime
    ) -> None:
        """Give back the limit of pushes that will be retried: only pushes sent count."""
        limit = self.delivery.limits.get(event_type) if event_type else None
        retried = [s for s in subscriptions if outcomes.results[s.id][0].outcome is Outcome.TRANSIENT]
        if limit is not None and retried:
            await run_in_threadpool(
                self.limiter.refund, [f"{s.id}\n{event_type}" for s in retried], limit, counted_at
            )
