"""The flush of delayed wake-ups: what the privacy delay queued, and what a hold kept once it
lifted (:mod:`shared.holds`), sent on a tick (or after an event whose hold ended)."""
from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from datetime import datetime, timedelta

from starlette.concurrency import run_in_threadpool

from shared import metrics
from shared.core import Clock, Outcome, SendResult, WakeUp
from shared.dispatch.dead_tokens import DEFAULT_RETRY_AFTER
from shared.dispatch.report import DispatchReport
from shared.dispatch.sending import Sender
from shared.hold_gate import HoldGate
from shared.pending import Due, FlushScope, PendingStore
from shared.recorder import Recorder, written
from shared.settings import DispatchSettings
from shared.subscriptions import SubscriptionStore


#: Due wake-ups one round of a flush claims and sends; a flush takes round after round.
FLUSH_BATCH = 1000
#: A flush starts no new round with less than this share of its deadline left: a round started
#: then would mostly be cut off, and its wake-ups handed back for a later tick.
FLUSH_LAST_ROUND_SHARE = 0.2


class Flush:
    """Sends one provider's due wake-ups from the pending store through the hold gate."""

    def __init__(
        self, gate: HoldGate, pending: PendingStore, store: SubscriptionStore, sender: Sender,
        settings: DispatchSettings, clock: Clock,
    ) -> None:
        self.gate = gate
        self.provider: str = gate.name
        self.pending = pending
        self.store = store
        self.sender = sender
        self.settings = settings
        self.clock = clock
        # Each sent wake-up leaves the queue as soon as its send answered (shared.recorder).
        self.finished: Recorder[tuple[str, list[Due], list[Due], timedelta]] = Recorder(
            pending.finish_many, "flushed wake-ups")

    async def run(self, seconds: float | None = None) -> DispatchReport:
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
            claimed = await self._round(report, deadline - time.monotonic(), scope)
            if claimed < FLUSH_BATCH:
                break
        return report

    async def _round(self, report: DispatchReport, seconds: float, scope: FlushScope = FlushScope()) -> int:
        """Claim up to :data:`FLUSH_BATCH` due wake-ups and send them within ``seconds``: every
        message type at once, each wake-up with what is left of its TTL. As for events, what was
        sent is recorded as the sends go on, so a flush that dies midway does not send it again.
        How many were claimed."""
        token, due = await run_in_threadpool(
            self.pending.claim_due, self.provider, FLUSH_BATCH, scope=scope)
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
            metrics.SENDS.labels(self.provider, "expired", "ttl").inc(len(expired))
        until_recorded = time.monotonic() + seconds + self.settings.drain_seconds
        recording: list[asyncio.Future[None]] = []

        def record_of(items: dict[int, Due]) -> Callable[[int, tuple[SendResult, datetime]], None]:
            def record(sub_id: int, _result: tuple[SendResult, datetime]) -> None:
                recording.append(self.finished.add((token, [items[sub_id]], [], timedelta()), until_recorded))

            return record

        with self.gate.flushing({(d.subscription_id, d.message_type): d.kept for d in due}):
            results = await asyncio.gather(*(
                self.sender.send_all([rows[sub_id] for sub_id in items], wakeups[message_type], report,
                                     record_of(items), deadline_seconds=seconds, room=self.finished.room)
                for message_type, items in groups.items()
            ))
        # Every final outcome is on its way already; what is left: the expired and the transient.
        retry = [item for items, outcomes in zip(groups.values(), results) for sub_id, item in items.items()
                 if outcomes.results[sub_id][0].outcome is Outcome.TRANSIENT]
        if expired or retry:
            recording.append(self.finished.add(
                (token, expired, retry, timedelta(seconds=report.retry_after or DEFAULT_RETRY_AFTER)),
                until_recorded))
        await written(recording)
        return len(due)
