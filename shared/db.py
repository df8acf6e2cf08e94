"""Connecting to the database, checking its schema, and running transactions that survive races.

``PUSH_DATABASE_URL`` names the database (an SQLAlchemy URL); without it the embedded default is an
SQLite file, ``push.sqlite3`` in the working directory. Production uses MySQL/MariaDB through
PyMySQL: ``mysql+pymysql://user:password@host/db?charset=utf8mb4``.
"""
from __future__ import annotations

import asyncio
import functools
import logging
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

from sqlalchemy import Connection, Engine, create_engine, event, inspect, text
from sqlalchemy.dialects import mysql, sqlite
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, DisconnectionError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.orm import Session

from shared.config import ConfigError
from shared.settings import DatabaseSettings

log = logging.getLogger(__name__)

#: The newest migration this code needs. ``pushctl migrate`` brings a database to it, and a
#: function refuses to serve a database that is behind (a test keeps this equal to Alembic's head,
#: and the revisions numbered 0001, 0002, ... so that "newer" can be told without Alembic).
SCHEMA_REVISION = "0007"

T = TypeVar("T")

#: Seconds a pooled MySQL connection may sit unused before it is checked before use.
IDLE_PING_SECONDS = 10

# MySQL/MariaDB errors that mean "run the transaction again": deadlock, lock wait timeout.
_RETRYABLE_MYSQL_ERRORS = {1213, 1205}


class SchemaBehind(Exception):
    """The database schema is older than the code: the operator must run ``pushctl migrate``."""


class DatabaseUnavailable(Exception):
    """The database cannot be reached now; the request should be retried later."""


def database_url() -> str:
    """``PUSH_DATABASE_URL``, which holds a password and so may also come from a secret file
    (OpenFaaS can give secrets only as files)."""
    return DatabaseSettings.from_env().url


def get_engine(url: str | None = None) -> Engine:
    """The process's engine (and connection pool) for ``url``, default ``PUSH_DATABASE_URL``."""
    return _engine(url or database_url())


@functools.cache
def _engine(url: str) -> Engine:
    engine = make_engine(url)
    # functions-framework imports the function (and so opens the pool, to check the schema) in
    # gunicorn's master, then forks the workers: a worker must not share the master's
    # connections, or two processes talk over one socket. The child forgets them, unclosed.
    os.register_at_fork(after_in_child=lambda: engine.dispose(close=False))
    return engine


def make_engine(url: str) -> Engine:
    """A new engine for ``url`` with the settings each database needs."""
    try:
        parsed = make_url(url)
    except Exception:
        raise ConfigError("PUSH_DATABASE_URL is not a valid SQLAlchemy database URL") from None
    if parsed.get_backend_name() == "sqlite":
        return _sqlite_engine(url)
    if parsed.get_backend_name() in ("mysql", "mariadb"):
        # A fixed pool: overflow connections are closed as soon as they are returned, so under
        # load they are opened again and again, and each PyMySQL connection costs a TLS context
        # and handshake (about 10 ms of CPU): that churn once took most of a dispatcher's CPU.
        # Threads beyond the pool wait for a connection (up to pool_timeout, then 503).
        settings = DatabaseSettings.from_env()
        engine = create_engine(
            url,
            hide_parameters=True,  # error messages would otherwise quote tokens and user ids
            pool_recycle=3600,
            pool_size=settings.pool_size,
            max_overflow=settings.max_overflow,
            pool_timeout=10,
            pool_reset_on_return=None,  # see _roll_back_only_open_transactions
            connect_args={"connect_timeout": settings.connect_timeout},
        )
        _ping_after_idle(engine)
        _roll_back_only_open_transactions(engine)
        return engine
    return create_engine(url, pool_pre_ping=True, hide_parameters=True)


def _ping_after_idle(engine: Engine) -> None:
    """Check a pooled MySQL connection before use only when it sat idle for
    :data:`IDLE_PING_SECONDS`: a restarted server or a proxy's idle timeout has then likely
    closed it, and a fresh one is taken instead. ``pool_pre_ping`` would ping on every checkout,
    an extra round trip per transaction on the dispatchers' hot path; a connection that fails
    in use is still caught (the request answers 503 and the pool drops its connections)."""

    @event.listens_for(engine, "checkin")
    def _checked_in(_dbapi_connection, record) -> None:
        record.info["idle_since"] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _checked_out(dbapi_connection, record, _proxy) -> None:
        idle_since = record.info.get("idle_since")
        if idle_since is not None and time.monotonic() - idle_since > IDLE_PING_SECONDS:
            try:
                dbapi_connection.ping(False)
            except Exception as exc:  # noqa: BLE001 - whatever the driver raises: reconnect
                raise DisconnectionError("pooled connection is gone") from exc


def _roll_back_only_open_transactions(engine: Engine) -> None:
    """Roll back a connection returned to the pool only when its last transaction did not end.
    The pool's default rolls back every connection it gets back, even one whose transaction just
    committed: a round trip more for every transaction. A connection used outside SQLAlchemy's
    transactions (``engine.raw_connection()``) is still rolled back."""

    @event.listens_for(engine, "begin")
    def _began(connection) -> None:
        connection.connection.info["transaction_ended"] = False

    @event.listens_for(engine, "commit")
    @event.listens_for(engine, "rollback")
    def _ended(connection) -> None:
        if not connection.invalidated:  # an invalidated connection leaves the pool anyway
            connection.connection.info["transaction_ended"] = True

    @event.listens_for(engine, "reset")
    def _reset(dbapi_connection, record, state) -> None:
        ended = record.info.pop("transaction_ended", False) if record is not None else False
        if not ended and not state.transaction_was_reset:
            dbapi_connection.rollback()


def _sqlite_engine(url: str) -> Engine:
    """SQLite with WAL and a busy timeout, and writers serialised by ``BEGIN IMMEDIATE``.

    pysqlite's default deferred transactions take the write lock only at the first write, so two
    read-then-write transactions can deadlock; starting every transaction as IMMEDIATE makes the
    second writer wait instead (SQLAlchemy's documented recipe).
    """
    engine = create_engine(
        url, hide_parameters=True, connect_args={"check_same_thread": False, "timeout": 30}
    )

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection, _record) -> None:
        dbapi_connection.isolation_level = None  # let SQLAlchemy's "begin" event emit BEGIN
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


@contextmanager
def unavailable_as_503() -> Iterator[None]:
    """Turn "cannot reach the database" errors into :class:`DatabaseUnavailable`, which the
    functions answer with a retryable 503; other database errors pass through."""
    try:
        yield
    except DBAPIError as exc:
        if _is_connection_error(exc):
            raise DatabaseUnavailable(type(exc.orig).__name__) from exc
        raise
    except PoolTimeout as exc:
        raise DatabaseUnavailable("connection pool exhausted") from exc


def read_session(engine: Engine) -> Session:
    """A session for reads; use as ``with unavailable_as_503(), read_session(engine) as session``."""
    return Session(engine, expire_on_commit=False)


def schema_revision(engine: Engine) -> str | None:
    """The revision recorded by Alembic in the database, or ``None`` for an empty database."""
    with unavailable_as_503(), engine.connect() as connection:
        if not inspect(connection).has_table("alembic_version"):
            return None  # never migrated
        return connection.execute(text("SELECT version_num FROM alembic_version")).scalar()


def check_schema(engine: Engine) -> None:
    """Raise :class:`SchemaBehind` unless the database is at :data:`SCHEMA_REVISION` or newer.

    A newer schema is served: a rollout runs ``pushctl migrate`` first, and replicas of the
    previous release keep cold-starting until the new one has replaced them. Each migration must
    leave the previous release working (add tables and columns; drop them a release later)."""
    found = schema_revision(engine)
    if found == SCHEMA_REVISION:
        return
    if found is not None and found.isdigit() and int(found) > int(SCHEMA_REVISION):
        log.warning(
            "database schema is at revision %s, newer than this code's %s: serving it", found, SCHEMA_REVISION
        )
        return
    raise SchemaBehind(
        f"database schema is at revision {found or 'none'}, this code needs "
        f"{SCHEMA_REVISION}: run `pushctl migrate` against PUSH_DATABASE_URL first"
    )


def migrate(engine: Engine) -> tuple[str | None, list[str]]:
    """Bring the database to the newest schema this code knows: the revision it was at, and the
    revisions applied, oldest first (none when it was already there). A database migrated for
    a newer release is left alone."""
    from alembic import command
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    found = schema_revision(engine)
    if found is not None and found.isdigit() and int(found) > int(SCHEMA_REVISION):
        return found, []
    config = Config()
    config.set_main_option("script_location", str(Path(__file__).with_name("migrations")))
    with unavailable_as_503(), engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, "head")
    now = schema_revision(engine)
    applied = ScriptDirectory.from_config(config).iterate_revisions(now, found or "base")
    return found, sorted(revision.revision for revision in applied)


class SchemaGate:
    """Lets a function serve only a database at :data:`SCHEMA_REVISION`.

    Checked at start-up, so a function rolled out before ``pushctl migrate`` stops at once with
    an error that says so; when the database cannot be reached then, checked again on each
    request until it can (the function answers 503 meanwhile).
    """

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._checked = False
        try:
            check_schema(engine)
            self._checked = True
        except DatabaseUnavailable:
            log.warning("database unreachable at start-up; its schema is checked on the first request")

    async def ready(self) -> None:
        if not self._checked:
            await asyncio.to_thread(check_schema, self.engine)
            self._checked = True


def run_transaction(engine: Engine, work: Callable[[Connection], T], attempts: int = 4) -> T:
    """Run ``work`` in one transaction, again from the start when the engine reports a deadlock.

    ``work`` gets a Core connection, not an ORM session: every transaction runs Core statements,
    and a session's set-up and bookkeeping cost about 0.2 ms of CPU per transaction for nothing.
    ``work`` must be safe to repeat: nothing it did in a failed attempt is kept. A database that
    cannot be reached raises :class:`DatabaseUnavailable`.
    """
    for attempt in range(1, attempts + 1):
        try:
            with unavailable_as_503(), engine.begin() as connection:
                return work(connection)
        except OperationalError as exc:
            if not _is_retryable(exc):
                raise
            if attempt == attempts:
                # Still deadlocking: answer "try again later" rather than fail the request.
                raise DatabaseUnavailable("lock contention") from exc
            log.info("transaction conflict, retrying", extra={"attempt": attempt})
            time.sleep(0.01 * attempt)
    raise AssertionError("unreachable")


def insert_ignore(connection: Connection, model: type):
    """An INSERT for ``model`` that leaves rows whose key already exists alone, in the dialect of
    the connection (SQLite's ON CONFLICT DO NOTHING, MySQL's INSERT IGNORE)."""
    return _insert_ignore(connection.dialect.name, model)


@functools.cache
def _insert_ignore(dialect: str, model: type):
    """Built once per dialect and table: statements are immutable, and building one (and its
    cache key) for every claim cost more CPU than the rows it inserts."""
    if dialect == "sqlite":
        return sqlite.insert(model).on_conflict_do_nothing()
    return mysql.insert(model).prefix_with("IGNORE")


def _is_retryable(exc: OperationalError) -> bool:
    code = exc.orig.args[0] if exc.orig is not None and exc.orig.args else None
    return code in _RETRYABLE_MYSQL_ERRORS or "database is locked" in str(exc.orig)


def _is_connection_error(exc: DBAPIError) -> bool:
    if exc.connection_invalidated:
        return True
    code = exc.orig.args[0] if exc.orig is not None and exc.orig.args else None
    # PyMySQL: 2003 can't connect, 2006 gone away, 2013 lost connection; 1045 access denied
    # and 1049 unknown database are configuration errors, but equally leave us unable to serve.
    return code in (2003, 2006, 2013, 1045, 1049) or "unable to open database" in str(exc.orig)
