"""Structured logs: JSON lines carrying the request id and the CloudEvent id."""
from __future__ import annotations

import io
import json
import logging

import pytest

from shared.config import ConfigError
from shared.logs import JsonFormatter, configure_logging
from shared.subscriptions import NewSubscription, SubscriptionStore, utcnow
from tests import events


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
    row = SubscriptionStore(engine).subscribe("42", NewSubscription("fcm", "tok", "tok")).subscription
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
