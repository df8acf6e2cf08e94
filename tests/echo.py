"""Echo's push subscription tables, built as Echo builds them on MySQL/MariaDB, and rows in them:
for the import tests and the import benchmark.

The column types are Echo's (its schema file for MySQL): the token and the provider and topic
names are binary (BLOB, TINYBLOB), the time a TIMESTAMP, the ids unsigned integers. The tables'
default character set is binary, as Wikimedia's wikis create theirs: ``CHAR(64)`` is then
``BINARY(64)``, and the driver hands the token's hash over as bytes.
"""
from __future__ import annotations

import hashlib
import random
import string
from collections.abc import Iterator
from datetime import datetime, timedelta

from sqlalchemy import Engine, text

TABLES = (
    """
    CREATE TABLE echo_push_provider (
      epp_id TINYINT UNSIGNED AUTO_INCREMENT NOT NULL,
      epp_name TINYBLOB NOT NULL,
      PRIMARY KEY (epp_id)
    ) ENGINE=InnoDB DEFAULT CHARSET=binary
    """,
    """
    CREATE TABLE echo_push_subscription (
      eps_id INT UNSIGNED AUTO_INCREMENT NOT NULL,
      eps_user INT UNSIGNED NOT NULL,
      eps_token BLOB NOT NULL,
      eps_token_sha256 CHAR(64) NOT NULL,
      eps_provider TINYINT UNSIGNED NOT NULL,
      eps_updated TIMESTAMP NOT NULL,
      eps_data BLOB DEFAULT NULL,
      eps_topic TINYINT UNSIGNED DEFAULT NULL,
      UNIQUE INDEX eps_token_sha256 (eps_token_sha256),
      INDEX eps_provider (eps_provider),
      INDEX eps_topic (eps_topic),
      INDEX eps_user (eps_user),
      INDEX eps_token (eps_token(10)),
      PRIMARY KEY (eps_id)
    ) ENGINE=InnoDB DEFAULT CHARSET=binary
    """,
    """
    CREATE TABLE echo_push_topic (
      ept_id TINYINT UNSIGNED AUTO_INCREMENT NOT NULL,
      ept_text TINYBLOB NOT NULL,
      PRIMARY KEY (ept_id)
    ) ENGINE=InnoDB DEFAULT CHARSET=binary
    """,
)
NAMES = ("echo_push_subscription", "echo_push_provider", "echo_push_topic")


def create_tables(engine: Engine) -> None:
    with engine.begin() as connection:
        for name in NAMES:
            connection.execute(text(f"DROP TABLE IF EXISTS {name}"))
        for statement in TABLES:
            connection.execute(text(statement))


def empty_tables(engine: Engine) -> None:
    with engine.begin() as connection:
        for name in NAMES:
            connection.execute(text(f"TRUNCATE TABLE {name}"))


class Echo:
    """Rows in Echo's tables, written as Echo writes them (name rows made on first use, the
    token's hash from its bytes), with ways to write what Echo would not."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._ids: dict[tuple[str, bytes], int] = {}

    def clear(self) -> None:
        """Empty the tables (and forget the name rows made)."""
        empty_tables(self.engine)
        self._ids.clear()

    def provider(self, name: str) -> int:
        return self._name_id("echo_push_provider", "epp", name)

    def topic(self, name: str) -> int:
        return self._name_id("echo_push_topic", "ept", name)

    def _name_id(self, table: str, prefix: str, name: str) -> int:
        key = (table, name.encode())
        if key not in self._ids:
            column = "epp_name" if prefix == "epp" else "ept_text"
            with self.engine.begin() as connection:
                found = connection.execute(
                    text(f"SELECT {prefix}_id FROM {table} WHERE {column} = :name"), {"name": key[1]}
                ).scalar()
                if found is None:
                    found = connection.execute(
                        text(f"INSERT INTO {table} ({column}) VALUES (:name)"), {"name": key[1]}
                    ).lastrowid
            self._ids[key] = found
        return self._ids[key]

    def add(
        self,
        user: int,
        token: str | bytes,
        provider: str | int = "fcm",
        topic: str | int | None = None,
        updated: datetime | str = datetime(2024, 1, 2, 3, 4, 5),
        sha256: str | None = None,
    ) -> int:
        """Insert one subscription; its eps_id. ``provider`` and ``topic`` are names (their rows
        made when missing) or raw ids; ``updated`` is UTC, or text written as it is."""
        raw = token.encode() if isinstance(token, str) else token
        row = {
            "user": user,
            "token": raw,
            "sha": sha256 if sha256 is not None else hashlib.sha256(raw).hexdigest(),
            "provider": self.provider(provider) if isinstance(provider, str) else provider,
            "topic": self.topic(topic) if isinstance(topic, str) else topic,
            "updated": updated,
        }
        with self.engine.begin() as connection:
            connection.exec_driver_sql("SET SESSION time_zone = '+00:00', sql_mode = ''")
            return connection.execute(
                text(
                    "INSERT INTO echo_push_subscription (eps_user, eps_token, eps_token_sha256, "
                    "eps_provider, eps_updated, eps_data, eps_topic) "
                    "VALUES (:user, :token, :sha, :provider, :updated, NULL, :topic)"
                ),
                row,
            ).lastrowid


# --- realistic rows, many ---------------------------------------------------------------------

TOPICS = ("org.wikimedia.wikipedia", "org.wikimedia.wikipedia.beta", "org.wikimedia.commons")
_FCM_ALPHABET = string.ascii_letters + string.digits + "-_"


def fcm_token(rng: random.Random) -> str:
    """The shape of an FCM registration token: an instance id, a colon, then APA91b and base64url
    (163 characters in all, as Android apps get today)."""
    instance = "".join(rng.choices(_FCM_ALPHABET, k=22))
    return instance + ":APA91b" + "".join(rng.choices(_FCM_ALPHABET, k=134))


def apns_token(rng: random.Random) -> str:
    return rng.randbytes(32).hex()


def realistic_rows(count: int, seed: int = 1, start: datetime = datetime(2020, 6, 1)) -> Iterator[tuple]:
    """``count`` rows as Echo holds them: 70% FCM, 30% APNs over three app topics, about one
    device per 1.6 users (central user ids up to eight digits), created over three years.
    Each is (eps_user, eps_token, eps_token_sha256, provider name, eps_updated, topic name)."""
    rng = random.Random(seed)
    users = max(count * 10 // 16, 1)
    span = int(timedelta(days=3 * 365).total_seconds())
    for _ in range(count):
        if rng.random() < 0.7:
            token, provider, topic = fcm_token(rng), "fcm", None
        else:
            token, provider, topic = apns_token(rng), "apns", rng.choice(TOPICS)
        raw = token.encode()
        updated = start + timedelta(seconds=rng.randrange(span))
        yield rng.randrange(1, users + 1) * 37, raw, hashlib.sha256(raw).hexdigest(), provider, updated, topic


def fill(engine: Engine, rows: Iterator[tuple], chunk: int = 5000) -> int:
    """Bulk-insert ``realistic_rows`` into Echo's tables (multi-row INSERTs); how many."""
    echo = Echo(engine)
    providers = {name: echo.provider(name) for name in ("fcm", "apns")}
    topics = {name: echo.topic(name) for name in TOPICS}
    statement = text(
        "INSERT INTO echo_push_subscription (eps_user, eps_token, eps_token_sha256, eps_provider, "
        "eps_updated, eps_data, eps_topic) VALUES (:user, :token, :sha, :provider, :updated, NULL, :topic)"
    )
    total = 0
    batch: list[dict] = []
    with engine.connect() as connection:
        connection.exec_driver_sql("SET SESSION time_zone = '+00:00'")
        for user, token, sha, provider, updated, topic in rows:
            batch.append({
                "user": user, "token": token, "sha": sha, "provider": providers[provider],
                "updated": updated, "topic": topics[topic] if topic else None,
            })
            if len(batch) == chunk:
                connection.execute(statement, batch)
                connection.commit()
                total += len(batch)
                batch = []
        if batch:
            connection.execute(statement, batch)
            connection.commit()
            total += len(batch)
    return total
