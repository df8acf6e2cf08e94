"""The subscribe function, called over HTTP as apps call it."""
from __future__ import annotations

import asyncio
import json

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from shared.models import Subscription
from tests import subscription_bodies as bodies

pytestmark = pytest.mark.usefixtures("auth_env")


@pytest.fixture
def subscribe(function_client):
    return function_client("subscribe")


def rows(engine) -> list[Subscription]:
    with Session(engine) as session:
        return list(session.scalars(select(Subscription).order_by(Subscription.id)))


async def test_new_fcm_subscription_answers_201_without_the_token(subscribe, issuer, engine):
    body = bodies.fcm()
    response = await subscribe.post("/", json=body, headers=issuer.headers("42"))
    assert response.status_code == 201
    view = response.json()
    assert view["provider"] == "fcm" and isinstance(view["id"], int)
    assert {"created", "updated"} <= view.keys()
    assert body["token"] not in response.text
    [row] = rows(engine)
    assert (row.user_id, row.provider, row.token) == ("42", "fcm", body["token"])


async def test_apns_subscription_keeps_topic_and_environment(subscribe, issuer, engine):
    body = bodies.apns(token=bodies.apns_token().upper(), environment="sandbox")
    response = await subscribe.post("/", json=body, headers=issuer.headers("42"))
    assert response.status_code == 201
    assert response.json()["topic"] == bodies.TOPIC
    assert response.json()["environment"] == "sandbox"
    [row] = rows(engine)
    assert row.token == body["token"].lower()
    assert (row.topic, row.environment) == (bodies.TOPIC, "sandbox")


async def test_apns_environment_defaults_to_production(subscribe, issuer, engine):
    body = bodies.apns()
    del body["environment"]
    assert (await subscribe.post("/", json=body, headers=issuer.headers("42"))).status_code == 201
    assert rows(engine)[0].environment == "production"


async def test_webpush_subscription_stores_endpoint_and_keys(subscribe, issuer, engine):
    body = bodies.webpush()
    body["subscription"]["expirationTime"] = None  # what PushSubscription.toJSON() sends
    response = await subscribe.post("/", json=body, headers=issuer.headers("42"))
    assert response.status_code == 201
    [row] = rows(engine)
    stored = json.loads(row.token)
    assert stored == {"endpoint": body["subscription"]["endpoint"], "keys": body["subscription"]["keys"]}
    assert body["subscription"]["endpoint"] not in response.text


async def test_resubscribing_refreshes_updated_time_and_answers_200(subscribe, issuer, engine):
    body = bodies.fcm()
    first = (await subscribe.post("/", json=body, headers=issuer.headers("42"))).json()
    await asyncio.sleep(0.01)
    second = await subscribe.post("/", json=body, headers=issuer.headers("42"))
    assert second.status_code == 200
    assert second.json()["id"] == first["id"]
    assert second.json()["created"] == first["created"]
    assert second.json()["updated"] > first["updated"]
    assert len(rows(engine)) == 1


async def test_webpush_resubscribe_with_new_keys_updates_the_same_row(subscribe, issuer, engine):
    body = bodies.webpush()
    await subscribe.post("/", json=body, headers=issuer.headers("42"))
    body["subscription"]["keys"] = bodies.webpush_keys()
    response = await subscribe.post("/", json=body, headers=issuer.headers("42"))
    assert response.status_code == 200
    [row] = rows(engine)
    assert json.loads(row.token)["keys"] == body["subscription"]["keys"]


async def test_token_held_by_another_user_moves_to_the_caller(subscribe, issuer, engine):
    body = bodies.fcm()
    await subscribe.post("/", json=body, headers=issuer.headers("alice"))
    response = await subscribe.post("/", json=body, headers=issuer.headers("bob"))
    assert response.status_code == 201
    [row] = rows(engine)
    assert row.user_id == "bob"
    listing = await subscribe.get("/", headers=issuer.headers("alice"))
    assert listing.json() == {"subscriptions": []}


async def test_subscription_over_the_cap_evicts_the_least_recently_updated(
    function_client, issuer, engine, monkeypatch
):
    monkeypatch.setenv("PUSH_MAX_SUBSCRIPTIONS_PER_USER", "2")
    subscribe = function_client("subscribe")
    first, second, third = bodies.fcm(), bodies.fcm(), bodies.fcm()
    for body in (first, second, first):  # refreshing the first leaves the second least recent
        await subscribe.post("/", json=body, headers=issuer.headers("42"))
        await asyncio.sleep(0.01)
    response = await subscribe.post("/", json=third, headers=issuer.headers("42"))
    assert response.status_code == 201
    assert sorted(row.token for row in rows(engine)) == sorted([first["token"], third["token"]])


async def test_cap_is_configurable(function_client, issuer, engine, monkeypatch):
    monkeypatch.setenv("PUSH_MAX_SUBSCRIPTIONS_PER_USER", "3")
    subscribe = function_client("subscribe")
    for _ in range(5):
        assert (await subscribe.post("/", json=bodies.fcm(), headers=issuer.headers("42"))).status_code == 201
    assert len(rows(engine)) == 3


async def test_cap_default_is_ten(subscribe, issuer, engine):
    for _ in range(12):
        await subscribe.post("/", json=bodies.apns(), headers=issuer.headers("42"))
    assert len(rows(engine)) == 10


async def test_rejected_request_over_the_cap_deletes_nothing(function_client, issuer, engine, monkeypatch):
    monkeypatch.setenv("PUSH_MAX_SUBSCRIPTIONS_PER_USER", "1")
    subscribe = function_client("subscribe")
    await subscribe.post("/", json=bodies.fcm(), headers=issuer.headers("42"))
    bad = bodies.apns(topic="not a bundle id")
    assert (await subscribe.post("/", json=bad, headers=issuer.headers("42"))).status_code == 400
    assert len(rows(engine)) == 1


async def test_list_shows_only_the_callers_subscriptions(subscribe, issuer):
    await subscribe.post("/", json=bodies.fcm(), headers=issuer.headers("42"))
    await subscribe.post("/", json=bodies.apns(), headers=issuer.headers("42"))
    await subscribe.post("/", json=bodies.webpush(), headers=issuer.headers("7"))
    response = await subscribe.get("/", headers=issuer.headers("42"))
    assert response.status_code == 200
    listed = response.json()["subscriptions"]
    assert [view["provider"] for view in listed] == ["fcm", "apns"]
    assert all("token" not in view for view in listed)


async def test_two_users_racing_for_one_token_leave_one_row(subscribe, issuer, engine):
    body = bodies.fcm()
    answers = await asyncio.gather(
        *(subscribe.post("/", json=body, headers=issuer.headers(user)) for user in ("alice", "bob"))
    )
    assert sorted(a.status_code for a in answers) == [201, 201]
    [row] = rows(engine)
    assert row.user_id in ("alice", "bob")


async def test_concurrent_subscribes_of_one_token_make_one_row(subscribe, issuer, engine):
    body = bodies.apns()
    answers = await asyncio.gather(
        *(subscribe.post("/", json=body, headers=issuer.headers("42")) for _ in range(8))
    )
    assert sorted(a.status_code for a in answers) == [200] * 7 + [201]
    with Session(engine) as session:
        assert session.scalar(select(func.count()).select_from(Subscription)) == 1


async def test_concurrent_subscribes_of_one_user_respect_the_cap(function_client, issuer, engine, monkeypatch):
    monkeypatch.setenv("PUSH_MAX_SUBSCRIPTIONS_PER_USER", "3")
    subscribe = function_client("subscribe")
    await subscribe.post("/", json=bodies.fcm(), headers=issuer.headers("42"))
    answers = await asyncio.gather(
        *(subscribe.post("/", json=bodies.fcm(), headers=issuer.headers("42")) for _ in range(6))
    )
    assert [a.status_code for a in answers] == [201] * 6
    assert len(rows(engine)) == 3


async def test_a_device_moved_to_another_user_gets_a_new_id(subscribe, issuer):
    body = bodies.fcm()
    first = (await subscribe.post("/", json=body, headers=issuer.headers("alice"))).json()
    moved = (await subscribe.post("/", json=body, headers=issuer.headers("bob"))).json()
    assert moved["id"] != first["id"]
