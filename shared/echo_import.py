"""Moving the push subscriptions Echo holds into ours: ``pushctl import-echo --from URL``.

Echo keeps its subscriptions in three MySQL tables of its shared database (one for all wikis):
``echo_push_subscription`` (``eps_id``; ``eps_user``, the central user id; ``eps_token``, a
BLOB; ``eps_token_sha256``, the hex SHA-256 of the token's bytes, unique across users;
``eps_provider``; ``eps_updated``, a TIMESTAMP set when the row is created and never refreshed;
``eps_topic``), ``echo_push_provider`` (``epp_id``, ``epp_name``: ``fcm`` or ``apns``) and
``echo_push_topic`` (``ept_id``, ``ept_text``: an APNs bundle id). Echo stores no APNs
environment and no app.

Each Echo row becomes a subscription as subscribe would have stored it (the token and topic
checked by the same rules, :mod:`shared.validation`), with ``eps_updated`` as its last refresh
and creation time. What decides between Echo's row and one we hold for the same device (token
hash): the later last refresh wins, and an equal one goes to Echo's, which is how a run repeated
with other settings (``--apns-environment``, ``PUSH_APPS``) takes effect, and how a run after a
crash finds its own rows unchanged. In full, for Echo's time ``E`` and ours ``O``:

- ``O > E``: ours is newer and stays as it is, whoever holds it (``kept``);
- ``O <= E`` and ours already equals what Echo's row maps to: nothing to write (``unchanged``);
- ``O <= E``, same user: ours takes Echo's values, keeping its id and creation time (``updated``);
- ``O <= E``, another user: the device moves to Echo's user in a new row, as a subscribe by
  another user moves it (``updated``, and counted as ``moved``).

Echo never refreshes ``eps_updated``, so with that mapping every device Echo has known for longer
than ``PUSH_SUBSCRIPTION_MAX_AGE_DAYS`` is expired by the next clean-up, live ones included.
``refreshed_at_import`` (``--refreshed-at-import``) writes the import's start time ``S`` as the
last refresh of the rows it imports and updates instead (a new row's creation time stays ``E``).
The decision above still compares ``E`` with ``O``; only what is written changes. A rerun then
finds ``O = S > E`` on the rows it wrote: one that still equals what Echo's row maps to (the
refresh time aside) is ``unchanged`` and keeps its first ``S``, any other is ``kept``, as a
device that registered with us since. So a rerun with the option writes nothing, and cannot
apply new settings to those rows either.

APNs rows without a topic are skipped (``missing_topic``) unless the import is given a
``default_topic`` (``--default-topic``), checked at start by subscribe's rules, which such rows
take (its app, too, as ``PUSH_APPS`` maps it).

Rows that cannot be imported are skipped, each named (by ``eps_id``) with its reason, see
:data:`REASONS`. Two Echo rows may name one device for us though Echo's unique hash held: APNs
tokens are stored in lower case here, so tokens differing only in case are one device. A scan
before the import finds such groups; the row with the latest ``eps_updated`` (then the highest
``eps_id``) is imported, the others are skipped as ``duplicate_token``, whichever batch each is in.

The per-user cap (``PUSH_MAX_SUBSCRIPTIONS_PER_USER``) does not apply: Echo enforced its own, an
import must not evict live subscriptions in favour of rows that are older, and the result must
not depend on the order rows are read in. A user over the cap is brought under it by their next
subscribe, which evicts their least recently refreshed devices.

Large tables are read in batches by ``eps_id`` (keyset: ``eps_id > last``, never OFFSET), each
batch read in a short transaction of its own on Echo's side (no snapshot held open on Echo's
database for the whole run), and written in one transaction on ours. A crash loses at most the
batch in flight; running the import again is the resume.
"""
from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from functools import partial
from typing import Any

from sqlalchemy import Connection, Engine, bindparam, create_engine, delete, insert, select, text, update
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, IntegrityError

from shared.core import utcnow
from shared.db import DatabaseUnavailable, SchemaBehind, check_schema, get_engine, run_transaction
from shared.models import Subscription
from shared.subscriptions import token_sha256
from shared.settings import CleanupSettings
from shared.validation import (
    SubscribeSettings,
    apns_device_token,
    apns_topic_allowed,
    valid_apns_topic,
    valid_fcm_token,
)

ENVIRONMENTS = ("production", "sandbox")
DEFAULT_BATCH = 1000
MAX_BATCH = 20000

#: Why a row was not imported, in the order the checks run (docs/operations.md explains each).
REASONS = {
    "unknown_provider": "eps_provider names no provider, or one other than fcm and apns",
    "hash_mismatch": "eps_token_sha256 is not the SHA-256 of eps_token (not written by Echo)",
    "token_not_utf8": "eps_token is not UTF-8 text",
    "malformed_token": "the token is not one subscribe accepts for its provider",
    "missing_topic": (
        "an APNs row without a topic (eps_topic empty or naming no echo_push_topic row), and no --default-topic"
    ),
    "malformed_topic": "the topic is not an app bundle id",
    "topic_not_allowed": "the topic is not in PUSH_APNS_ALLOWED_TOPICS",
    "invalid_user": "eps_user is 0, which is no user",
    "invalid_time": "eps_updated is not a time (a zero date)",
    "duplicate_token": "another Echo row names the same device and was refreshed later",
}

# Echo's three tables, joined: the provider and topic by name. LEFT JOINs, so a row naming a
# provider or topic that does not exist is read (and skipped with its reason), not lost.
_JOINED = """
    SELECT s.eps_id, s.eps_user, s.eps_token, s.eps_token_sha256, p.epp_name, s.eps_updated,
           t.ept_text
    FROM echo_push_subscription s
    LEFT JOIN echo_push_provider p ON p.epp_id = s.eps_provider
    LEFT JOIN echo_push_topic t ON t.ept_id = s.eps_topic
"""
_BATCH = text(_JOINED + "WHERE s.eps_id > :after ORDER BY s.eps_id LIMIT :size")
_BY_IDS = text(_JOINED + "WHERE s.eps_id IN :ids").bindparams(bindparam("ids", expanding=True))
# The device each row names for us, computed by the server: an APNs token in lower case, any
# other as it is. Exact for every token we accept (hex and visible ASCII); a group that also
# holds rows we refuse is sorted out once those rows are read and checked.
_DUPLICATE_GROUPS = text(
    """
    SELECT GROUP_CONCAT(d.eps_id) FROM (
        SELECT s.eps_id,
               SHA2(IF(p.epp_name = 'apns', LOWER(CONVERT(s.eps_token USING latin1)), s.eps_token), 256)
                   AS device
        FROM echo_push_subscription s
        LEFT JOIN echo_push_provider p ON p.epp_id = s.eps_provider
    ) d
    GROUP BY d.device
    HAVING COUNT(*) > 1
    """
)
_COUNT = text("SELECT COUNT(*) FROM echo_push_subscription")

_c = Subscription.__table__.c
_COMPARED = ("user_id", "provider", "token", "topic", "environment", "app", "updated_at")
#: What a device is subscribed to: the columns compared, but for the time of the last refresh.
_MAPPED = _COMPARED[:-1]
_HELD = select(_c.id, _c.token_sha256, _c.created_at, *(_c[name] for name in _COMPARED)).where(
    _c.token_sha256.in_(bindparam("digests", expanding=True))
)
_INSERT = insert(Subscription.__table__)
_DELETE = delete(Subscription.__table__).where(_c.id.in_(bindparam("ids", expanding=True)))
_UPDATE = (
    update(Subscription.__table__)
    .where(_c.id == bindparam("b_id"))
    .values({name: bindparam(f"b_{name}") for name in _COMPARED})
)


class EchoImportError(Exception):
    """The import cannot run: Echo's database is unreachable, or its URL or tables are wrong."""


@dataclass(frozen=True)
class EchoRow:
    """One row of ``echo_push_subscription`` with its provider's and topic's names, as read."""

    eps_id: int
    user: int
    token: bytes
    token_sha256: str | bytes
    provider: bytes | None
    updated: Any  # a datetime; PyMySQL hands a zero date over as text
    topic: bytes | None


@dataclass
class Summary:
    """What an import did (or, dry, would do), row by row of Echo's table."""

    read: int = 0
    imported: int = 0
    """New subscriptions."""
    updated: int = 0
    """Subscriptions we held that took Echo's values (``moved`` of them to another user)."""
    moved: int = 0
    unchanged: int = 0
    kept: int = 0
    """Subscriptions we held with a later refresh than Echo's row: left as they are."""
    stale: int = 0
    """Of the imported and updated, those last refreshed longer ago than clean-up's maximum age."""
    defaulted: int = 0
    """Of the imported and updated, those that took the default topic."""
    skipped: Counter[str] = field(default_factory=Counter)
    default_topic: str | None = None
    """The import's ``--default-topic``, if given: the summary line then counts ``defaulted``."""

    def add(self, other: Summary) -> None:
        for name in ("read", "imported", "updated", "moved", "unchanged", "kept", "stale", "defaulted"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.skipped.update(other.skipped)

    def line(self) -> str:
        reasons = ", ".join(f"{reason} {count}" for reason, count in sorted(self.skipped.items()))
        skipped = sum(self.skipped.values())
        return (
            f"read {self.read}, imported {self.imported}, updated {self.updated} "
            f"(moved {self.moved}), unchanged {self.unchanged}, kept (ours newer) {self.kept}, "
            f"skipped {skipped}" + (f" ({reasons})" if reasons else "")
            + (f", took the default topic {self.defaulted}" if self.default_topic else "")
        )

    def stale_note(self) -> str | None:
        """What to tell the operator about the rows the next clean-up will expire, if any."""
        if not self.stale:
            return None
        return (
            f"note: {self.stale} of the rows imported or updated were last refreshed longer ago than "
            "PUSH_SUBSCRIPTION_MAX_AGE_DAYS (by eps_updated, which Echo never refreshes): the next "
            "clean-up expires them, live devices included. --refreshed-at-import takes the import "
            "as their last refresh instead, which also keeps Echo's dead devices until a send finds "
            "them gone or PUSH_SUBSCRIPTION_MAX_AGE_DAYS pass."
        )


@dataclass(frozen=True)
class Mapped:
    """An Echo row as our subscription: the values to write, and the device's hash."""

    eps_id: int
    digest: str
    values: dict[str, Any]
    """The subscription's columns, ``updated_at`` the last refresh to write."""
    echo_updated: datetime
    """``eps_updated``: the time that decides against ours, and a new row's creation time."""
    defaulted: bool = False
    """Whether the topic is the import's default (Echo's row has none)."""


#: Told of each row that is not imported: its eps_id and reason.
OnSkip = Callable[[int, str], None]
#: Told after each batch is written: how many Echo rows it held.
OnBatch = Callable[[int], None]


class EchoImport:
    """One import from Echo's database (``source``) into ours (``target``)."""

    def __init__(
        self,
        source: Engine,
        target: Engine,
        accepted: SubscribeSettings,
        environment: str = "production",
        batch: int = DEFAULT_BATCH,
        dry_run: bool = False,
        max_age: timedelta | None = None,
        clock: Callable[[], datetime] = utcnow,
        refreshed_at_import: bool = False,
        default_topic: str | None = None,
    ) -> None:
        if environment not in ENVIRONMENTS:
            raise EchoImportError(f"the APNs environment must be one of {', '.join(ENVIRONMENTS)}")
        if not 1 <= batch <= MAX_BATCH:
            raise EchoImportError(f"the batch size must be from 1 to {MAX_BATCH}")
        self.source = source
        self.target = target
        self.accepted = accepted
        self.environment = environment
        self.batch = batch
        self.dry_run = dry_run
        self.started = clock()
        self.stale_before = self.started - max_age if max_age is not None else None
        self.refreshed_at_import = refreshed_at_import
        if default_topic is not None:
            refused = self._topic_refused(default_topic)
            if refused is not None:
                raise EchoImportError(f"--default-topic {default_topic!r}: {REASONS[refused]}")
        self.default_topic = default_topic

    def count(self) -> int:
        """How many rows Echo's table holds now (for the progress bar)."""
        with _reading(self.source) as connection:
            return connection.execute(_COUNT).scalar_one()

    def run(self, on_skip: OnSkip, on_batch: OnBatch | None = None) -> Summary:
        """Import every row, batch by batch, in ``eps_id`` order; each row not imported is
        handed to ``on_skip`` as soon as its batch is written (dry: read)."""
        losers = self.duplicate_losers()
        summary = Summary(default_topic=self.default_topic)
        after = 0
        while True:
            with _reading(self.source) as connection:
                rows = [EchoRow(*row) for row in connection.execute(_BATCH, {"after": after, "size": self.batch})]
            if not rows:
                return summary
            done, skipped = self._batch(rows, losers)
            for eps_id, reason in skipped:
                on_skip(eps_id, reason)
            summary.add(done)
            after = rows[-1].eps_id
            if on_batch is not None:
                on_batch(len(rows))

    def duplicate_losers(self) -> frozenset[int]:
        """The eps_ids of Echo rows that another row of Echo's outranks for the same device."""
        with _reading(self.source) as connection:
            connection.exec_driver_sql("SET SESSION group_concat_max_len = 1048576")
            groups = [
                [int(i) for i in (ids.decode() if isinstance(ids, bytes) else ids).split(",")]
                for (ids,) in connection.execute(_DUPLICATE_GROUPS)
            ]
            if not groups:
                return frozenset()
            ids = [eps_id for group in groups for eps_id in group]
            rows = [EchoRow(*row) for row in connection.execute(_BY_IDS, {"ids": ids})]
        best: dict[str, EchoRow] = {}
        valid: list[tuple[str, EchoRow]] = []
        for row in rows:
            mapped = self.map(row)
            if isinstance(mapped, Mapped):
                valid.append((mapped.digest, row))
                current = best.get(mapped.digest)
                if current is None or (row.updated, row.eps_id) > (current.updated, current.eps_id):
                    best[mapped.digest] = row
        return frozenset(row.eps_id for digest, row in valid if best[digest] is not row)

    def map(self, row: EchoRow) -> Mapped | str:
        """The subscription ``row`` becomes, or the reason it cannot (a key of :data:`REASONS`)."""
        provider = {b"fcm": "fcm", b"apns": "apns"}.get(bytes(row.provider or b""))
        if provider is None:
            return "unknown_provider"
        echo_digest = row.token_sha256
        if isinstance(echo_digest, bytes):  # CHAR(64) of a table whose character set is binary
            echo_digest = echo_digest.decode("ascii", "replace")
        if hashlib.sha256(row.token).hexdigest() != echo_digest.lower():
            return "hash_mismatch"
        try:
            raw = row.token.decode("utf-8")
        except UnicodeDecodeError:
            return "token_not_utf8"
        topic = environment = app = None
        defaulted = False
        if provider == "fcm":
            token = raw if valid_fcm_token(raw) else None
        else:
            token = apns_device_token(raw)
        if token is None:
            return "malformed_token"
        if provider == "apns":
            if row.topic:
                try:
                    topic = row.topic.decode("utf-8")
                except UnicodeDecodeError:
                    return "malformed_topic"
                refused = self._topic_refused(topic)
                if refused is not None:
                    return refused
            elif self.default_topic is not None:
                topic, defaulted = self.default_topic, True
            else:
                return "missing_topic"
            environment = self.environment
            app = self.accepted.apps.app_for_topic(topic) if self.accepted.apps.settings else None
        if row.user <= 0:
            return "invalid_user"
        if not isinstance(row.updated, datetime):
            return "invalid_time"
        values = {
            "user_id": str(row.user), "provider": provider, "token": token, "topic": topic,
            "environment": environment, "app": app,
            "updated_at": self.started if self.refreshed_at_import else row.updated,
        }
        return Mapped(row.eps_id, token_sha256(token), values, row.updated, defaulted)

    def _topic_refused(self, topic: str) -> str | None:
        """Why subscribe would refuse ``topic`` (a key of :data:`REASONS`), or ``None``."""
        if not valid_apns_topic(topic):
            return "malformed_topic"
        if not apns_topic_allowed(topic, self.accepted):
            return "topic_not_allowed"
        return None

    def _batch(self, rows: Sequence[EchoRow], losers: frozenset[int]) -> tuple[Summary, list[tuple[int, str]]]:
        """Map and write one batch; what it did, and the rows it skipped."""
        skipped: list[tuple[int, str]] = []
        mapped: list[Mapped] = []
        seen: set[str] = set()
        for row in rows:
            result = self.map(row)
            if isinstance(result, Mapped) and (row.eps_id in losers or result.digest in seen):
                # In a batch's own rows too: a duplicate Echo gained after the scan.
                result = "duplicate_token"
            if isinstance(result, str):
                skipped.append((row.eps_id, result))
            else:
                seen.add(result.digest)
                mapped.append(result)
        work = partial(self._write, mapped=mapped)
        for attempt in range(3):
            try:
                if self.dry_run:
                    with self.target.connect() as connection:
                        done = self._write(connection, mapped)
                        connection.rollback()
                else:
                    done = run_transaction(self.target, work)
                break
            except IntegrityError:
                # A subscribe inserted one of these devices after we looked: look again.
                if attempt == 2:
                    raise
            except DatabaseUnavailable as exc:
                raise EchoImportError(
                    f"cannot write to PUSH_DATABASE_URL ({exc}); batches before eps_id "
                    f"{rows[0].eps_id} are written: run the import again to resume"
                ) from None
        done.read = len(rows)
        done.skipped = Counter(reason for _, reason in skipped)
        return done, skipped

    def _write(self, connection: Connection, mapped: Sequence[Mapped]) -> Summary:
        """Decide each mapped row against the subscription we hold for its device, and write
        (unless dry). Runs again whole when its transaction is retried."""
        done = Summary()
        if not mapped:
            return done
        held = {
            row.token_sha256: row
            for row in connection.execute(
                _HELD.with_for_update() if not self.dry_run else _HELD, {"digests": [m.digest for m in mapped]}
            )
        }
        fresh: list[dict[str, Any]] = []
        doomed: list[int] = []
        refreshed: list[dict[str, Any]] = []
        for item in mapped:
            ours = held.get(item.digest)
            if ours is not None and ours.updated_at > item.echo_updated:
                # With the refresh at import, this is also how a rerun finds the rows it wrote.
                if self.refreshed_at_import and _same(ours, item.values, _MAPPED):
                    done.unchanged += 1
                else:
                    done.kept += 1
                continue
            if ours is not None and _same(ours, item.values, _COMPARED):
                done.unchanged += 1
                continue
            if self.stale_before is not None and item.values["updated_at"] < self.stale_before:
                done.stale += 1
            done.defaulted += item.defaulted
            if ours is None or ours.user_id != item.values["user_id"]:
                if ours is not None:
                    doomed.append(ours.id)
                    done.updated += 1
                    done.moved += 1
                else:
                    done.imported += 1
                fresh.append({"token_sha256": item.digest, "created_at": item.echo_updated, **item.values})
            else:
                done.updated += 1
                refreshed.append({"b_id": ours.id, **{f"b_{name}": item.values[name] for name in _COMPARED}})
        if self.dry_run:
            return done
        if doomed:
            connection.execute(_DELETE, {"ids": doomed})
        if fresh:
            connection.execute(_INSERT, fresh)
        if refreshed:
            connection.execute(_UPDATE, refreshed)
        return done


def from_settings(
    source_url: str,
    environment: str,
    batch: int,
    dry_run: bool,
    refreshed_at_import: bool = False,
    default_topic: str | None = None,
) -> EchoImport:
    """The import ``pushctl import-echo`` runs: into ``PUSH_DATABASE_URL`` (at the code's schema),
    with subscribe's rules (``PUSH_APNS_ALLOWED_TOPICS``, ``PUSH_APPS``) and clean-up's maximum
    age (``PUSH_SUBSCRIPTION_MAX_AGE_DAYS``, to count rows it will expire)."""
    target = get_engine()
    try:
        check_schema(target)
    except (SchemaBehind, DatabaseUnavailable) as exc:
        raise EchoImportError(f"PUSH_DATABASE_URL: {exc}") from None
    max_age = timedelta(days=CleanupSettings.from_env().subscription_max_age_days)
    return EchoImport(
        source_engine(source_url), target, SubscribeSettings.from_env(), environment, batch, dry_run, max_age,
        refreshed_at_import=refreshed_at_import, default_topic=default_topic,
    )


def source_engine(url: str) -> Engine:
    """An engine for Echo's database at ``url`` (MySQL or MariaDB, through PyMySQL), whose
    sessions read TIMESTAMPs in UTC, as our times are stored, whatever the server's zone."""
    try:
        parsed = make_url(url)
    except Exception:
        raise EchoImportError("--from is not a database URL (mysql+pymysql://user:password@host/db)") from None
    if parsed.get_backend_name() not in ("mysql", "mariadb"):
        raise EchoImportError("--from must name Echo's MySQL or MariaDB database (mysql+pymysql://...)")
    return create_engine(
        parsed.set(drivername=f"{parsed.get_backend_name()}+pymysql"),
        hide_parameters=True,  # error messages would otherwise quote tokens
        pool_size=1,
        connect_args={"init_command": "SET time_zone = '+00:00'", "connect_timeout": 10},
    )


def _same(ours: Any, values: dict[str, Any], names: Iterable[str]) -> bool:
    """Whether the row we hold has ``values`` in each column of ``names``."""
    return all(getattr(ours, name) == values[name] for name in names)


@contextmanager
def _reading(engine: Engine) -> Iterator[Connection]:
    """A short read on Echo's database (its own transaction), failures as :class:`EchoImportError`."""
    try:
        with engine.connect() as connection:
            yield connection
    except DBAPIError as exc:
        raise EchoImportError(f"cannot read Echo's tables: {_reason(exc)}") from None


def _reason(exc: DBAPIError) -> str:
    """The driver's message alone: SQLAlchemy's adds the statement."""
    args: Iterable[Any] = exc.orig.args if exc.orig is not None else ()
    return " ".join(str(arg) for arg in args) or type(exc.orig).__name__
