"""Migrations, and functions that refuse a database whose schema is behind."""
from __future__ import annotations

import httpx
import pytest
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from functions_framework.aio import create_asgi_app
from sqlalchemy import text

from shared.db import SCHEMA_REVISION, SchemaBehind, get_engine
from shared.models import Base
from tests.conftest import REPO


def test_schema_revision_is_the_newest_migration():
    config = Config()
    config.set_main_option("script_location", str(REPO / "shared" / "migrations"))
    assert ScriptDirectory.from_config(config).get_current_head() == SCHEMA_REVISION


def test_migration_revisions_are_numbered_in_order():
    # check_schema tells a newer schema from an older one by these numbers.
    config = Config()
    config.set_main_option("script_location", str(REPO / "shared" / "migrations"))
    revisions = [script.revision for script in ScriptDirectory.from_config(config).walk_revisions()]
    assert list(reversed(revisions)) == [f"{n:04d}" for n in range(1, len(revisions) + 1)]


@pytest.fixture
def recorded_revision(database_url):
    """Sets the revision the database says it is at; puts the real one back afterwards (the
    MariaDB database is migrated once for the whole session)."""

    def set_revision(revision: str) -> None:
        with get_engine(database_url).begin() as connection:
            connection.execute(text("UPDATE alembic_version SET version_num = :r"), {"r": revision})

    yield set_revision
    set_revision(SCHEMA_REVISION)


def test_function_serves_a_database_migrated_for_the_next_release(recorded_revision, auth_env):
    # A rollout migrates first; the previous release's replicas keep starting meanwhile.
    recorded_revision(f"{int(SCHEMA_REVISION) + 1:04d}")
    create_asgi_app(target="subscribe", source=str(REPO / "functions" / "subscribe" / "main.py"))


def test_function_refuses_to_start_on_a_database_one_migration_behind(recorded_revision, auth_env):
    recorded_revision(f"{int(SCHEMA_REVISION) - 1:04d}")
    with pytest.raises(SchemaBehind, match="pushctl migrate"):
        create_asgi_app(target="subscribe", source=str(REPO / "functions" / "subscribe" / "main.py"))


def test_migrations_create_exactly_the_models(engine):
    with engine.connect() as connection:
        differences = compare_metadata(MigrationContext.configure(connection), Base.metadata)
    assert differences == []


def test_migrate_twice_changes_nothing(database_url):
    from shared.cli import main as pushctl

    assert pushctl(["migrate"]) == 0
    assert pushctl(["migrate"]) == 0


@pytest.mark.parametrize("function", ["subscribe", "unsubscribe"])
def test_function_refuses_to_start_on_an_unmigrated_database(function, tmp_path, monkeypatch, auth_env):
    monkeypatch.setenv("PUSH_DATABASE_URL", f"sqlite:///{tmp_path / 'empty.sqlite3'}")
    with pytest.raises(SchemaBehind, match="pushctl migrate"):
        create_asgi_app(target=function, source=str(REPO / "functions" / function / "main.py"))
    get_engine(f"sqlite:///{tmp_path / 'empty.sqlite3'}").dispose()


async def test_health_answers_without_a_token(function_client, auth_env):
    client = function_client("subscribe")
    assert (await client.get("/_/health")).json() == {"status": "ok"}
    assert (await client.get("/_/ready")).json() == {"status": "ready"}


async def test_unreachable_database_answers_503_with_retry_after(monkeypatch, auth_env, issuer):
    monkeypatch.setenv("PUSH_DATABASE_URL", "mysql+pymysql://root@127.0.0.1:9/test")
    app = create_asgi_app(target="subscribe", source=str(REPO / "functions" / "subscribe" / "main.py"))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://f") as client:
        response = await client.get("/", headers=issuer.headers("42"))
    assert response.status_code == 503
    assert response.headers["retry-after"] == "5"
    assert response.json()["error"]["code"] == "database_unavailable"
