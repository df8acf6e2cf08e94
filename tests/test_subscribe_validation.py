"""Bad subscribe requests: a 4xx with a JSON body naming the field, and nothing written."""
from __future__ import annotations

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


def post_json(client, body, headers: dict[str, str]):
    """POST ``body`` as JSON text with every non-ASCII character escaped, as json.dumps writes
    it: so a body can hold a lone surrogate (``"\\ud800"``), which UTF-8 cannot encode."""
    return client.post("/", content=json.dumps(body), headers={**headers, "Content-Type": "application/json"})


def count(engine) -> int:
    with Session(engine) as session:
        return session.scalar(select(func.count()).select_from(Subscription))


def with_keys(**keys):
    body = bodies.webpush()
    body["subscription"]["keys"].update(keys)
    return body


def with_endpoint(endpoint):
    body = bodies.webpush()
    body["subscription"]["endpoint"] = endpoint
    return body


COMPRESSED_POINT = bodies.b64url(b"\x02" + b"\x11" * 32)
NOT_ON_CURVE = bodies.b64url(b"\x04" + b"\x01" * 64)

INVALID = {
    "missing_provider": ({"token": "x"}, "provider"),
    "unknown_provider": ({"provider": "gcm", "token": "x"}, "provider"),
    "provider_not_a_string": ({"provider": 1, "token": "x"}, "provider"),
    "fcm_missing_token": ({"provider": "fcm"}, "token"),
    "fcm_empty_token": ({"provider": "fcm", "token": ""}, "token"),
    "fcm_token_not_a_string": ({"provider": "fcm", "token": 12}, "token"),
    "fcm_token_with_blank": ({"provider": "fcm", "token": "a b"}, "token"),
    "fcm_token_too_long": ({"provider": "fcm", "token": "a" * 4097}, "token"),
    "fcm_unknown_field": ({"provider": "fcm", "token": "abc", "topic": "x"}, "topic"),
    "apns_token_not_hex": (bodies.apns(token="zz" * 32), "token"),
    "apns_token_too_short": (bodies.apns(token="ab" * 8), "token"),
    "apns_token_odd_length": (bodies.apns(token="a" * 65), "token"),
    "apns_missing_topic": ({"provider": "apns", "token": bodies.apns_token()}, "topic"),
    "apns_topic_not_a_bundle_id": (bodies.apns(topic="../etc"), "topic"),
    "apns_bad_environment": (bodies.apns(environment="staging"), "environment"),
    "webpush_missing_subscription": ({"provider": "webpush"}, "subscription"),
    "webpush_subscription_not_object": ({"provider": "webpush", "subscription": "x"}, "subscription"),
    "webpush_http_endpoint": (with_endpoint("http://fcm.googleapis.com/x"), "subscription.endpoint"),
    "webpush_endpoint_not_url": (with_endpoint("not a url"), "subscription.endpoint"),
    "webpush_endpoint_with_credentials": (
        with_endpoint("https://user:pw@fcm.googleapis.com/x"), "subscription.endpoint"
    ),
    "webpush_endpoint_too_long": (
        with_endpoint("https://fcm.googleapis.com/" + "a" * 2048), "subscription.endpoint"
    ),
    "webpush_endpoint_lone_surrogate": (with_endpoint("https://fcm.googleapis.com/\ud800"), "subscription.endpoint"),
    "webpush_endpoint_port_zero": (with_endpoint("https://fcm.googleapis.com:0/x"), "subscription.endpoint"),
    "webpush_endpoint_port_over_65535": (with_endpoint("https://fcm.googleapis.com:99999/x"), "subscription.endpoint"),
    "webpush_endpoint_host_empty_label": (with_endpoint("https://a_b..c/x"), "subscription.endpoint"),
    "webpush_endpoint_host_label_over_63": (
        with_endpoint(f"https://{'a' * 64}.example.net/x"), "subscription.endpoint"
    ),
    "webpush_endpoint_host_underscore": (with_endpoint("https://push_service.example.net/x"), "subscription.endpoint"),
    "webpush_endpoint_host_with_blank": (with_endpoint("https://push example.net/x"), "subscription.endpoint"),
    "webpush_endpoint_host_with_tab": (with_endpoint("https://push.exam\tple.net/x"), "subscription.endpoint"),
    "webpush_endpoint_host_not_an_ipv4_address": (with_endpoint("https://999.1.1.1/x"), "subscription.endpoint"),
    "webpush_missing_keys": (
        {"provider": "webpush", "subscription": {"endpoint": "https://fcm.googleapis.com/x"}},
        "subscription.keys",
    ),
    "webpush_p256dh_not_base64url": (with_keys(p256dh="not base64!"), "subscription.keys.p256dh"),
    "webpush_p256dh_compressed": (with_keys(p256dh=COMPRESSED_POINT), "subscription.keys.p256dh"),
    "webpush_p256dh_not_on_curve": (with_keys(p256dh=NOT_ON_CURVE), "subscription.keys.p256dh"),
    "webpush_auth_wrong_length": (with_keys(auth=bodies.b64url(b"x" * 15)), "subscription.keys.auth"),
    "webpush_missing_auth": (
        {"provider": "webpush", "subscription": {"endpoint": "https://fcm.googleapis.com/x",
                                                 "keys": {"p256dh": bodies.webpush_keys()["p256dh"]}}},
        "subscription.keys.auth",
    ),
    "webpush_unknown_subscription_field": (
        {**bodies.webpush(), "subscription": {**bodies.webpush()["subscription"], "extra": 1}},
        "subscription.extra",
    ),
    "unknown_field_named_by_a_lone_surrogate": ({**bodies.fcm(), "\ud800": 1}, "\ud800"),
}


@pytest.mark.parametrize("body,field", INVALID.values(), ids=INVALID.keys())
async def test_invalid_field_answers_400_naming_it_and_writes_nothing(subscribe, issuer, engine, body, field):
    response = await post_json(subscribe, body, issuer.headers("42"))
    assert response.status_code == 400
    assert response.json()["error"]["field"] == field
    assert count(engine) == 0


async def test_body_that_is_not_an_object_answers_400(subscribe, issuer):
    response = await subscribe.post("/", json=["fcm"], headers=issuer.headers("42"))
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "invalid_body"


async def test_body_that_is_not_json_answers_400(subscribe, issuer):
    response = await subscribe.post(
        "/", content=b"{nope", headers={**issuer.headers("42"), "Content-Type": "application/json"}
    )
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "invalid_json"


async def test_body_nested_past_the_parsers_limit_answers_400(subscribe, issuer, engine):
    """Python's JSON parser recurses once per level, and raises RecursionError past its limit."""
    response = await subscribe.post(
        "/", content="[" * 8000 + "]" * 8000, headers={**issuer.headers("42"), "Content-Type": "application/json"}
    )
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "invalid_json"
    assert count(engine) == 0


async def test_body_that_is_not_declared_json_answers_415(subscribe, issuer):
    response = await subscribe.post(
        "/", content=b'{"provider":"fcm","token":"abc"}',
        headers={**issuer.headers("42"), "Content-Type": "text/plain"},
    )
    assert response.status_code == 415
    assert response.json()["error"]["code"] == "unsupported_media_type"


async def test_body_over_16_kib_answers_413(subscribe, issuer, engine):
    body = {"provider": "fcm", "token": "a" * 20000}
    response = await subscribe.post("/", json=body, headers=issuer.headers("42"))
    assert response.status_code == 413
    assert count(engine) == 0


async def test_other_methods_answer_405_with_allow(subscribe, issuer):
    response = await subscribe.put("/", json=bodies.fcm(), headers=issuer.headers("42"))
    assert response.status_code == 405
    assert response.headers["allow"] == "GET, POST"
    assert response.json()["error"]["code"] == "method_not_allowed"


async def test_apns_topic_outside_the_allowed_list_answers_400(function_client, issuer, engine, monkeypatch):
    monkeypatch.setenv("PUSH_APNS_ALLOWED_TOPICS", "org.wikimedia.wikipedia, org.wikimedia.commons")
    subscribe = function_client("subscribe")
    refused = await subscribe.post("/", json=bodies.apns(topic="com.example.other"), headers=issuer.headers("42"))
    assert refused.status_code == 400
    assert refused.json()["error"]["field"] == "topic"
    allowed = await subscribe.post(
        "/", json=bodies.apns(topic="org.wikimedia.commons"), headers=issuer.headers("42")
    )
    assert allowed.status_code == 201
    assert count(engine) == 1


async def test_padded_base64url_keys_are_accepted_and_stored_unpadded(subscribe, issuer, engine):
    body = bodies.webpush()
    body["subscription"]["keys"]["auth"] += "=="
    assert (await subscribe.post("/", json=body, headers=issuer.headers("42"))).status_code == 201
    assert count(engine) == 1


ACCEPTED_ENDPOINTS = {
    "fcm_legacy_path": "https://fcm.googleapis.com/fcm/send/dGVzdA:APA91b",
    "fcm_webpush_path": "https://fcm.googleapis.com/wp/dGVzdA",
    "mozilla": "https://updates.push.services.mozilla.com/wpush/v2/gAAAAABk",
    "windows_regional_host_with_query": "https://wns2-par02p.notify.windows.com/w/?token=BQYAAAB%2f0sal0z2V",
    "apple": "https://web.push.apple.com/QGuQyavXutnMH",
    "host_in_capitals": "https://FCM.GoogleAPIs.com/wp/dGVzdA",
    "host_with_final_dot": "https://fcm.googleapis.com./wp/dGVzdA",
    "explicit_port_443": "https://updates.push.services.mozilla.com:443/wpush/v2/x",
}


@pytest.mark.parametrize("endpoint", ACCEPTED_ENDPOINTS.values(), ids=ACCEPTED_ENDPOINTS.keys())
async def test_endpoint_on_a_browser_push_service_is_accepted(subscribe, issuer, engine, endpoint):
    response = await subscribe.post("/", json=with_endpoint(endpoint), headers=issuer.headers("42"))
    assert response.status_code == 201
    assert count(engine) == 1
