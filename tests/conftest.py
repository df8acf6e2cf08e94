"""Fixtures shared by the whole suite: both database engines, access tokens, function clients,
and the fake provider servers.

Every storage test runs on SQLite and on MariaDB: on the server ``PUSH_TEST_MARIADB_URL`` names
(default ``mysql+pymysql://root@127.0.0.1:3306/test``), in a database the run creates for itself
(``push_test_<start time>_<pid>_<random>``) and drops when it ends. Without MariaDB the MariaDB
half is skipped locally, and fails when ``CI=true``: CI must never pass by skipping it.
"""
from __future__ import annotations

import os
import secrets
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from functions_framework.aio import create_asgi_app
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from fakes.apns import FakeApns
from fakes.fcm import FakeFcm
from fakes.server import Network
from fakes.sink import FakeSink
from fakes.webpush import FakeWebPushService
from shared.cli import main as pushctl
from shared.db import get_engine
from shared.models import Base
from tests.connect_proxy import connect_proxy  # noqa: F401 - a fixture for the whole suite

REPO = Path(__file__).resolve().parent.parent
# Functions start a metrics server; in tests, on a free port of its own.
os.environ["PUSH_METRICS_PORT"] = "0"
os.environ["PUSH_METRICS_ADDR"] = "127.0.0.1"
#: The MariaDB server the MariaDB half of the suite uses; its database part is ignored.
MARIADB_SERVER_URL = os.environ.get("PUSH_TEST_MARIADB_URL", "mysql+pymysql://root@127.0.0.1:3306/test")
#: Each run (each xdist worker) works in a database of its own, made on that server and dropped
#: at the end: two runs on one server never see each other's rows.
MARIADB_DATABASE = f"push_test_{int(time.time())}_{os.getpid()}_{secrets.token_hex(3)}"
MARIADB_URL = make_url(MARIADB_SERVER_URL).set(database=MARIADB_DATABASE).render_as_string(
    hide_password=False
)
#: A run's database left by a run that was killed is dropped by a later run once this old.
STALE_DATABASE_SECONDS = 24 * 3600
IN_CI = os.environ.get("CI", "").lower() == "true"

_mariadb_ready: bool | None = None


@pytest.fixture(autouse=True)
def _restore_sys_path() -> Iterator[None]:
    """functions-framework appends a function's folder to ``sys.path`` each time it loads it.
    Hundreds of loads in one session make every failed import (httpx's ASGI transport tries one
    per request) scan hundreds of folders, which slowed the load test tenfold at the end of the
    suite; each test starts from the same path."""
    saved = list(sys.path)
    yield
    sys.path[:] = saved


def _server_engine():
    server = make_url(MARIADB_SERVER_URL).set(database=None)
    return create_engine(server, connect_args={"connect_timeout": 3})


def _prepare_mariadb() -> None:
    """Create this run's database (dropping those that killed runs left a day ago or more),
    then migrate it, once per session."""
    global _mariadb_ready
    if _mariadb_ready is None:
        engine = _server_engine()
        try:
            with engine.begin() as connection:
                for (name,) in connection.execute(text("SHOW DATABASES LIKE 'push\\_test\\_%'")):
                    started = name.split("_")[2]
                    if started.isdigit() and time.time() - int(started) > STALE_DATABASE_SECONDS:
                        connection.execute(text(f"DROP DATABASE IF EXISTS `{name}`"))
                connection.execute(text(f"CREATE DATABASE `{MARIADB_DATABASE}` CHARACTER SET utf8mb4"))
            _mariadb_ready = True
        except Exception as exc:  # noqa: BLE001 - any failure means "no MariaDB here"
            _mariadb_ready = False
            message = f"MariaDB at {MARIADB_SERVER_URL} is unreachable: {exc}"
            if IN_CI:
                pytest.fail(message + " (CI=true: MariaDB tests must run)", pytrace=False)
            pytest.skip(message)
        finally:
            engine.dispose()
        _migrate(MARIADB_URL)
    elif not _mariadb_ready:
        if IN_CI:
            pytest.fail(f"MariaDB at {MARIADB_SERVER_URL} is unreachable (CI=true)", pytrace=False)
        pytest.skip(f"MariaDB at {MARIADB_SERVER_URL} is unreachable")


def pytest_sessionfinish(session, exitstatus) -> None:
    """Drop this run's database, if it made one."""
    if not _mariadb_ready:
        return
    get_engine(MARIADB_URL).dispose()
    engine = _server_engine()
    try:
        with engine.begin() as connection:
            connection.execute(text(f"DROP DATABASE IF EXISTS `{MARIADB_DATABASE}`"))
    finally:
        engine.dispose()


def _migrate(url: str) -> None:
    previous = os.environ.get("PUSH_DATABASE_URL")
    os.environ["PUSH_DATABASE_URL"] = url
    try:
        assert pushctl(["migrate"]) == 0
    finally:
        if previous is None:
            del os.environ["PUSH_DATABASE_URL"]
        else:
            os.environ["PUSH_DATABASE_URL"] = previous


def empty_tables(url: str) -> None:
    with get_engine(url).begin() as connection:
        for table in reversed(Base.metadata.sorted_tables):
            connection.execute(table.delete())


def fresh_database(kind: str, folder: Path) -> str:
    """The URL of a migrated, empty database: a new SQLite file in ``folder``, or this run's
    MariaDB database emptied (``kind`` is ``sqlite`` or ``mariadb``)."""
    if kind == "sqlite":
        url = f"sqlite:///{folder / 'push.sqlite3'}"
        _migrate(url)
        return url
    _prepare_mariadb()
    empty_tables(MARIADB_URL)
    return MARIADB_URL


@pytest.fixture(params=["sqlite", "mariadb"])
def database_url(request, tmp_path, monkeypatch) -> Iterator[str]:
    """A migrated, empty database on each engine, set as PUSH_DATABASE_URL."""
    url = fresh_database(request.param, tmp_path)
    monkeypatch.setenv("PUSH_DATABASE_URL", url)
    yield url
    if request.param == "sqlite":
        get_engine(url).dispose()


@pytest.fixture
def engine(database_url):
    return get_engine(database_url)


# --- access tokens -------------------------------------------------------------------------


class TokenIssuer:
    """Stands in for the wiki's OAuth server: signs access tokens with a key the test made."""

    def __init__(self) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.public_pem = (
            self.key.public_key()
            .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
            .decode()
        )

    def token(self, user: str, lifetime: int = 600, **claims: object) -> str:
        now = int(time.time())
        body = {"sub": user, "iat": now, "exp": now + lifetime, **claims}
        return jwt.encode({k: v for k, v in body.items() if v is not None}, self.key, "ES256")

    def headers(self, user: str, **claims: object) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token(user, **claims)}"}


@pytest.fixture(scope="session")
def issuer() -> TokenIssuer:
    return TokenIssuer()


@pytest.fixture
def auth_env(issuer, monkeypatch) -> TokenIssuer:
    monkeypatch.setenv("PUSH_AUTH_PUBLIC_KEY", issuer.public_pem)
    return issuer


# --- functions over HTTP -------------------------------------------------------------------

FunctionClient = Callable[[str], httpx.AsyncClient]


@pytest.fixture
async def function_client(database_url) -> AsyncIterator[FunctionClient]:
    """Start a function as functions-framework would (its ASGI app, from its source file, with
    the environment as set by the test) and return an HTTP client for it."""
    clients: list[httpx.AsyncClient] = []
    modules = []

    def start(name: str) -> httpx.AsyncClient:
        app = create_asgi_app(
            target=name.replace("-", "_"), source=str(REPO / "functions" / name / "main.py")
        )
        modules.append(sys.modules["main"])  # where functions-framework put the loaded source
        client = httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://function")
        clients.append(client)
        return client

    yield start
    for client in clients:
        await client.aclose()
    for module in modules:
        if hasattr(module, "dispatcher"):
            await module.dispatcher.aclose()


# --- the fake providers -----------------------------------------------------------------------

RECYCLE_AFTER = 25
"""Streams after which every fake provider recycles a connection (graceful GOAWAY, then the final
one, then close), as real front ends do every ~1,000: the suite runs with recycling on, often
enough that most tests see it."""


@pytest.fixture
def apns_server() -> Iterator[FakeApns]:
    """A fresh fake APNs server per test (starting one takes a few milliseconds), raising its
    stream limit from 1 after the first request, as Apple does."""
    with FakeApns(network=Network(max_concurrent_streams=1, recycle_after=RECYCLE_AFTER)) as fake:
        yield fake


@pytest.fixture
def fcm_server() -> Iterator[FakeFcm]:
    """A fresh fake FCM server per test (function scope: nothing scripted, recorded, counted or
    issued in one test is seen by another). The CA and the service-account keys are made once
    per process."""
    with FakeFcm(network=Network(recycle_after=RECYCLE_AFTER)) as fake:
        yield fake


@pytest.fixture
def webpush_server() -> Iterator[FakeWebPushService]:
    """A started fake push service, fresh for each test. Its CA PEM is at
    ``webpush_server.ca_file``; subscriptions come from ``webpush_server.subscribe()``."""
    with FakeWebPushService(network=Network(recycle_after=RECYCLE_AFTER)) as service:
        yield service


@pytest.fixture
def sink() -> Iterator[FakeSink]:
    fake = FakeSink()
    yield fake
    fake.stop()


# --- dispatchers against the fake providers -------------------------------------------------


@pytest.fixture(params=["fcm", "apns", "webpush"])
def rig(request, tmp_path, monkeypatch):
    """A provider rig (see tests/rigs.py) with its fake server started and configured."""
    from tests.rigs import RIGS

    rig_class, fixture = RIGS[request.param]
    rig = rig_class(request.getfixturevalue(fixture), tmp_path)
    rig.configure(monkeypatch)
    return rig


@pytest.fixture
def webpush_rig(webpush_server, tmp_path, monkeypatch):
    """The Web Push rig alone, for tests that need one dispatcher but not every provider."""
    from tests.rigs import WebPushRig

    rig = WebPushRig(webpush_server, tmp_path)
    rig.configure(monkeypatch)
    return rig


@pytest.fixture(scope="session")
def mariadb_scratch_url() -> Iterator[str]:
    """A second, empty database of this run on the MariaDB server, for tables that are not ours
    (Echo's, which ``pushctl import-echo`` reads); dropped when the run ends. Its name starts with
    the run's, so a killed run's is dropped a day later like the run's own."""
    _prepare_mariadb()
    name = f"{MARIADB_DATABASE}_scratch"
    engine = _server_engine()
    try:
        with engine.begin() as connection:
            connection.execute(text(f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4"))
        yield make_url(MARIADB_SERVER_URL).set(database=name).render_as_string(hide_password=False)
        with engine.begin() as connection:
            connection.execute(text(f"DROP DATABASE IF EXISTS `{name}`"))
    finally:
        engine.dispose()
