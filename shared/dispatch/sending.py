"""The send loop: one wake-up to many devices, at most ``concurrency`` at once, within a deadline,
each final outcome handed over to be recorded the moment its send answered (to a
:class:`shared.recorder.Recorder`), and no send started while the recorder is behind, so that a
process killed mid-event has recorded nearly all it already sent."""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import datetime

from shared import metrics
from shared.core import Clock, Device, Outcome, SendResult, WakeUp
from shared.deliveries import Outcomes
from shared.dispatch.report import DispatchReport
from shared.events import InvalidToken
from shared.hold_gate import HoldGate
from shared.settings import DispatchSettings

log = logging.getLogger(__package__)

#: What a device gets when its provider raised instead of answering (a bug, or an unsendable token).
PROVIDER_ERROR = SendResult(Outcome.REJECTED, "provider_error")


class Sender:
    """Sends through the dispatcher's hold gate, and counts every answer into the report and the
    metrics."""

    def __init__(self, provider: HoldGate, settings: DispatchSettings, clock: Clock) -> None:
        self.provider = provider
        self.settings = settings
        self.clock = clock

    async def send_all(
        self,
        subscriptions: Sequence[Device],
        wakeup: WakeUp | Mapping[int, WakeUp],
        report: DispatchReport,
        record: Callable[[int, tuple[SendResult, datetime]], None] | None = None,
        deadline_seconds: float | None = None,
        room: Callable[[], Awaitable[None]] | None = None,
    ) -> Outcomes:
        """Send ``wakeup`` to every device (or each its own, by subscription id), at most
        ``concurrency`` at once, until the deadline (the dispatch deadline, or
        ``deadline_seconds`` when given: what is left of the event's or a flush's).

        With ``record``, each final outcome is handed to it the moment its send answered (to a
        recorder, which writes while the other sends go on), so a process killed mid-event has
        recorded nearly all it sent and the redelivered event does not send that again. With
        ``room`` too (the recorder's :meth:`~shared.recorder.Recorder.room`), each send waits for it
        once it holds its concurrency slot, right before it goes out: while the recorder is
        behind no send starts, so what is answered but unwritten stays small. A send waiting
        there at the deadline is cancelled like one on the wire (transient, ``deadline``).
        """
        limit = asyncio.Semaphore(self.settings.concurrency)
        results: dict[int, tuple[SendResult, datetime]] = {}
        provider = self.provider.name

        async def send(subscription: Device) -> None:
            async with limit:
                if record is not None and room is not None:
                    await room()
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
            if record is not None and result.outcome is not Outcome.TRANSIENT:
                record(subscription.id, results[subscription.id])
            metrics.PROVIDER_LATENCY.labels(provider, result.outcome.value).observe(elapsed)

        tasks = [asyncio.create_task(send(s)) for s in subscriptions]
        if tasks:
            timeout = self.settings.deadline_seconds if deadline_seconds is None else max(deadline_seconds, 0.0)
            _, pending = await asyncio.wait(tasks, timeout=timeout)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.gather(*pending, return_exceptions=True)
        now = self.clock()
        for subscription in subscriptions:
            if subscription.id not in results:
                results[subscription.id] = (SendResult(Outcome.TRANSIENT, "deadline"), now)
            result, observed_at = results[subscription.id]
            report.count(result)
            outcome = result.outcome.value
            if result.outcome is Outcome.TRANSIENT and result.rate_limited:
                outcome = "rate_limited"
            metrics.SENDS.labels(provider, outcome, result.reason or "none").inc()
            if result.outcome is Outcome.DEAD and subscription.id:
                report.dead.append(
                    InvalidToken(subscription.id, subscription.token_sha256, result.reason, observed_at)
                )
        return Outcomes(results)
