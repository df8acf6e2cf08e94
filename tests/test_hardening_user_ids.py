"""A user id is exactly one user (issue 14): MariaDB compared user ids with PAD SPACE, so a token
naming ``"victim "`` listed and deleted victim's devices. A token's ``sub`` with blanks around it
or control characters in it is refused, and on both engines ``"123"`` and ``"123 "`` never reach
each other's rows: not through the store (rows from before the rule), the rate limiter or events.
"""
from __future__ import annotations

from datetime import datetime

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from shared.ratelimits import RateLimiter
from shared.settings import Limit
from shared.subscriptions import NewSubscription, SubscriptionStore
from tests import events
from tests import subscription_bodies as bodies
from tests.conftest import MARIADB_SERVER_URL, REPO, _migrate, _prepare_mariadb
from tests.stores import subscribe

USER, PADDED = "123", "123 "


# --- tokens -------------------------------------------------------------------------------------

NOT_A_USER_ID = {
    "trailing_blank": "123 ", "leading_blank": " 123", "trailing_tab": "123\t", "trailing_newline": "123\n",
    "nul_inside": "12\x003", "delete_inside": "12\x7f3", "escape_inside": "\x1b[2J123",
    "no_break_space": "123\u00a0", "zero_width_space": "\u200b123", "line_separator": "123\u2028",
    "only_blanks": "   ",
}


@pytest.mark.parametrize("function", ["subscribe", "unsubscribe"])
@pytest.mark.parametrize("sub", NOT_A_USER_ID.values(), ids=NOT_A_USER_ID.keys())
async def test_a_token_naming_a_user_id_with_blanks_around_or_control_characters_is_refused(
    function_client, auth_env, engine, function, sub
):
    store = SubscriptionStore(engine)
    subscribe(store, sub.strip() or USER, NewSubscription("fcm", "victim-token", "victim-token"))
    client = function_client(function)
    response = await client.post("/", json={"all": True} if function == "unsubscribe" else bodies.fcm(),
                                 headers=auth_env.headers(sub))
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "invalid_token"
    assert [row.token for row in store.list_for_user(sub.strip() or USER)] == ["victim-token"]


async def test_a_user_id_with_a_blank_inside_is_a_user_id(function_client, auth_env):
    subscribe = function_client("subscribe")
    assert (await subscribe.get("/", headers=auth_env.headers("mw 123"))).status_code == 200


# --- the store: rows of both ids ------------------------------------------------------------


@pytest.fixture
def both(engine) -> tuple[SubscriptionStore, dict[str, NewSubscription]]:
    """A device each for "123" and for "123 " (a row written before tokens were checked)."""
    store = SubscriptionStore(engine)
    devices = {user: NewSubscription("fcm", f"token-of-{user!r}", f"token-of-{user!r}") for user in (USER, PADDED)}
    for user, device in devices.items():
        subscribe(store, user, device)
    return store, devices


def tokens(store: SubscriptionStore, user: str) -> list[str]:
    return [row.token for row in store.list_for_user(user)]


def test_each_id_lists_only_its_own_devices(both):
    store, devices = both
    assert tokens(store, USER) == [devices[USER].token]
    assert tokens(store, PADDED) == [devices[PADDED].token]


def test_deleting_the_other_ids_device_deletes_nothing(both):
    store, devices = both
    assert store.unsubscribe(USER, devices[PADDED].identity) == 0
    assert store.unsubscribe(PADDED, devices[USER].identity) == 0
    assert tokens(store, USER) == [devices[USER].token] and tokens(store, PADDED) == [devices[PADDED].token]


def test_deleting_all_of_one_id_leaves_the_other(both):
    store, devices = both
    assert store.unsubscribe_all(USER) == 1
    assert tokens(store, USER) == [] and tokens(store, PADDED) == [devices[PADDED].token]


def test_refreshing_a_device_keeps_the_other_ids_rows_apart(both):
    """A refresh locks and counts the caller's rows: the other id's are not among them."""
    store, devices = both
    refreshed = subscribe(store, USER, devices[USER])
    assert refreshed.created is False and refreshed.evicted == 0
    assert tokens(store, PADDED) == [devices[PADDED].token]


def test_taking_the_other_ids_device_is_a_move_to_a_new_row(both):
    """As between any two users: a new row, nothing of the old one shown."""
    store, devices = both
    before = store.list_for_user(PADDED)[0]
    moved = subscribe(store, USER, devices[PADDED])
    assert moved.created is True and moved.subscription.id != before.id
    assert tokens(store, PADDED) == []
    assert sorted(tokens(store, USER)) == sorted([devices[USER].token, devices[PADDED].token])


def test_the_cap_counts_only_the_callers_own_devices(engine):
    store = SubscriptionStore(engine, cap=1)
    subscribe(store, PADDED, NewSubscription("fcm", "padded", "padded"))
    assert subscribe(store, USER, NewSubscription("fcm", "mine", "mine")).evicted == 0
    assert tokens(store, PADDED) == ["padded"]


def test_each_id_has_its_own_rate_limit(engine):
    limiter, limit, at = RateLimiter(engine), Limit(1, 3600), datetime(2026, 12, 5, 12)
    assert limiter.hit([f"subscribe\n{PADDED}"], limit, at) == [True]
    assert limiter.hit([f"subscribe\n{USER}"], limit, at) == [True]
    assert limiter.hit([f"subscribe\n{USER}"], limit, at) == [False]


# --- events ---------------------------------------------------------------------------------


async def test_an_event_for_one_id_never_wakes_the_others_devices(webpush_rig, function_client, engine):
    mine, padded = webpush_rig.add(engine, USER), webpush_rig.add(engine, PADDED)
    dispatch = function_client("dispatch-webpush")

    assert (await dispatch.post("/", **events.notification([PADDED]))).status_code == 202
    assert webpush_rig.wakeups(mine) == [] and webpush_rig.wakeups(padded) == ["checkEchoV1"]
    assert (await dispatch.post("/", **events.notification([USER]))).status_code == 202
    assert webpush_rig.wakeups(mine) == ["checkEchoV1"] and webpush_rig.wakeups(padded) == ["checkEchoV1"]


# --- the migration (MariaDB) ----------------------------------------------------------------


@pytest.fixture
def fresh_mariadb():
    """A MariaDB database of this test's own, dropped after it."""
    _prepare_mariadb()
    from tests.conftest import MARIADB_DATABASE

    name = f"{MARIADB_DATABASE}_migration"
    server = create_engine(make_url(MARIADB_SERVER_URL).set(database=None))
    with server.begin() as connection:
        connection.execute(text(f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4"))
    url = make_url(MARIADB_SERVER_URL).set(database=name).render_as_string(hide_password=False)
    try:
        yield url
    finally:
        with server.begin() as connection:
            connection.execute(text(f"DROP DATABASE IF EXISTS `{name}`"))
        server.dispose()


def user_id_collation(url: str) -> str:
    engine = create_engine(url)
    try:
        with engine.connect() as connection:
            return connection.execute(text(
                "SELECT COLLATION_NAME FROM information_schema.COLUMNS WHERE TABLE_SCHEMA = DATABASE() "
                "AND TABLE_NAME = 'subscriptions' AND COLUMN_NAME = 'user_id'"
            )).scalar_one()
    finally:
        engine.dispose()


def padded_matches(url: str) -> int:
    """How many rows of user "123" a query for "123 " finds."""
    engine = create_engine(url)
    try:
        with engine.begin() as connection:
            connection.execute(text("DELETE FROM subscriptions"))
            connection.execute(text(
                "INSERT INTO subscriptions (user_id, provider, token, token_sha256, created_at, updated_at) "
                "VALUES ('123', 'fcm', 't', :digest, NOW(6), NOW(6))"), {"digest": "a" * 64})
            return connection.execute(
                text("SELECT COUNT(*) FROM subscriptions WHERE user_id = :user"), {"user": PADDED}
            ).scalar_one()
    finally:
        engine.dispose()


def migrate_to(url: str, revision: str) -> None:
    """Up or down to ``revision``, as ``pushctl migrate`` runs migrations."""
    from alembic import command
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(REPO / "shared" / "migrations"))
    engine = create_engine(url)
    try:
        with engine.begin() as connection:
            config.attributes["connection"] = connection
            if revision == "head":
                command.upgrade(config, revision)
            else:
                command.downgrade(config, revision)
    finally:
        engine.dispose()


def test_migration_0005_makes_user_ids_compare_exactly_and_its_downgrade_undoes_it(fresh_mariadb):
    _migrate(fresh_mariadb)
    assert user_id_collation(fresh_mariadb) == "utf8mb4_nopad_bin"
    assert padded_matches(fresh_mariadb) == 0

    migrate_to(fresh_mariadb, "0004")
    assert user_id_collation(fresh_mariadb) == "utf8mb4_bin"
    assert padded_matches(fresh_mariadb) == 1  # what the probe found: PAD SPACE

    migrate_to(fresh_mariadb, "head")
    assert user_id_collation(fresh_mariadb) == "utf8mb4_nopad_bin"
    assert padded_matches(fresh_mariadb) == 0

