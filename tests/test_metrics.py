"""Metrics after real traffic: exactly the series that should change, change."""
from __future__ import annotations

import json

import pytest

from shared import metrics
from tests import events
from tests import subscription_bodies as bodies
from tests.metrics_scrape import changes, scrape, series


@pytest.fixture
def subscribe(function_client, auth_env):
    return function_client("subscribe")


async def test_created_subscription_counts_one_request_of_each_kind(subscribe, issuer):
    before = scrape()
    await subscribe.post("/", json=bodies.fcm(), headers=issuer.headers("42"))
    after = scrape()
    assert changes(before, after, "push_subscription_requests_total", "push_requests_total", "push_errors_total") == {
        series("push_subscription_requests_total", action="subscribe", provider="fcm", result="created"): 1,
        series("push_requests_total", function="subscribe", method="POST", status_class="2xx"): 1,
    }
    duration = series("push_request_duration_seconds_count", function="subscribe", method="POST", status_class="2xx")
    assert after[duration] - before.get(duration, 0) == 1


async def test_refused_subscription_counts_an_error_by_code(subscribe, issuer):
    before = scrape()
    await subscribe.post("/", json={"provider": "gcm", "token": "x"}, headers=issuer.headers("42"))
    after = scrape()
    assert changes(before, after, "push_subscription_requests_total", "push_requests_total", "push_errors_total") == {
        series("push_subscription_requests_total", action="subscribe", provider="none", result="invalid_field"): 1,
        series("push_requests_total", function="subscribe", method="POST", status_class="4xx"): 1,
        series("push_errors_total", function="subscribe", reason="invalid_field"): 1,
    }


async def test_unsubscribe_and_list_are_counted_by_result(subscribe, function_client, issuer):
    unsubscribe = function_client("unsubscribe")
    body = bodies.apns()
    await subscribe.post("/", json=body, headers=issuer.headers("42"))
    before = scrape()
    await subscribe.get("/", headers=issuer.headers("42"))
    await unsubscribe.post("/", json={"provider": "apns", "token": body["token"]}, headers=issuer.headers("42"))
    await unsubscribe.post("/", json={"all": True}, headers=issuer.headers("42"))
    after = scrape()
    assert changes(before, after, "push_subscription_requests_total") == {
        series("push_subscription_requests_total", action="list", provider="none", result="listed"): 1,
        series("push_subscription_requests_total", action="unsubscribe", provider="apns", result="deleted"): 1,
        series("push_subscription_requests_total", action="unsubscribe", provider="all", result="not_found"): 1,
    }


async def test_health_probes_are_not_counted_as_traffic(subscribe):
    before = scrape()
    await subscribe.get("/_/health")
    await subscribe.get("/_/ready")
    assert changes(before, scrape(), "push_requests_total") == {}


async def test_total_subscriptions_per_provider_come_from_the_database(subscribe, issuer, monkeypatch):
    monkeypatch.setattr(metrics.SUBSCRIPTION_TOTALS, "ttl", 0.0)
    for body in (bodies.fcm(), bodies.fcm(), bodies.webpush()):
        await subscribe.post("/", json=body, headers=issuer.headers("42"))
    after = scrape()
    assert after[series("push_subscriptions", provider="fcm")] == 2
    assert after[series("push_subscriptions", provider="webpush")] == 1
    assert after[series("push_subscriptions", provider="apns")] == 0


async def test_total_subscriptions_are_cached_between_scrapes(subscribe, issuer, monkeypatch):
    monkeypatch.setattr(metrics.SUBSCRIPTION_TOTALS, "ttl", 0.0)
    scrape()
    monkeypatch.setattr(metrics.SUBSCRIPTION_TOTALS, "ttl", 3600.0)
    await subscribe.post("/", json=bodies.fcm(), headers=issuer.headers("42"))
    assert scrape()[series("push_subscriptions", provider="fcm")] == 0


async def test_dispatch_counts_requests_and_each_send_by_outcome_and_reason(rig, function_client, engine):
    dispatch = function_client(rig.function)
    delivered, dead = rig.add(engine, "alice"), rig.add(engine, "alice")
    rig.dead(dead)
    before = scrape()
    await dispatch.post("/", **events.notification(["alice"]))
    after = scrape()
    sent = changes(before, after, "push_sends_total")
    assert sent.pop(series("push_sends_total", provider=rig.provider, outcome="delivered", reason="none")) == 1
    [(key, change)] = sent.items()
    assert dict(key[1])["outcome"] == "dead" and change == 1
    assert changes(before, after, "push_notifications_requested_total") == {
        series("push_notifications_requested_total", provider=rig.provider, source="cloudevent"): 1
    }
    latency = series("push_provider_request_duration_seconds_count", provider=rig.provider, outcome="delivered")
    assert after[latency] - before.get(latency, 0) == 1


async def test_rate_limited_send_is_counted_as_rate_limited(rig, function_client, engine):
    dispatch = function_client(rig.function)
    row = rig.add(engine, "alice")
    rig.rate_limited_once(row, retry_after=3)
    before = scrape()
    await dispatch.post("/", **events.notification(["alice"]))
    [(key, change)] = changes(before, scrape(), "push_sends_total").items()
    assert dict(key[1])["outcome"] == "rate_limited" and change == 1


async def test_redelivery_is_counted_and_its_skipped_devices_too(rig, function_client, engine):
    dispatch = function_client(rig.function)
    rig.add(engine, "alice")
    rig.add(engine, "alice")
    event = events.notification(["alice"], id_="event-1")
    await dispatch.post("/", **event)
    before = scrape()
    await dispatch.post("/", **event)
    assert changes(before, scrape(), "push_redeliveries_total", "push_sends_skipped_total", "push_sends_total") == {
        series("push_redeliveries_total", provider=rig.provider): 1,
        series("push_sends_skipped_total", provider=rig.provider): 2,
    }


async def test_no_label_or_log_line_holds_a_token_or_user_id(rig, function_client, engine, caplog, subscribe, issuer):
    caplog.set_level("DEBUG")
    dispatch = function_client(rig.function)
    secret_user = "user-4242-secret"
    rows = [rig.add(engine, secret_user) for _ in range(3)]
    rig.dead(rows[0])
    rig.transient_once(rows[1])
    await dispatch.post("/", **events.notification([secret_user]))
    await subscribe.post("/", json=bodies.fcm("fcm-token-that-must-not-leak"), headers=issuer.headers(secret_user))
    text = "\n".join(f"{key}" for key in scrape()) + caplog.text
    identities = [json.loads(row.token)["endpoint"] if rig.provider == "webpush" else row.token for row in rows]
    for secret in [secret_user, "fcm-token-that-must-not-leak", *identities]:
        assert secret not in text
