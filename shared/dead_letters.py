"""Dead letters: the events the broker gave up on, kept in the database until they are replayed.

The broker's dead-letter sink is clean-up's ``POST /dead-letters`` (knative/eventing.yaml): every
event that failed all its retries arrives there with Knative's error attributes, and is stored
(:class:`DeadLetterStore`), counted (``push_dead_letters_received_total``, and the stored ones
as ``push_dead_letters``) and alerted on (monitoring/alerts.yml, ``PushDeadLetters``).
``pushctl dead-letters list`` shows them; ``pushctl dead-letters replay --to URL`` posts each
again, without the error attributes, and deletes those the URL took (2xx). Replaying is safe: a
redelivered notification skips every device it already reached (:mod:`shared.deliveries`), a
dead-token report deletes nothing more.

Ticks (``dev.knative.sources.ping``) are counted and not kept: the next tick does their work.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime

from cloudevents.http import CloudEvent
from sqlalchemy import Connection, Engine, delete, func, select, update

from shared.core import PING, Clock, utcnow
from shared.db import insert_ignore, read_session, run_transaction, unavailable_as_503
from shared.models import DeadLetter

#: The attributes Knative adds to a dead-lettered event; a replay leaves them out.
ERROR_ATTRIBUTES = ("knativeerrordest", "knativeerrorcode", "knativeerrordata")


@dataclass(frozen=True)
class StoredLetter:
    id: int
    event_id: str
    event_type: str
    destination: str | None
    error_code: int | None
    received_at: datetime
    replay_attempts: int
    last_replay_error: str | None
    attributes: dict[str, str]
    data: bytes

    def replay_attributes(self) -> dict[str, str]:
        """The event's own attributes, as it was first sent."""
        return {k: v for k, v in self.attributes.items() if k not in ERROR_ATTRIBUTES}


def letter_key(source: str, event_id: str, destination: str | None) -> str:
    return hashlib.sha256(f"{source}\n{event_id}\n{destination or ''}".encode()).hexdigest()


def _error_code(value: object) -> int | None:
    try:
        return int(str(value))
    except ValueError:
        return None


class DeadLetterStore:
    def __init__(self, engine: Engine, clock: Clock = utcnow) -> None:
        self.engine = engine
        self.clock = clock

    def keep(self, event: CloudEvent) -> bool:
        """Store ``event``; False when it is a tick (not kept) or was kept already."""
        attributes = {k: str(v) for k, v in event.get_attributes().items()}
        if attributes["type"] == PING:
            return False
        destination = attributes.get("knativeerrordest")
        data = event.get_data()
        if data is None:
            body = b""
        elif isinstance(data, (bytes, bytearray)):
            body = bytes(data)
        elif isinstance(data, str):
            body = data.encode()
        else:
            body = json.dumps(data, separators=(",", ":")).encode()
        row = {
            "key_sha256": letter_key(attributes["source"], attributes["id"], destination),
            "event_id": attributes["id"][:255],
            "event_type": attributes["type"][:255],
            "destination": destination,
            "error_code": _error_code(attributes.get("knativeerrorcode")),
            "attributes": json.dumps(attributes, sort_keys=True),
            "data": body,
            "received_at": self.clock(),
            "replay_attempts": 0,
        }

        def work(connection: Connection) -> bool:
            return bool(connection.execute(insert_ignore(connection, DeadLetter), [row]).rowcount)

        return run_transaction(self.engine, work)

    def letters(self, limit: int | None = None, ids: list[int] | None = None) -> Iterator[StoredLetter]:
        """The stored dead letters, oldest first."""
        query = select(DeadLetter).order_by(DeadLetter.id)
        if ids:
            query = query.where(DeadLetter.id.in_(ids))
        if limit is not None:
            query = query.limit(limit)
        with unavailable_as_503(), read_session(self.engine) as session:
            rows = session.scalars(query).all()
        for row in rows:
            yield StoredLetter(
                row.id, row.event_id, row.event_type, row.destination, row.error_code, row.received_at,
                row.replay_attempts, row.last_replay_error, json.loads(row.attributes), row.data,
            )

    def replayed(self, letter_id: int) -> None:
        run_transaction(self.engine, lambda c: c.execute(delete(DeadLetter).where(DeadLetter.id == letter_id)))

    def replay_failed(self, letter_id: int, error: str) -> None:
        run_transaction(self.engine, lambda c: c.execute(
            update(DeadLetter).where(DeadLetter.id == letter_id)
            .values(replay_attempts=DeadLetter.replay_attempts + 1, last_replay_error=error[:255])
        ))

    def count(self) -> int:
        with unavailable_as_503(), read_session(self.engine) as session:
            return session.scalar(select(func.count()).select_from(DeadLetter)) or 0
