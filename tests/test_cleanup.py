"""cleanup-invalid-tokens: dead subscriptions go, refreshed ones stay, old ones expire."""
from __future__ import annotations

from datetime import datetime, timedelta

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from shared.core import utcnow
from shared.deliveries import DeliveryLedger
from shared.models import Delivery, Subscription
from shared.subscriptions import NewSubscription, SubscriptionStore
from tests import events
from tests import subscription_bodies as bodies
from tests.stores import claim, subscribe


@pytest.fixture
def cleanup(function_client):
    return function_client("cleanup-invalid-tokens")


def add(engine, user: str = "42", at: datetime | None = None) -> Subscription:
    token = bodies.fcm_token()
    store = SubscriptionStore(engine, clock=(lambda: at) if at else utcnow)
    return subscribe(store, user, NewSubscription("fcm", token, token)).subscription


def ids(engine) -> list[int]:
    with Session(engine) as session:
        return sorted(session.scalars(select(Subscription.id)))


def report(row: Subscription, observed_at: datetime, digest: str | None = None) -> dict:
    return {
        "id": row.id,
        "token_sha256": digest or row.token_sha256,
        "reason": "UNREGISTERED",
        "observed_at": observed_at.isoformat() + "Z",
    }


async def test_reported_subscription_is_deleted(cleanup, engine):
    dead, alive = add(engine), add(engine)
    response = await cleanup.post("/", **events.invalid_tokens("fcm", [report(dead, utcnow())]))
    assert response.status_code == 202
    assert response.content == b""
    assert ids(engine) == [alive.id]


async def test_structured_mode_event_is_accepted(cleanup, engine):
    dead = add(engine)
    event = events.cloud_event(
        "org.wikimedia.push.subscription.invalid.v1",
        {"provider": "fcm", "subscriptions": [report(dead, utcnow())]},
    )
    assert (await cleanup.post("/", **events.structured(event))).status_code == 202
    assert ids(engine) == []


async def test_subscription_refreshed_after_the_observation_is_kept(cleanup, engine):
    row = add(engine)
    observed = utcnow()
    subscribe(SubscriptionStore(engine, clock=lambda: observed + timedelta(milliseconds=5)), 
        "42", NewSubscription("fcm", row.token, row.token)
    )
    assert (await cleanup.post("/", **events.invalid_tokens("fcm", [report(row, observed)]))).status_code == 202
    assert ids(engine) == [row.id]


async def test_subscription_whose_token_changed_is_kept(cleanup, engine):
    row = add(engine)
    other = "0" * 64
    assert (await cleanup.post("/", **events.invalid_tokens("fcm", [report(row, utcnow(), other)]))).status_code == 202
    assert ids(engine) == [row.id]


async def test_redelivered_report_deletes_nothing_more(cleanup, engine):
    dead, alive = add(engine), add(engine)
    event = events.invalid_tokens("fcm", [report(dead, utcnow())], id_="same")
    assert (await cleanup.post("/", **event)).status_code == 202
    assert (await cleanup.post("/", **event)).status_code == 202
    assert ids(engine) == [alive.id]


async def test_ping_expires_subscriptions_not_refreshed_for_270_days(cleanup, engine):
    stale = add(engine, at=utcnow() - timedelta(days=271))
    fresh = add(engine, at=utcnow() - timedelta(days=269))
    assert (await cleanup.post("/", **events.ping())).status_code == 202
    assert ids(engine) == [fresh.id]
    assert stale.id not in ids(engine)


async def test_expiry_age_is_configurable(function_client, engine, monkeypatch):
    monkeypatch.setenv("PUSH_SUBSCRIPTION_MAX_AGE_DAYS", "30")
    cleanup = function_client("cleanup-invalid-tokens")
    add(engine, at=utcnow() - timedelta(days=31))
    fresh = add(engine, at=utcnow() - timedelta(days=29))
    assert (await cleanup.post("/", **events.ping())).status_code == 202
    assert ids(engine) == [fresh.id]


async def test_cron_connector_request_without_cloudevent_headers_expires_too(cleanup, engine):
    add(engine, at=utcnow() - timedelta(days=300))
    response = await cleanup.post("/", content=b"", headers={"X-Connector": "cron-connector"})
    assert response.status_code == 202
    assert ids(engine) == []


async def test_ping_deletes_delivery_records_past_their_retention(cleanup, engine):
    old = DeliveryLedger(engine, clock=lambda: utcnow() - timedelta(hours=25))
    new = DeliveryLedger(engine)
    claim(old, "a" * 64, [1, 2])
    claim(new, "b" * 64, [3])
    assert (await cleanup.post("/", **events.ping())).status_code == 202
    with Session(engine) as session:
        assert list(session.scalars(select(Delivery.subscription_id))) == [3]


def item(**fields: object) -> dict:
    return {"id": 1, "token_sha256": "a" * 64, "observed_at": "2026-01-01T00:00:00Z", **fields}


MALFORMED = {
    "subscriptions_missing": ({"provider": "fcm"}, "subscriptions"),
    "id_not_a_number": ({"subscriptions": [item(id="1")]}, "subscriptions.id"),
    "id_beyond_64_bits": ({"subscriptions": [item(id=2**70)]}, "subscriptions.id"),
    "id_just_beyond_64_bits": ({"subscriptions": [item(id=2**63)]}, "subscriptions.id"),
    "hash_wrong_length": ({"subscriptions": [item(token_sha256="abc")]}, "subscriptions.token_sha256"),
    "hash_not_hex": ({"subscriptions": [item(token_sha256="z" * 64)]}, "subscriptions.token_sha256"),
    "hash_lone_surrogates": ({"subscriptions": [item(token_sha256="\ud800" * 64)]}, "subscriptions.token_sha256"),
    "reason_lone_surrogate": ({"subscriptions": [item(reason="\ud800")]}, "subscriptions.reason"),
    "observed_at_not_a_time": ({"subscriptions": [item(observed_at="yesterday")]}, "subscriptions.observed_at"),
    # Not RFC 3339, though datetime.fromisoformat reads them (the first two as UTC, the last as +01:00).
    "observed_at_without_offset": ({"subscriptions": [item(observed_at="2026-01-01T00:00:00")]}, "subscriptions.observed_at"),
    "observed_at_a_date_alone": ({"subscriptions": [item(observed_at="2026-01-01")]}, "subscriptions.observed_at"),
    "observed_at_a_week_date": ({"subscriptions": [item(observed_at="2026-W01-1T00:00:00Z")]}, "subscriptions.observed_at"),
    "observed_at_offset_minute_60": (
        {"subscriptions": [item(observed_at="2026-01-01T00:00:00+00:60")]}, "subscriptions.observed_at"
    ),
    # In UTC these fall in years 0 and 10000, which datetime cannot hold.
    "observed_at_before_year_1_in_utc": (
        {"subscriptions": [item(observed_at="0001-01-01T00:00:00+01:00")]}, "subscriptions.observed_at"
    ),
    "observed_at_after_year_9999_in_utc": (
        {"subscriptions": [item(observed_at="9999-12-31T23:59:59-01:00")]}, "subscriptions.observed_at"
    ),
}


@pytest.mark.parametrize("data,field", MALFORMED.values(), ids=MALFORMED.keys())
async def test_malformed_report_is_refused_with_422_naming_the_field_without_deleting(cleanup, engine, data, field):
    row = add(engine)
    event = events.binary(events.cloud_event("org.wikimedia.push.subscription.invalid.v1", data))
    response = await cleanup.post("/", **event)
    assert response.status_code == 422
    assert response.json()["error"]["field"] == field
    assert ids(engine) == [row.id]


async def test_largest_64_bit_id_is_accepted(cleanup, engine):
    row = add(engine)
    item = {"id": 2**63 - 1, "token_sha256": row.token_sha256, "observed_at": "2026-01-01T00:00:00Z"}
    assert (await cleanup.post("/", **events.invalid_tokens("fcm", [item]))).status_code == 202
    assert ids(engine) == [row.id]


async def test_other_event_types_are_refused_with_400(cleanup):
    response = await cleanup.post("/", **events.notification(["42"]))
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "unsupported_event_type"


async def test_structured_event_that_is_not_json_is_refused_with_400(cleanup):
    response = await cleanup.post("/", content=b"{", headers={"Content-Type": "application/cloudevents+json"})
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "not_a_cloudevent"
