"""The delivery ledger: claims before sending and outcomes after, per event and subscription.

It is what makes redelivery safe. The broker redelivers an event when the dispatcher answered
"retry" (some sends were transient), when the dispatcher crashed, or when the request timed out
while the dispatcher was still working. In every case the ledger, shared by all replicas through
the database, says which devices already got this event (skip), which are being sent to by
another invocation right now (skip, and ask for a retry), and which still need it (claim, send).

Both writes are safe to repeat, so a write cut off mid-statement (the database went away before
its answer came back: committed or not, nobody knows) can simply be tried again: a claim carries
a token chosen before its first try, so a claim that did commit is found to be ours on the
retry, and a record only touches the rows still claimed with the event's token.
"""
from __future__ import annotations

import secrets
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TypeVar

from sqlalchemy import Connection, Engine, bindparam, delete, select, tuple_, update

from shared.core import Clock, Outcome, SendResult, utcnow
from shared.db import insert_ignore, run_transaction
from shared.models import Delivery

CHUNK = 500  # ids per IN (...) list, rows per INSERT
T = TypeVar("T")

# Recording's statements, built once (building them and their cache keys for every batch cost
# about as much CPU as running them): the rows are (event key, subscription id) pairs, and only
# those still claimed by one of ``claims`` are touched.
_t = Delivery.__table__
_OURS = (
    tuple_(_t.c.event_key, _t.c.subscription_id).in_(bindparam("rows", expanding=True)),
    _t.c.claim.in_(bindparam("claims", expanding=True)),
)
#: Gives up the claims of transient failures, so a redelivery sends to them again.
_GIVE_BACK = delete(_t).where(*_OURS)
#: Keeps a final outcome.
_FINISH = update(_t).where(*_OURS).values(
    state=bindparam("b_state"), reason=bindparam("b_reason"),
    observed_at=bindparam("b_observed_at"), lease_until=None,
)


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

    def claim_many_in(
        self, connection: Connection, requests: Sequence[tuple[str, Sequence[int]]],
        tokens: Sequence[str | None] | None = None,
    ) -> list[Claims]:
        """Claim, for each event, every subscription that is not done or in flight elsewhere,
        inside the caller's transaction (the dispatcher reads the subscriptions and claims them in
        one, for every event of a batch), each with its token from ``tokens`` (a new one where
        none is given): a retry of a claim whose answer was lost passes the same token again, and
        the rows that claim did take are found to be ours."""
        tokens = tokens or [None] * len(requests)
        claims = [Claims(token or new_claim_token()) for token in tokens]
        now = self.clock()
        lease_until, expires_at = now + self.lease, now + self.retention
        rows = sorted(  # one lock order for every replica
            (
                {"event_key": key, "subscription_id": sub_id, "state": "sending",
                 "claim": claim.token, "lease_until": lease_until, "expires_at": expires_at}
                for claim, (key, ids) in zip(claims, requests)
                for sub_id in ids
            ),
            key=lambda row: (row["event_key"], row["subscription_id"]),
        )
        table = Delivery.__table__
        inserted = sum(
            connection.execute(insert_ignore(connection, table), chunk).rowcount for chunk in _chunks(rows)
        )
        if inserted == len(rows):
            # First deliveries (the common case): every row is ours.
            for claim, (_, ids) in zip(claims, requests):
                claim.claimed.update(ids)
            return claims
        for claim, (key, ids) in zip(claims, requests):
            for chunk in _chunks(ids):
                self._settle(connection, key, chunk, claim, now, lease_until)
        return claims

    def _settle(
        self, connection: Connection, key: str, ids: list[int], claims: Claims, now: datetime, lease_until: datetime
    ) -> None:
        """Sort an event's rows that were there before this claim: take over the claims of a
        dispatcher that stopped before recording anything, and see what the others hold."""
        table = Delivery.__table__
        connection.execute(
            update(table)
            .where(
                table.c.event_key == key,
                table.c.subscription_id.in_(ids),
                table.c.state == "sending",
                table.c.lease_until < now,
            )
            .values(claim=claims.token, lease_until=lease_until)
        )
        for row in connection.execute(
            select(table.c.subscription_id, table.c.state, table.c.claim, table.c.reason, table.c.observed_at)
            .where(table.c.event_key == key, table.c.subscription_id.in_(ids))
        ):
            if row.claim == claims.token and row.state == "sending":
                claims.claimed.add(row.subscription_id)
            elif row.state == "sending":
                claims.in_flight.add(row.subscription_id)
            elif row.state == "dead":
                claims.dead[row.subscription_id] = (row.reason or "", row.observed_at or now)
            else:
                claims.done.add(row.subscription_id)

    def record_many(self, items: Sequence[tuple[str, Claims, Outcomes]]) -> list[None]:
        """Keep the final outcomes of several events in one transaction; give up the claims of
        transient failures so the redelivered event sends to those devices again (one result per
        item, for :class:`shared.batching.Batcher`)."""
        run_transaction(self.engine, lambda connection: self._record_many(connection, items))
        return [None] * len(items)

    def _record_many(self, connection: Connection, items: Sequence[tuple[str, Claims, Outcomes]]) -> None:
        retry: list[tuple[str, int]] = []
        final: dict[tuple[str, str], tuple[list[tuple[str, int]], datetime]] = {}
        for key, _, outcomes in items:
            for sub_id, (result, observed_at) in outcomes.results.items():
                if result.outcome is Outcome.TRANSIENT:
                    retry.append((key, sub_id))
                    continue
                group = (result.outcome.value, result.reason[:64])
                pairs, earliest = final.get(group, ([], observed_at))
                pairs.append((key, sub_id))
                final[group] = (pairs, min(earliest, observed_at))
        # A claim token belongs to one event: matching any of the batch's tokens is matching
        # each row's own.
        ours = list({claims.token for _, claims, _ in items})
        for chunk in _chunks(retry):
            connection.execute(_GIVE_BACK, {"rows": chunk, "claims": ours})
        # One UPDATE per outcome and reason, not per device (PyMySQL runs an executemany UPDATE
        # as one statement per row). The group's earliest observation stands for all of it:
        # clean-up keeps a row refreshed after ``observed_at``, so an earlier time errs towards
        # keeping a device that re-registered.
        for (state, reason), (pairs, observed_at) in final.items():
            for chunk in _chunks(pairs):
                connection.execute(
                    _FINISH,
                    {"rows": chunk, "claims": ours, "b_state": state, "b_reason": reason,
                     "b_observed_at": observed_at},
                )

    def expire(self, events_per_batch: int = 500) -> int:
        """Delete records past their retention, a few hundred events per transaction so no
        single statement holds locks for long; how many rows went."""
        now = self.clock()

        def one_batch(connection: Connection) -> tuple[int, int]:
            keys = list(
                connection.scalars(
                    select(Delivery.event_key)
                    .where(Delivery.expires_at < now)
                    .distinct()
                    .limit(events_per_batch)
                )
            )
            if not keys:
                return 0, 0
            deleted = connection.execute(
                delete(Delivery).where(Delivery.event_key.in_(keys), Delivery.expires_at < now)
            ).rowcount
            return len(keys), deleted

        total = 0
        while True:
            events, deleted = run_transaction(self.engine, one_batch)
            total += deleted
            if events < events_per_batch:
                return total


def new_claim_token() -> str:
    """A claim token: chosen before a claim's first try and kept for its retries."""
    return secrets.token_hex(16)


def _chunks(items: Sequence[T]) -> Iterator[list[T]]:
    items = list(items)
    for start in range(0, len(items), CHUNK):
        yield items[start : start + CHUNK]
