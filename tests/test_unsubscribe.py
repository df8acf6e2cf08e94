"""The unsubscribe function: one device, or all of the caller's on logout; never another's."""
from __future__ import annotations

import json

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from shared.models import Subscription
from shared.subscriptions import NewSubscription, SubscriptionStore
from tests import stores
from tests import subscription_bodies as bodies

pytestmark = pytest.mark.usefixtures("auth_env")


@pytest.fixture
def subscribe(function_client):
    return function_client("subscribe")


@pytest.fixture
def unsubscribe(function_client):
    return function_client("unsubscribe")


def owners(engine) -> list[str]:
    with Session(engine) as session:
        return sorted(session.scalars(select(Subscription.user_id)))


async def test_post_deletes_one_fcm_subscription(subscribe, unsubscribe, issuer, engine):
    kept, gone = bodies.fcm(), bodies.fcm()
    for body in (kept, gone):
        await subscribe.post("/", json=body, headers=issuer.headers("42"))
    response = await unsubscribe.post("/", json=gone, headers=issuer.headers("42"))
    assert (response.status_code, response.json()) == (200, {"deleted": 1})
    listing = (await subscribe.get("/", headers=issuer.headers("42"))).json()["subscriptions"]
    assert len(listing) == 1


async def test_delete_method_deletes_an_apns_subscription_whatever_the_token_case(
    subscribe, unsubscribe, issuer, engine
):
    body = bodies.apns()
    await subscribe.post("/", json=body, headers=issuer.headers("42"))
    response = await unsubscribe.request(
        "DELETE", "/", json={"provider": "apns", "token": body["token"].upper()}, headers=issuer.headers("42")
    )
    assert (response.status_code, response.json()) == (200, {"deleted": 1})
    assert owners(engine) == []


async def test_webpush_subscription_is_deleted_by_endpoint(subscribe, unsubscribe, issuer, engine):
    body = bodies.webpush()
    await subscribe.post("/", json=body, headers=issuer.headers("42"))
    response = await unsubscribe.post(
        "/", json={"provider": "webpush", "endpoint": body["subscription"]["endpoint"]}, headers=issuer.headers("42")
    )
    assert (response.status_code, response.json()) == (200, {"deleted": 1})
    assert owners(engine) == []


async def test_all_deletes_every_subscription_of_the_caller_only(subscribe, unsubscribe, issuer, engine):
    for body in (bodies.fcm(), bodies.apns(), bodies.webpush()):
        await subscribe.post("/", json=body, headers=issuer.headers("42"))
    await subscribe.post("/", json=bodies.fcm(), headers=issuer.headers("7"))
    response = await unsubscribe.post("/", json={"all": True}, headers=issuer.headers("42"))
    assert (response.status_code, response.json()) == (200, {"deleted": 3})
    assert owners(engine) == ["7"]


async def test_unknown_token_answers_404(unsubscribe, issuer):
    response = await unsubscribe.post("/", json=bodies.fcm(), headers=issuer.headers("42"))
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "not_found"


async def test_all_with_no_subscriptions_answers_404(unsubscribe, issuer):
    response = await unsubscribe.post("/", json={"all": True}, headers=issuer.headers("42"))
    assert response.status_code == 404


async def test_another_users_token_is_not_deleted_and_looks_unknown(subscribe, unsubscribe, issuer, engine):
    body = bodies.fcm()
    await subscribe.post("/", json=body, headers=issuer.headers("alice"))
    theirs = await unsubscribe.post("/", json=body, headers=issuer.headers("mallory"))
    unknown = await unsubscribe.post("/", json=bodies.fcm(), headers=issuer.headers("mallory"))
    assert theirs.status_code == unknown.status_code == 404
    assert theirs.json() == unknown.json()
    assert owners(engine) == ["alice"]


INVALID = {
    "all_false": ({"all": False}, "all"),
    "all_with_other_fields": ({"all": True, "provider": "fcm"}, "provider"),
    "missing_provider": ({"token": "abc"}, "provider"),
    "unknown_provider": ({"provider": "mps", "token": "abc"}, "provider"),
    "missing_token": ({"provider": "fcm"}, "token"),
    "apns_token_not_hex": ({"provider": "apns", "token": "xyz"}, "token"),
    "webpush_missing_endpoint": ({"provider": "webpush"}, "endpoint"),
    "webpush_http_endpoint": ({"provider": "webpush", "endpoint": "http://x.example/1"}, "endpoint"),
    "webpush_with_token": ({"provider": "webpush", "endpoint": "https://x.example/1", "token": "t"}, "token"),
    "fcm_token_lone_surrogate": ({"provider": "fcm", "token": "\ud800"}, "token"),
    "webpush_endpoint_lone_surrogate": ({"provider": "webpush", "endpoint": "https://x.example/\udfff"}, "endpoint"),
}


@pytest.mark.parametrize("body,field", INVALID.values(), ids=INVALID.keys())
async def test_invalid_request_answers_400_naming_the_field(subscribe, unsubscribe, issuer, engine, body, field):
    await subscribe.post("/", json=bodies.fcm(), headers=issuer.headers("42"))
    # JSON text as json.dumps writes it, every non-ASCII character escaped: so a body can hold
    # a lone surrogate ("\\ud800"), which UTF-8 cannot encode.
    response = await unsubscribe.post(
        "/", content=json.dumps(body), headers={**issuer.headers("42"), "Content-Type": "application/json"}
    )
    assert response.status_code == 400
    assert response.json()["error"]["field"] == field
    assert owners(engine) == ["42"]


async def test_body_nested_past_the_parsers_limit_answers_400(subscribe, unsubscribe, issuer, engine):
    """Python's JSON parser recurses once per level, and raises RecursionError past its limit."""
    await subscribe.post("/", json=bodies.fcm(), headers=issuer.headers("42"))
    response = await unsubscribe.post(
        "/", content="[" * 8000 + "]" * 8000, headers={**issuer.headers("42"), "Content-Type": "application/json"}
    )
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "invalid_json"
    assert owners(engine) == ["42"]


async def test_body_over_16_kib_answers_413(subscribe, unsubscribe, issuer, engine):
    await subscribe.post("/", json=bodies.fcm(), headers=issuer.headers("42"))
    response = await unsubscribe.post("/", json={"provider": "fcm", "token": "a" * 20000}, headers=issuer.headers("42"))
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "body_too_large"
    assert owners(engine) == ["42"]


async def test_webpush_endpoint_subscribe_now_refuses_can_still_be_unsubscribed(unsubscribe, issuer, engine):
    """Subscribe checks that an endpoint's host and port can be reached; endpoints stored before
    it did must still be removable by the app that holds them."""
    endpoint = "https://push.example.net:99999/x"
    subscription = {"endpoint": endpoint, "keys": bodies.webpush_keys()}
    stores.subscribe(SubscriptionStore(engine), "42", NewSubscription("webpush", json.dumps(subscription), endpoint))
    response = await unsubscribe.post("/", json={"provider": "webpush", "endpoint": endpoint}, headers=issuer.headers("42"))
    assert (response.status_code, response.json()) == (200, {"deleted": 1})
    assert owners(engine) == []


async def test_get_answers_405(unsubscribe, issuer):
    response = await unsubscribe.get("/", headers=issuer.headers("42"))
    assert response.status_code == 405
    assert response.headers["allow"] == "POST, DELETE"


async def test_unauthenticated_request_deletes_nothing(subscribe, unsubscribe, issuer, engine):
    await subscribe.post("/", json=bodies.fcm(), headers=issuer.headers("42"))
    response = await unsubscribe.post("/", json={"all": True})
    assert response.status_code == 401
    assert owners(engine) == ["42"]
