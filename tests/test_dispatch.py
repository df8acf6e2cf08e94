"""The dispatchers: Echo's event in, one wake-up per device out, and answers that make the broker
redeliver exactly when a device still needs the wake-up. Each test runs for every provider, on
both databases."""
from __future__ import annotations

import asyncio
import json
from datetime import timedelta

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from shared.core import utcnow
from shared.deliveries import DeliveryLedger
from shared.events import SUBSCRIPTION_INVALID
from shared.models import Delivery, Subscription
from shared.subscriptions import NewSubscription, SubscriptionStore
from tests import events
from tests.stores import claim, subscribe


@pytest.fixture
def dispatch(rig, function_client):
    return function_client(rig.function)


def count_rows(engine, model) -> int:
    with Session(engine) as session:
        return session.scalar(select(func.count()).select_from(model))


async def test_event_wakes_every_device_of_the_users_once_and_answers_202(rig, dispatch, engine):
    alice = [rig.add(engine, "alice"), rig.add(engine, "alice")]
    bob = rig.add(engine, "bob")
    carol = rig.add(engine, "carol")
    response = await dispatch.post("/", **events.notification(["alice", "bob"]))
    assert response.status_code == 202
    assert response.content == b""
    for row in [*alice, bob]:
        assert rig.wakeups(row) == ["checkEchoV1"]
    assert rig.attempts(carol) == 0


async def test_only_the_dispatchers_own_provider_is_served(rig, dispatch, engine):
    mine = rig.add(engine, "alice")
    others = {"fcm": NewSubscription("fcm", "other-token", "other-token"),
              "apns": NewSubscription("apns", "ab" * 32, "ab" * 32, topic="org.example", environment="production"),
              "webpush": NewSubscription("webpush", "{}", "https://push.example.net/1")}
    store = SubscriptionStore(engine)
    for name, subscription in others.items():
        if name != rig.provider:
            subscribe(store, "alice", subscription)
    assert (await dispatch.post("/", **events.notification(["alice"]))).status_code == 202
    assert rig.wakeups(mine) == ["checkEchoV1"]


async def test_structured_mode_event_works_too(rig, dispatch, engine):
    row = rig.add(engine, "alice")
    event = events.cloud_event(
        "org.wikimedia.push.notification.requested.v1",
        {"users": ["alice"], "message_type": "checkEchoV1", "event_type": "edit-user-talk"},
    )
    assert (await dispatch.post("/", **events.structured(event))).status_code == 202
    assert rig.wakeups(row) == ["checkEchoV1"]


async def test_users_without_subscriptions_answer_202(rig, dispatch):
    response = await dispatch.post("/", **events.notification(["nobody"]))
    assert response.status_code == 202


async def test_redelivered_event_pushes_nothing_again(rig, dispatch, engine):
    row = rig.add(engine, "alice")
    event = events.notification(["alice"], id_="event-1")
    assert (await dispatch.post("/", **event)).status_code == 202
    assert (await dispatch.post("/", **event)).status_code == 202
    assert rig.wakeups(row) == ["checkEchoV1"]


async def test_a_new_event_for_the_same_user_pushes_again(rig, dispatch, engine):
    row = rig.add(engine, "alice")
    await dispatch.post("/", **events.notification(["alice"]))
    await dispatch.post("/", **events.notification(["alice"]))
    assert rig.wakeups(row) == ["checkEchoV1", "checkEchoV1"]


async def test_dead_token_is_reported_as_the_reply_event_without_the_token(rig, dispatch, engine):
    dead, alive = rig.add(engine, "alice"), rig.add(engine, "alice")
    rig.dead(dead)
    before = utcnow()
    response = await dispatch.post("/", **events.notification(["alice"]))
    assert response.status_code == 200
    attributes, data = events.reply_event(response)
    assert attributes["type"] == SUBSCRIPTION_INVALID
    assert attributes["source"] == f"/push-functions/dispatch-{rig.provider}"
    assert data["provider"] == rig.provider
    [item] = data["subscriptions"]
    assert (item["id"], item["token_sha256"]) == (dead.id, dead.token_sha256)
    assert item["reason"]
    assert item["observed_at"] >= before.isoformat()
    assert dead.token not in response.text
    assert rig.wakeups(alive) == ["checkEchoV1"]
    assert count_rows(engine, Subscription) == 2  # deleting is clean-up's job


async def test_dead_token_report_goes_to_k_sink_when_one_is_bound(rig, function_client, engine, sink, monkeypatch):
    monkeypatch.setenv("K_SINK", sink.url)
    dispatch = function_client(rig.function)
    dead = rig.add(engine, "alice")
    rig.dead(dead)
    response = await dispatch.post("/", **events.notification(["alice"]))
    assert response.status_code == 202
    [(headers, data)] = sink.events
    assert headers["ce-type"] == SUBSCRIPTION_INVALID
    assert [item["id"] for item in data["subscriptions"]] == [dead.id]


async def test_sink_refusing_the_report_makes_the_event_retried_and_reported_again(
    rig, function_client, engine, sink, monkeypatch
):
    monkeypatch.setenv("K_SINK", sink.url)
    dispatch = function_client(rig.function)
    dead = rig.add(engine, "alice")
    rig.dead(dead)
    sink.status = 503
    event = events.notification(["alice"], id_="event-1")
    assert (await dispatch.post("/", **event)).status_code == 503
    sink.status = 202
    assert (await dispatch.post("/", **event)).status_code == 202
    assert [item["id"] for _, data in sink.events for item in data["subscriptions"]] == [dead.id]
    assert rig.attempts(dead) == 1  # reported again from the ledger, not sent again


async def test_transient_failure_answers_503_and_redelivery_sends_only_what_failed(rig, dispatch, engine):
    failing, fine = rig.add(engine, "alice"), rig.add(engine, "alice")
    rig.transient_once(failing)
    event = events.notification(["alice"], id_="event-1")
    first = await dispatch.post("/", **event)
    assert first.status_code == 503
    assert int(first.headers["retry-after"]) >= 1
    assert first.json()["error"]["code"] == "retry"
    assert rig.wakeups(fine) == ["checkEchoV1"]
    assert rig.wakeups(failing) == []
    second = await dispatch.post("/", **event)
    assert second.status_code == 202
    assert rig.wakeups(fine) == ["checkEchoV1"]
    assert rig.wakeups(failing) == ["checkEchoV1"]
    assert count_rows(engine, Subscription) == 2  # never deleted on a transient error


async def test_rate_limited_send_answers_429_with_the_providers_retry_after(rig, dispatch, engine):
    row = rig.add(engine, "alice")
    rig.rate_limited_once(row, retry_after=7)
    response = await dispatch.post("/", **events.notification(["alice"]))
    assert response.status_code == 429
    assert response.headers["retry-after"] == "7"


async def test_partial_failure_then_redelivery_delivers_once_and_reports_dead_again(rig, dispatch, engine):
    delivered, dead, transient = rig.add(engine, "a"), rig.add(engine, "b"), rig.add(engine, "c")
    rig.dead(dead)
    rig.transient_once(transient)
    event = events.notification(["a", "b", "c"], id_="event-1")
    assert (await dispatch.post("/", **event)).status_code == 503
    second = await dispatch.post("/", **event)
    assert second.status_code == 200
    _, data = events.reply_event(second)
    assert [item["id"] for item in data["subscriptions"]] == [dead.id]
    assert rig.wakeups(delivered) == ["checkEchoV1"]
    assert rig.wakeups(transient) == ["checkEchoV1"]
    assert rig.attempts(dead) == 1


async def test_permanently_rejected_send_is_not_retried_and_keeps_the_token(rig, dispatch, engine):
    row = rig.add(engine, "alice")
    rig.rejected(row)
    event = events.notification(["alice"], id_="event-1")
    assert (await dispatch.post("/", **event)).status_code == 202
    assert (await dispatch.post("/", **event)).status_code == 202
    assert rig.attempts(row) == 1
    assert count_rows(engine, Subscription) == 1


async def test_dry_run_reaches_no_device_and_records_nothing(rig, dispatch, engine):
    row = rig.add(engine, "alice")
    response = await dispatch.post("/", **events.notification(["alice"], dry_run=True))
    assert response.status_code == 202
    assert rig.wakeups(row) == []
    assert count_rows(engine, Delivery) == 0


async def test_device_claimed_by_a_live_invocation_is_left_to_it_and_the_event_retried(rig, dispatch, engine):
    row = rig.add(engine, "alice")
    event = events.notification(["alice"], id_="event-1")
    key = _event_key(event)
    claim(DeliveryLedger(engine), key, [row.id])  # another replica is sending right now
    response = await dispatch.post("/", **event)
    assert response.status_code == 503
    assert rig.attempts(row) == 0


async def test_claim_of_a_crashed_invocation_is_taken_over_after_its_lease(rig, dispatch, engine):
    row = rig.add(engine, "alice")
    event = events.notification(["alice"], id_="event-1")
    crashed = DeliveryLedger(engine, clock=lambda: utcnow() - timedelta(minutes=10))
    claim(crashed, _event_key(event), [row.id])  # claimed, then the process died before sending
    assert (await dispatch.post("/", **event)).status_code == 202
    assert rig.wakeups(row) == ["checkEchoV1"]


async def test_sends_not_done_by_the_deadline_count_as_transient(rig, function_client, engine, monkeypatch):
    monkeypatch.setenv("PUSH_DISPATCH_DEADLINE_SECONDS", "1")
    dispatch = function_client(rig.function)
    stuck, fine = rig.add(engine, "alice"), rig.add(engine, "alice")
    rig.hang(stuck)
    response = await dispatch.post("/", **events.notification(["alice"]))
    assert response.status_code == 503
    assert rig.wakeups(fine) == ["checkEchoV1"]
    with Session(engine) as session:
        assert session.scalars(select(Delivery.subscription_id)).all() == [fine.id]


async def test_concurrent_redeliveries_push_once(rig, dispatch, engine):
    rows = [rig.add(engine, "alice") for _ in range(3)]
    event = events.notification(["alice"], id_="event-1")
    answers = await asyncio.gather(*(dispatch.post("/", **event) for _ in range(3)))
    assert {a.status_code for a in answers} <= {202, 503}
    while any(a.status_code == 503 for a in answers):
        answers = [await dispatch.post("/", **event)]
    for row in rows:
        assert rig.wakeups(row) == ["checkEchoV1"]


def _event_key(posted: dict) -> str:
    import hashlib

    headers = posted["headers"]
    return hashlib.sha256(f"{headers['ce-source']}\n{headers['ce-id']}".encode()).hexdigest()


async def test_reply_event_routed_to_clean_up_deletes_the_dead_subscription(rig, function_client, engine):
    dispatch, cleanup = function_client(rig.function), function_client("cleanup-invalid-tokens")
    dead, alive = rig.add(engine, "alice"), rig.add(engine, "alice")
    rig.dead(dead)
    reply = await dispatch.post("/", **events.notification(["alice"]))
    routed = await cleanup.post(
        "/", content=reply.content, headers={k: v for k, v in reply.headers.items() if k.startswith("ce-") or k == "content-type"}
    )
    assert routed.status_code == 202
    with Session(engine) as session:
        assert session.scalars(select(Subscription.id)).all() == [alive.id]


async def test_clean_up_racing_a_resubscribe_keeps_the_device(rig, function_client, engine):
    dispatch, cleanup = function_client(rig.function), function_client("cleanup-invalid-tokens")
    row = rig.add(engine, "alice")
    rig.dead(row)
    reply = await dispatch.post("/", **events.notification(["alice"]))
    # The device registers again (new token from the OS, same device) before clean-up runs.
    subscribe(SubscriptionStore(engine), "alice", NewSubscription(
        row.provider, row.token, _identity(row), topic=row.topic, environment=row.environment))
    routed = await cleanup.post(
        "/", content=reply.content, headers={k: v for k, v in reply.headers.items() if k.startswith("ce-") or k == "content-type"}
    )
    assert routed.status_code == 202
    assert count_rows(engine, Subscription) == 1


def _identity(row: Subscription) -> str:
    import json

    return json.loads(row.token)["endpoint"] if row.provider == "webpush" else row.token


async def test_device_its_provider_cannot_send_to_is_refused_and_the_event_completes(
    webpush_rig, function_client, engine, monkeypatch
):
    # Stored before the endpoint host was validated at subscribe, on a deployment that accepts
    # any public host name: the provider itself fails on it (IDNA cannot encode an empty label).
    monkeypatch.setenv("PUSH_WEBPUSH_ALLOWED_HOSTS", "*")
    broken = json.loads(webpush_rig.new_subscription().token)
    broken["endpoint"] = "https://a_b..c/push/1"
    store = SubscriptionStore(engine)
    subscribe(store, "alice", NewSubscription("webpush", json.dumps(broken), broken["endpoint"]))
    fine = webpush_rig.add(engine, "alice")
    dispatch = function_client("dispatch-webpush")
    posted = events.notification(["alice"], id_="unsendable-1")
    assert (await dispatch.post("/", **posted)).status_code == 202
    assert webpush_rig.wakeups(fine) == ["checkEchoV1"]
    with Session(engine) as session:
        states = sorted(session.scalars(select(Delivery.reason).where(Delivery.state == "rejected")))
    assert states == ["provider_error"]
    # Nothing is left to redeliver: the redelivery sends nothing more.
    assert (await dispatch.post("/", **posted)).status_code == 202
    assert webpush_rig.wakeups(fine) == ["checkEchoV1"]
