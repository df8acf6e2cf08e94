"""The delivery ledger: claims before sending and outcomes after, per event and subscription.

It is what makes redelivery safe. The broker redelivers an event when the dispatcher answered
"retry" (some sends were transient), when the dispatcher crashed, or when the request timed out
while the dispatcher was still working. In every case the ledger, shared by all replicas through
the database, says which devices already got this event (skip), which are being sent to by
another invocation right now (skip, and ask for a retry), and which still need it (claim, send).
"""
from __future__ import annotations

import secrets
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import Engine, bindparam, delete, select, update
from sqlalchemy.orm import Session

from shared.db import insert_ignore, run_transaction
from shared.models import Delivery
from shared.providers.base import Outcome, SendResult
from shared.subscriptions import Clock, utcnow

CHUNK = 500  # ids per IN (...) list


@dataclass
class Claims:
    """Where each subscription of an event stands for this invocation."""

    token: str
    claimed: set[int] = field(default_factory=set)
    """Ours to send now."""
    done: set[int] = field(default_factory=set)
    """Already delivered or rejected for this event: nothing to do."""
    dead: dict[int, tuple[str, datetime]] = field(default_factory=dict)
    """Found dead earlier for this event: report again (reason, observed_at), do not send."""
    in_flight: set[int] = field(default_factory=set)
    """Being sent by another invocation whose lease has not run out: retry the event later."""


@dataclass(frozen=True)
class Outcomes:
    """What this invocation's sends came to, by subscription id, with when each was observed."""

    results: dict[int, tuple[SendResult, datetime]]


class DeliveryLedger:
    def __init__(
        self,
        engine: Engine,
        lease: timedelta = timedelta(seconds=120),
        retention: timedelta = timedelta(hours=24),
        clock: Clock = utcnow,
    ) -> None:
        self.engine = engine
        self.lease = lease
        self.retention = retention
        self.clock = clock

    def claim(self, event_key: str, subscription_ids: Sequence[int]) -> Claims:
        """Claim every subscription of the event that is not done or in flight elsewhere."""
        token = secrets.token_hex(16)
        return run_transaction(self.engine, lambda s: self._claim(s, event_key, subscription_ids, token))

    def _claim(self, session: Session, key: str, ids: Sequence[int], token: str) -> Claims:
        claims = Claims(token)
        now = self.clock()
        lease_until, expires_at = now + self.lease, now + self.retention
        for chunk in _chunks(ids):
            rows = [
                {"event_key": key, "subscription_id": sub_id, "state": "sending",
                 "claim": claims.token, "lease_until": lease_until, "expires_at": expires_at}
                for sub_id in chunk
            ]
            session.execute(insert_ignore(session, Delivery), rows)
            # Take over claims whose dispatcher stopped before recording anything.
            session.execute(
                update(Delivery)
                .where(
                    Delivery.event_key == key,
                    Delivery.subscription_id.in_(chunk),
                    Delivery.state == "sending",
                    Delivery.lease_until < now,
                )
                .values(claim=claims.token, lease_until=lease_until)
            )
            for row in session.scalars(
                select(Delivery).where(Delivery.event_key == key, Delivery.subscription_id.in_(chunk))
            ):
                if row.claim == claims.token and row.state == "sending":
                    claims.claimed.add(row.subscription_id)
                elif row.state == "sending":
                    claims.in_flight.add(row.subscription_id)
                elif row.state == "dead":
                    claims.dead[row.subscription_id] = (row.reason or "", row.observed_at or now)
                else:
                    claims.done.add(row.subscription_id)
        return claims

    def record(self, event_key: str, claims: Claims, outcomes: Outcomes) -> None:
        """Keep the final outcomes; give up the claims of transient failures so the
        redelivered event sends to those devices again."""
        run_transaction(self.engine, lambda s: self._record(s, event_key, claims, outcomes))

    def _record(self, session: Session, key: str, claims: Claims, outcomes: Outcomes) -> None:
        retry: list[int] = []
        final: dict[str, list[dict]] = {}
        for sub_id, (result, observed_at) in outcomes.results.items():
            if result.outcome is Outcome.TRANSIENT:
                retry.append(sub_id)
            else:
                final.setdefault(result.outcome.value, []).append(
                    {"b_id": sub_id, "b_reason": result.reason[:64], "b_observed": observed_at}
                )
        table = Delivery.__table__
        ours = (table.c.event_key == key, table.c.claim == claims.token)
        for chunk in _chunks(retry):
            session.execute(delete(table).where(*ours, table.c.subscription_id.in_(chunk)))
        for state, rows in final.items():
            session.execute(
                update(table)
                .where(*ours, table.c.subscription_id == bindparam("b_id"))
                .values(
                    state=state,
                    reason=bindparam("b_reason"),
                    observed_at=bindparam("b_observed"),
                    lease_until=None,
                ),
                rows,
            )

    def release(self, event_key: str, claims: Claims, subscription_ids: Iterable[int]) -> None:
        """Give up claims without an outcome (the sends never started)."""
        ids = list(subscription_ids)
        run_transaction(
            self.engine,
            lambda s: [
                s.execute(
                    delete(Delivery).where(
                        Delivery.event_key == event_key,
                        Delivery.claim == claims.token,
                        Delivery.subscription_id.in_(chunk),
                    )
                )
                for chunk in _chunks(ids)
            ],
        )

    def expire(self, events_per_batch: int = 500) -> int:
        """Delete records past their retention, a few hundred events per transaction so no
        single statement holds locks for long; how many rows went."""
        now = self.clock()

        def one_batch(session: Session) -> tuple[int, int]:
            keys = list(
                session.scalars(
                    select(Delivery.event_key)
                    .where(Delivery.expires_at < now)
                    .distinct()
                    .limit(events_per_batch)
                )
            )
            if not keys:
                return 0, 0
            deleted = session.execute(
                delete(Delivery).where(Delivery.event_key.in_(keys), Delivery.expires_at < now)
            ).rowcount
            return len(keys), deleted

        total = 0
        while True:
            events, deleted = run_transaction(self.engine, one_batch)
            total += deleted
            if events < events_per_batch:
                return total


def _chunks(ids: Sequence[int] | list[int]) -> Iterator[list[int]]:
    ids = list(ids)
    for start in range(0, len(ids), CHUNK):
        yield ids[start : start + CHUNK]
