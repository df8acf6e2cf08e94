"""Limits: body size, users per event, tokens per Echo request, subscriptions per user, header
count and size, subscribe rate. Each is answered with its status before any work is done: no
database statement, no provider request, the body not read past the limit."""
from __future__ import annotations

import contextlib
import time

import pytest
from sqlalchemy import event, func, select
from sqlalchemy.orm import Session

from shared.http import MAX_HEADER_BYTES, MAX_HEADERS
from shared.models import RateCounter, Subscription
from tests import events
from tests import subscription_bodies as bodies
from tests.rigs import FcmRig


@contextlib.contextmanager
def statements(engine):
    """The SQL statements the engine runs inside the block."""
    seen: list[str] = []

    def record(conn, cursor, statement, *args):
        seen.append(statement)

    event.listen(engine, "before_cursor_execute", record)
    try:
        yield seen
    finally:
        event.remove(engine, "before_cursor_execute", record)


def count(engine, model=Subscription) -> int:
    with Session(engine) as session:
        return session.scalar(select(func.count()).select_from(model))


class Body:
    """A request body that counts how much of it the function pulled."""

    def __init__(self, chunk: bytes, chunks: int) -> None:
        self.chunk, self.chunks, self.pulled = chunk, chunks, 0

    async def __aiter__(self):
        for _ in range(self.chunks):
            self.pulled += 1
            yield self.chunk


@pytest.fixture
def fcm(fcm_server, tmp_path, monkeypatch):
    rig = FcmRig(fcm_server, tmp_path)
    rig.configure(monkeypatch)
    return rig


# --- bodies -------------------------------------------------------------------------------


async def test_subscribe_body_declared_over_16_kib_is_refused_unread_and_untouched(
    function_client, auth_env, engine
):
    subscribe = function_client("subscribe")
    body = Body(b"x" * 4096, 1000)
    with statements(engine) as sql:
        response = await subscribe.post(
            "/", content=body,
            headers={**auth_env.headers("42"), "Content-Type": "application/json", "Content-Length": str(4096 * 1000)},
        )
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "body_too_large"
    assert body.pulled == 0 and sql == []


async def test_subscribe_body_streamed_past_16_kib_stops_being_read(function_client, auth_env, engine):
    subscribe = function_client("subscribe")
    body = Body(b"x" * 4096, 1000)  # chunked: no length declared
    with statements(engine) as sql:
        response = await subscribe.post(
            "/", content=body, headers={**auth_env.headers("42"), "Content-Type": "application/json"}
        )
    assert response.status_code == 413
    assert body.pulled <= 5  # 16 KiB and one chunk more, not 4 MB
    assert sql == [] and count(engine) == 0


async def test_event_over_256_kib_is_refused_before_any_database_or_provider_work(function_client, fcm, engine):
    dispatch = function_client("dispatch-fcm")
    posted = events.notification(["alice"])
    body = Body(b"a" * 65536, 100)
    with statements(engine) as sql:
        response = await dispatch.post("/", content=body, headers=posted["headers"])
    assert response.status_code == 413
    assert body.pulled <= 5 and sql == [] and fcm.fake.requests == []


# --- users, tokens and subscriptions ----------------------------------------------------------


async def test_event_over_the_users_limit_answers_422_before_any_database_work(function_client, fcm, engine, monkeypatch):
    monkeypatch.setenv("PUSH_MAX_USERS_PER_EVENT", "100")
    dispatch = function_client("dispatch-fcm")
    fcm.add(engine, "u1")
    with statements(engine) as sql:
        response = await dispatch.post("/", **events.notification([f"u{i}" for i in range(101)]))
    assert response.status_code == 422
    assert response.json()["error"]["field"] == "users"
    assert sql == [] and fcm.fake.requests == []
    exactly = await dispatch.post("/", **events.notification([f"u{i}" for i in range(100)]))
    assert exactly.status_code == 202


async def test_echo_request_over_the_token_limit_answers_400_before_any_work(function_client, fcm, engine, monkeypatch):
    monkeypatch.setenv("PUSH_MAX_USERS_PER_EVENT", "10")
    dispatch = function_client("dispatch-fcm")
    body = {"deviceTokens": [f"t{i}" for i in range(11)], "messageType": "checkEchoV1"}
    with statements(engine) as sql:
        response = await dispatch.post("/v1/message/fcm", json=body)
    assert response.status_code == 400
    assert response.json()["error"]["field"] == "deviceTokens"
    assert sql == [] and fcm.fake.requests == []


async def test_subscriptions_per_user_never_exceed_the_cap(function_client, auth_env, engine, monkeypatch):
    monkeypatch.setenv("PUSH_MAX_SUBSCRIPTIONS_PER_USER", "3")
    subscribe = function_client("subscribe")
    for _ in range(6):
        response = await subscribe.post("/", json=bodies.fcm(), headers=auth_env.headers("42"))
        assert response.status_code == 201
        assert count(engine) <= 3
    listed = (await subscribe.get("/", headers=auth_env.headers("42"))).json()["subscriptions"]
    assert len(listed) == 3


# --- headers ------------------------------------------------------------------------------


@pytest.mark.parametrize("function", ["subscribe", "dispatch-fcm"])
async def test_too_many_header_fields_answer_431_before_any_work(function, function_client, auth_env, fcm, engine):
    client = function_client(function)
    headers = [(f"x-filler-{i}", "1") for i in range(MAX_HEADERS + 1)]
    headers += list(auth_env.headers("42").items()) + [("content-type", "application/json")]
    with statements(engine) as sql:
        response = await client.post("/", content=b"{}", headers=headers)
    assert response.status_code == 431
    assert response.json()["error"]["code"] == "headers_too_large"
    assert sql == []


@pytest.mark.parametrize("function", ["subscribe", "unsubscribe"])
async def test_huge_authorization_header_answers_431_without_checking_it(function, function_client, auth_env, engine):
    client = function_client(function)
    headers = {"Authorization": "Bearer " + "a" * (MAX_HEADER_BYTES + 1), "Content-Type": "application/json"}
    started = time.perf_counter()
    with statements(engine) as sql:
        response = await client.post("/", json=bodies.fcm(), headers=headers)
    assert response.status_code == 431
    assert sql == [] and time.perf_counter() - started < 1


async def test_authorization_longer_than_any_token_answers_401_unverified(function_client, auth_env, engine):
    subscribe = function_client("subscribe")
    headers = {"Authorization": "Bearer " + "a" * 9000}
    with statements(engine) as sql:
        response = await subscribe.post("/", json=bodies.fcm(), headers=headers)
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "invalid_token"
    assert sql == []


# --- subscribe rate -----------------------------------------------------------------------


async def test_subscribe_is_rate_limited_per_user_with_retry_after(function_client, auth_env, engine, monkeypatch):
    monkeypatch.setenv("PUSH_SUBSCRIBE_RATE_LIMIT", "3/day")
    subscribe = function_client("subscribe")
    for _ in range(3):
        assert (await subscribe.post("/", json=bodies.fcm(), headers=auth_env.headers("42"))).status_code == 201
    refused = await subscribe.post("/", json=bodies.fcm(), headers=auth_env.headers("42"))
    assert refused.status_code == 429
    assert refused.json()["error"]["code"] == "rate_limited"
    assert 1 <= int(refused.headers["retry-after"]) <= 86400
    assert count(engine) == 3  # the refused one wrote nothing
    # Another user is not affected, and the limited user can still list and unsubscribe.
    assert (await subscribe.post("/", json=bodies.fcm(), headers=auth_env.headers("7"))).status_code == 201
    assert (await subscribe.get("/", headers=auth_env.headers("42"))).status_code == 200
    unsubscribe = function_client("unsubscribe")
    assert (await unsubscribe.post("/", json={"all": True}, headers=auth_env.headers("42"))).status_code == 200


async def test_subscribe_rate_limit_counts_invalid_requests_but_not_malformed_bodies(
    function_client, auth_env, engine, monkeypatch
):
    monkeypatch.setenv("PUSH_SUBSCRIBE_RATE_LIMIT", "2/day")
    subscribe = function_client("subscribe")
    headers = {**auth_env.headers("42"), "Content-Type": "application/json"}
    for _ in range(5):  # not JSON: refused before the limiter is consulted
        assert (await subscribe.post("/", content=b"{nope", headers=headers)).status_code == 400
    assert count(engine, RateCounter) == 0
    bad = {"provider": "fcm", "token": "a b"}
    assert (await subscribe.post("/", json=bad, headers=headers)).status_code == 400
    assert (await subscribe.post("/", json=bad, headers=headers)).status_code == 400
    assert (await subscribe.post("/", json=bodies.fcm(), headers=headers)).status_code == 429


async def test_subscribe_rate_limit_can_be_turned_off(function_client, auth_env, monkeypatch):
    monkeypatch.setenv("PUSH_SUBSCRIBE_RATE_LIMIT", "off")
    subscribe = function_client("subscribe")
    for _ in range(5):
        assert (await subscribe.post("/", json=bodies.fcm(), headers=auth_env.headers("42"))).status_code == 201


def test_a_malformed_rate_limit_stops_the_function_naming_the_setting(monkeypatch):
    from shared.config import ConfigError
    from shared.settings import SubscriptionApiSettings

    monkeypatch.setenv("PUSH_SUBSCRIBE_RATE_LIMIT", "lots")
    with pytest.raises(ConfigError, match="PUSH_SUBSCRIBE_RATE_LIMIT"):
        SubscriptionApiSettings.from_env()
