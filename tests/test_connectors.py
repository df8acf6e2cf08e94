"""OpenFaaS connectors' plain requests reach the functions as the CloudEvents they stand for
(shared/connectors.py), redeliveries are still recognised, and real CloudEvents are untouched."""
from __future__ import annotations

import json

import pytest

from shared import connectors
from shared.events import NOTIFICATION_REQUESTED, PING
from tests import events

TOPIC = "push.notification.requested"


@pytest.fixture
def connector_env(monkeypatch):
    monkeypatch.setenv(connectors.EVENT_TYPE_VAR, NOTIFICATION_REQUESTED)


@pytest.fixture
def dispatch(webpush_rig, connector_env, function_client):
    return function_client("dispatch-webpush")


def message(users: list[str]) -> bytes:
    return json.dumps({"users": users, "message_type": "checkEchoV1", "event_type": "edit-user-talk"}).encode()


def connector_headers(**extra: str) -> dict[str, str]:
    """What the NATS connector (connector-sdk) and the gateway send: X-Topic, X-Call-Id."""
    return {"Content-Type": "application/json", "X-Topic": TOPIC, **extra}


# --- through a dispatcher -------------------------------------------------------------------


async def test_a_connector_message_wakes_the_users_devices(dispatch, webpush_rig, engine):
    row = webpush_rig.add(engine, "alice")
    response = await dispatch.post("/", content=message(["alice"]), headers=connector_headers(**{"X-Call-Id": "c1"}))
    assert response.status_code == 202
    assert webpush_rig.wakeups(row) == ["checkEchoV1"]


async def test_a_retried_async_call_with_the_same_call_id_pushes_once(dispatch, webpush_rig, engine):
    row = webpush_rig.add(engine, "alice")
    headers = connector_headers(**{"X-Call-Id": "same-call"})
    for _ in range(2):
        assert (await dispatch.post("/", content=message(["alice"]), headers=headers)).status_code == 202
    assert webpush_rig.wakeups(row) == ["checkEchoV1"]


async def test_another_call_id_is_another_event(dispatch, webpush_rig, engine):
    row = webpush_rig.add(engine, "alice")
    for call_id in ("first", "second"):
        headers = connector_headers(**{"X-Call-Id": call_id})
        assert (await dispatch.post("/", content=message(["alice"]), headers=headers)).status_code == 202
    assert webpush_rig.wakeups(row) == ["checkEchoV1", "checkEchoV1"]


async def test_without_an_id_header_the_same_message_is_recognised_by_its_hash(dispatch, webpush_rig, engine):
    row = webpush_rig.add(engine, "alice")
    for _ in range(2):
        response = await dispatch.post("/", content=message(["alice"]), headers=connector_headers())
        assert response.status_code == 202
    assert webpush_rig.wakeups(row) == ["checkEchoV1"]


async def test_a_structured_cloudevent_body_keeps_its_own_id(dispatch, webpush_rig, engine):
    row = webpush_rig.add(engine, "alice")
    for event_id in ("e1", "e1", "e2"):
        event = events.cloud_event(NOTIFICATION_REQUESTED, json.loads(message(["alice"])), id_=event_id)
        body = events.structured(event)["content"]
        headers = connector_headers(**{"X-Call-Id": f"call-{event_id}-{id(body)}"})
        assert (await dispatch.post("/", content=body, headers=headers)).status_code == 202
    assert webpush_rig.wakeups(row) == ["checkEchoV1", "checkEchoV1"]


async def test_a_cron_connector_tick_is_a_ping(dispatch):
    response = await dispatch.post("/", content=b"")
    assert response.status_code == 202


async def test_a_connector_message_of_the_wrong_shape_is_refused_for_good(dispatch):
    response = await dispatch.post("/", content=b'{"users": []}', headers=connector_headers())
    assert response.status_code == 422
    response = await dispatch.post("/", content=b"not json", headers=connector_headers())
    assert response.status_code == 400


async def test_real_cloudevents_are_read_as_before(dispatch, webpush_rig, engine):
    row = webpush_rig.add(engine, "alice")
    posted = events.notification(["alice"], id_="real-1")
    for _ in range(2):
        assert (await dispatch.post("/", **posted)).status_code == 202
    assert webpush_rig.wakeups(row) == ["checkEchoV1"]
    broken = events.notification(["alice"])
    del broken["headers"]["ce-id"]
    response = await dispatch.post("/", **broken)
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "not_a_cloudevent"


async def test_without_the_setting_a_plain_request_is_still_refused(webpush_rig, function_client):
    dispatch = function_client("dispatch-webpush")
    response = await dispatch.post("/", content=message(["alice"]), headers=connector_headers())
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "not_a_cloudevent"


async def test_cleanup_still_takes_a_plain_post_as_a_schedule_tick(connector_env, function_client):
    cleanup = function_client("cleanup-invalid-tokens")
    assert (await cleanup.post("/", content=b"")).status_code == 202
    assert (await cleanup.post("/", content=b"{}", headers=connector_headers())).status_code == 202


# --- the adapter on its own -----------------------------------------------------------------


def test_the_adapter_is_off_without_its_setting(monkeypatch):
    monkeypatch.delenv(connectors.EVENT_TYPE_VAR, raising=False)
    assert connectors.connector_event(connector_headers(), message(["a"])) is None


def test_the_adapter_leaves_cloudevent_requests_alone(connector_env):
    binary = events.notification(["a"])
    assert connectors.connector_event(binary["headers"], binary["content"]) is None
    structured = events.structured(events.cloud_event(NOTIFICATION_REQUESTED, {"users": ["a"]}))
    assert connectors.connector_event(structured["headers"], structured["content"]) is None


def test_a_connector_message_becomes_an_event(connector_env):
    event = connectors.connector_event({"x-topic": TOPIC, "x-call-id": "abc"}, message(["a"]))
    assert event["type"] == NOTIFICATION_REQUESTED
    assert event["source"] == f"/openfaas/connector/{TOPIC}"
    assert event["id"] == "abc"
    assert json.loads(event.data) == json.loads(message(["a"]))


def test_the_id_header_is_configurable(connector_env, monkeypatch):
    monkeypatch.setenv(connectors.ID_HEADERS_VAR, "X-Kafka-Offset, X-Call-Id")
    event = connectors.connector_event({"X-Call-Id": "call", "X-Kafka-Offset": "42"}, message(["a"]))
    assert event["id"] == "42"


def test_the_hash_id_depends_on_topic_and_body(connector_env):
    def event_id(topic: str, body: bytes) -> str:
        return connectors.connector_event({"x-topic": topic}, body)["id"]

    assert event_id("t", message(["a"])) == event_id("t", message(["a"]))
    assert event_id("t", message(["a"])) != event_id("t", message(["b"]))
    assert event_id("t", message(["a"])) != event_id("u", message(["a"]))


def test_an_empty_body_is_a_ping(connector_env):
    event = connectors.connector_event({}, b"  \n")
    assert event["type"] == PING == connectors.PING
