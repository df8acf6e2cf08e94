"""Structured logs: JSON lines carrying the request id and the CloudEvent id."""
from __future__ import annotations

import io
import json
import logging

import pytest

from shared.config import ConfigError
from shared.core import utcnow
from shared.logs import JsonFormatter, configure_logging
from shared.subscriptions import NewSubscription, SubscriptionStore
from tests import events
from tests import subscription_bodies as bodies
from tests.stores import subscribe


@pytest.fixture
def json_lines():
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    previous = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    yield lambda: [json.loads(line) for line in stream.getvalue().splitlines()]
    root.removeHandler(handler)
    root.setLevel(previous)


async def test_log_lines_are_json_with_request_and_event_ids(function_client, engine, json_lines):
    cleanup = function_client("cleanup-invalid-tokens")
    row = subscribe(SubscriptionStore(engine), "42", NewSubscription("fcm", "tok", "tok")).subscription
    posted = events.invalid_tokens("fcm", [{
        "id": row.id, "token_sha256": row.token_sha256, "reason": "UNREGISTERED",
        "observed_at": utcnow().isoformat() + "Z"}], id_="event-77")
    posted["headers"]["X-Request-Id"] = "req-123"
    response = await cleanup.post("/", **posted)
    assert response.headers["x-request-id"] == "req-123"
    [line] = [line for line in json_lines() if line["message"] == "deleted dead subscriptions"]
    assert line["request_id"] == "req-123"
    assert line["event_id"] == "event-77"
    assert (line["reported"], line["deleted"], line["level"]) == (1, 1, "info")


async def test_a_request_without_an_id_gets_one(function_client):
    cleanup = function_client("cleanup-invalid-tokens")
    response = await cleanup.post("/", **events.ping())
    assert len(response.headers["x-request-id"]) == 32


def test_log_level_is_checked(monkeypatch):
    import shared.logs

    monkeypatch.setattr(shared.logs, "_configured", False)
    monkeypatch.setenv("PUSH_LOG_LEVEL", "loud")
    with pytest.raises(ConfigError, match="PUSH_LOG_LEVEL"):
        configure_logging()


# --- one line per event, per subscribe request -------------------------------------------------


def dispatch_lines(json_lines, event_id: str) -> list[dict]:
    return [line for line in json_lines() if line["logger"] == "shared.dispatch" and line.get("event_id") == event_id]


async def test_each_event_is_one_info_line_with_what_it_came_to(rig, function_client, engine, json_lines):
    dispatch = function_client(rig.function)
    alive, dead = rig.add(engine, "user-4711"), rig.add(engine, "user-4711")
    rig.dead(dead)
    assert (await dispatch.post("/", **events.notification(["user-4711"], id_="ev-1"))).status_code == 200
    [line] = dispatch_lines(json_lines, "ev-1")
    assert line["level"] == "info"
    assert line["message"].startswith(
        f"event ev-1: 2 {rig.provider} devices of 1 user: 1 delivered, 1 dead, 0 transient, "
        "0 skipped (already served), 0 limited; answered 200 in "
    )
    assert (line["devices"], line["delivered"], line["dead"], line["transient"], line["skipped"],
            line["limited"], line["status"]) == (2, 1, 1, 0, 0, 0, 200)
    assert line["elapsed_ms"] >= 0
    assert alive.token not in json.dumps(line) and "user-4711" not in json.dumps(line)


async def test_a_user_without_devices_reads_differently(webpush_rig, function_client, json_lines):
    dispatch = function_client("dispatch-webpush")
    assert (await dispatch.post("/", **events.notification(["7", "8"], id_="ev-2"))).status_code == 202
    [line] = dispatch_lines(json_lines, "ev-2")
    assert line["message"].startswith("event ev-2: no webpush devices for the event's 2 users; nothing sent; answered 202")
    assert line["devices"] == 0


async def test_a_redelivery_with_nothing_left_to_send_reads_differently(webpush_rig, function_client, engine, json_lines):
    dispatch = function_client("dispatch-webpush")
    webpush_rig.add(engine, "7")
    for _ in range(2):
        assert (await dispatch.post("/", **events.notification(["7"], id_="ev-3"))).status_code == 202
    first, second = dispatch_lines(json_lines, "ev-3")
    assert "1 delivered" in first["message"]
    assert second["message"].startswith("event ev-3: redelivery: 1 webpush device, all already served; nothing sent again")
    assert (second["skipped"], second["delivered"]) == (1, 0)


async def test_a_refused_event_reads_differently(webpush_rig, function_client, json_lines):
    dispatch = function_client("dispatch-webpush")
    answer = await dispatch.post("/", **events.notification(["7"], id_="ev-4", message_type="noSuchType"))
    assert answer.status_code == 422
    [line] = dispatch_lines(json_lines, "ev-4")
    assert line["message"] == "event ev-4 refused: 422 invalid_data: message_type must be one of checkEchoV1 [message_type]"
    assert line["level"] == "info"


async def test_devices_over_their_limit_are_counted_as_limited(webpush_rig, function_client, engine, json_lines, monkeypatch):
    monkeypatch.setenv("PUSH_EVENT_LIMITS", json.dumps({"edit-user-talk": "1/hour"}))
    dispatch = function_client("dispatch-webpush")
    webpush_rig.add(engine, "7")
    for id_ in ("ev-5", "ev-6"):
        assert (await dispatch.post("/", **events.notification(["7"], id_=id_))).status_code == 202
    [line] = dispatch_lines(json_lines, "ev-6")
    assert "0 delivered" in line["message"] and "1 limited" in line["message"]
    assert line["limited"] == 1


async def test_subscribe_and_unsubscribe_log_one_line_each_without_caller_or_device(
    function_client, auth_env, json_lines
):
    token = bodies.fcm_token()
    subscribe, unsubscribe = function_client("subscribe"), function_client("unsubscribe")
    headers = auth_env.headers("user-4711")
    assert (await subscribe.post("/", json=bodies.fcm(token), headers=headers)).status_code == 201
    assert (await subscribe.post("/", json={"provider": "fcm"}, headers=headers)).status_code == 400
    assert (await unsubscribe.post("/", json={"all": True}, headers=headers)).status_code == 200
    lines = [line for line in json_lines() if line["logger"] == "shared.subscription_api"]
    assert [line["message"] for line in lines] == [
        "subscribe fcm: created", "subscribe: missing_field", "unsubscribe all: deleted",
    ]
    assert all(line["level"] == "info" for line in lines)
    text = json.dumps(lines)
    assert token not in text and "user-4711" not in text
