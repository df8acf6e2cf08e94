"""Delivery policy: per-event-type limits and the privacy delay with coalescing, kept in the
database so that replicas and restarts share them. Time is driven by injected clocks or by moving
stored due times, never by sleeping."""
from __future__ import annotations

import asyncio
import json
from datetime import datetime, timedelta

import pytest
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from shared.config import ConfigError
from shared.models import PendingPush
from shared.policy import DeliveryPolicy, PendingStore, PrivacyDelay
from shared.ratelimits import Limit, RateLimiter
from shared.subscriptions import utcnow
from tests import events
from tests.metrics_scrape import changes, scrape, series


class Clock:
    def __init__(self, start: datetime) -> None:
        self.now = start

    def __call__(self) -> datetime:
        return self.now


# --- limits -------------------------------------------------------------------------------


@pytest.fixture
def limited(rig, function_client, monkeypatch):
    monkeypatch.setenv("PUSH_EVENT_LIMITS", json.dumps({"edit-user-talk": "2/hour"}))
    return function_client(rig.function)


async def test_pushes_over_the_event_type_limit_are_not_sent_and_the_event_succeeds(rig, limited, engine):
    row = rig.add(engine, "alice")
    before = scrape()
    answers = [await limited.post("/", **events.notification(["alice"])) for _ in range(3)]
    assert [a.status_code for a in answers] == [202, 202, 202]
    assert rig.wakeups(row) == ["checkEchoV1"] * 2
    assert changes(before, scrape(), "push_sends_total")[
        series("push_sends_total", provider=rig.provider, outcome="limited", reason="edit-user-talk")
    ] == 1


async def test_event_types_without_a_limit_are_not_limited(rig, limited, engine):
    row = rig.add(engine, "alice")
    for _ in range(3):
        await limited.post("/", **events.notification(["alice"], event_type="mention"))
    assert len(rig.wakeups(row)) == 3


async def test_limit_counts_per_device(rig, limited, engine):
    first, second = rig.add(engine, "alice"), rig.add(engine, "alice")
    await limited.post("/", **events.notification(["alice"]))
    await limited.post("/", **events.notification(["alice"]))
    await limited.post("/", **events.notification(["alice"]))
    assert len(rig.wakeups(first)) == len(rig.wakeups(second)) == 2


async def test_limit_holds_across_two_replicas_sending_at_once(rig, function_client, engine, monkeypatch):
    monkeypatch.setenv("PUSH_EVENT_LIMITS", json.dumps({"edit-user-talk": "3/hour"}))
    replicas = [function_client(rig.function), function_client(rig.function)]
    row = rig.add(engine, "alice")
    answers = await asyncio.gather(
        *(replicas[i % 2].post("/", **events.notification(["alice"])) for i in range(8))
    )
    assert {a.status_code for a in answers} == {202}
    assert len(rig.wakeups(row)) == 3


async def test_a_transient_failure_does_not_use_up_the_limit(rig, limited, engine):
    row = rig.add(engine, "alice")
    rig.transient_once(row)
    event = events.notification(["alice"], id_="event-1")
    assert (await limited.post("/", **event)).status_code == 503
    assert (await limited.post("/", **event)).status_code == 202
    assert (await limited.post("/", **events.notification(["alice"]))).status_code == 202
    assert len(rig.wakeups(row)) == 2


def test_limiter_opens_again_in_the_next_window(engine):
    clock = Clock(datetime(2026, 1, 1, 10, 0, 0))
    limiter = RateLimiter(engine, clock)
    limit = Limit.parse("2/hour", "test")
    assert [limiter.hit(["k"], limit)[0] for _ in range(3)] == [True, True, False]
    clock.now += timedelta(hours=1)
    assert limiter.hit(["k"], limit) == [True]


def test_limiter_expire_drops_past_windows(engine):
    clock = Clock(datetime(2026, 1, 1, 10, 0, 0))
    limiter = RateLimiter(engine, clock)
    limiter.hit(["a", "b"], Limit.parse("1/minute", "test"))
    clock.now += timedelta(minutes=5)
    assert limiter.expire() == 2


@pytest.mark.parametrize("text,count,window", [("5/hour", 5, 3600), ("10/day", 10, 86400), ("3/15m", 3, 900)])
def test_limits_are_written_as_count_per_window(text, count, window):
    assert Limit.parse(text, "X") == Limit(count, window)


@pytest.mark.parametrize("raw", ['{"edit-user-talk": "lots"}', '["5/hour"]', "{not json", '{"x": "0/hour"}'])
def test_bad_limits_configuration_names_the_setting(raw, monkeypatch):
    monkeypatch.setenv("PUSH_EVENT_LIMITS", raw)
    with pytest.raises(ConfigError, match="PUSH_EVENT_LIMITS"):
        DeliveryPolicy.from_env()


def test_limits_may_come_from_a_file(tmp_path, monkeypatch):
    path = tmp_path / "limits.json"
    path.write_text('{"edit-user-talk": "5/hour"}')
    monkeypatch.setenv("PUSH_EVENT_LIMITS", str(path))
    assert DeliveryPolicy.from_env().limits == {"edit-user-talk": Limit(5, 3600)}


# --- privacy delay --------------------------------------------------------------------------


@pytest.fixture
def delayed(rig, function_client, monkeypatch):
    monkeypatch.setenv("PUSH_PRIVACY_DELAY", "60-300")
    return function_client(rig.function)


def make_due(engine) -> None:
    with Session(engine) as session, session.begin():
        session.execute(update(PendingPush).values(due_at=utcnow() - timedelta(seconds=1)))


def pending(engine) -> list[PendingPush]:
    with Session(engine) as session:
        return list(session.scalars(select(PendingPush)))


async def test_delayed_event_sends_nothing_at_once_and_stores_a_pending_push(rig, delayed, engine):
    row = rig.add(engine, "alice")
    before = utcnow()
    assert (await delayed.post("/", **events.notification(["alice"]))).status_code == 202
    assert rig.wakeups(row) == []
    [item] = pending(engine)
    assert item.subscription_id == row.id
    assert before + timedelta(seconds=60) <= item.due_at <= utcnow() + timedelta(seconds=300)


async def test_tick_before_the_delay_sends_nothing(rig, delayed, engine):
    row = rig.add(engine, "alice")
    await delayed.post("/", **events.notification(["alice"]))
    assert (await delayed.post("/", **events.ping())).status_code == 202
    assert rig.wakeups(row) == []


async def test_tick_after_the_delay_sends_the_wake_up_once(rig, delayed, engine):
    row = rig.add(engine, "alice")
    await delayed.post("/", **events.notification(["alice"]))
    make_due(engine)
    assert (await delayed.post("/", **events.ping())).status_code == 202
    assert (await delayed.post("/", **events.ping())).status_code == 202
    assert rig.wakeups(row) == ["checkEchoV1"]
    assert pending(engine) == []


async def test_several_events_within_the_delay_collapse_into_one_wake_up(rig, delayed, engine):
    row = rig.add(engine, "alice")
    for _ in range(3):
        await delayed.post("/", **events.notification(["alice"]))
    [item] = pending(engine)
    assert item.version == 3
    make_due(engine)
    await delayed.post("/", **events.ping())
    assert rig.wakeups(row) == ["checkEchoV1"]


async def test_two_replicas_flushing_at_once_send_each_pending_push_once(rig, function_client, engine, monkeypatch):
    monkeypatch.setenv("PUSH_PRIVACY_DELAY", "60-300")
    replicas = [function_client(rig.function), function_client(rig.function)]
    rows = [rig.add(engine, f"user{i}") for i in range(6)]
    await replicas[0].post("/", **events.notification([f"user{i}" for i in range(6)]))
    make_due(engine)
    answers = await asyncio.gather(*(replica.post("/", **events.ping()) for replica in replicas))
    assert [a.status_code for a in answers] == [202, 202]
    for row in rows:
        assert rig.wakeups(row) == ["checkEchoV1"]


async def test_pending_push_claimed_by_a_crashed_flush_is_sent_after_its_lease(rig, delayed, engine):
    row = rig.add(engine, "alice")
    await delayed.post("/", **events.notification(["alice"]))
    make_due(engine)
    crashed = PendingStore(engine, PrivacyDelay(60, 300))
    _, claimed = crashed.claim_due(rig.provider)  # claimed, then the process died
    assert len(claimed) == 1
    await delayed.post("/", **events.ping())
    assert rig.wakeups(row) == []  # its lease still holds
    with Session(engine) as session, session.begin():
        session.execute(update(PendingPush).values(claimed_until=utcnow() - timedelta(seconds=1)))
    await delayed.post("/", **events.ping())
    assert rig.wakeups(row) == ["checkEchoV1"]


async def test_transient_failure_in_a_flush_keeps_the_push_pending(rig, delayed, engine):
    row = rig.add(engine, "alice")
    rig.transient_once(row)
    await delayed.post("/", **events.notification(["alice"]))
    make_due(engine)
    assert (await delayed.post("/", **events.ping())).status_code == 202
    assert rig.wakeups(row) == []
    [item] = pending(engine)
    assert item.claim is None and item.due_at > utcnow()
    make_due(engine)
    await delayed.post("/", **events.ping())
    assert rig.wakeups(row) == ["checkEchoV1"]


async def test_dead_token_found_by_a_flush_is_reported(rig, delayed, engine):
    row = rig.add(engine, "alice")
    rig.dead(row)
    await delayed.post("/", **events.notification(["alice"]))
    make_due(engine)
    response = await delayed.post("/", **events.ping())
    assert response.status_code == 200
    _, data = events.reply_event(response)
    assert [item["id"] for item in data["subscriptions"]] == [row.id]
    assert pending(engine) == []


async def test_pending_pushes_and_their_age_are_exported(rig, delayed, engine, monkeypatch):
    from shared import metrics

    monkeypatch.setattr(metrics.PENDING_TOTALS, "ttl", 0.0)
    rig.add(engine, "alice")
    await delayed.post("/", **events.notification(["alice"]))
    after = scrape()
    assert after[series("push_pending", provider=rig.provider)] == 1
    assert after[series("push_pending_oldest_age_seconds", provider=rig.provider)] >= 0


def test_each_pending_push_draws_its_own_delay(engine):
    draws = iter([61.0, 299.0])
    clock = Clock(datetime(2026, 1, 1, 10, 0, 0))
    store = PendingStore(engine, PrivacyDelay(60, 300), clock=clock, uniform=lambda low, high: next(draws))
    store.enqueue("fcm", [1, 2], "checkEchoV1", 3600)
    due = sorted(row.due_at for row in pending(engine))
    assert due == [clock.now + timedelta(seconds=61), clock.now + timedelta(seconds=299)]


def test_an_event_joining_a_claimed_push_gets_a_new_wake_up_later(engine):
    clock = Clock(datetime(2026, 1, 1, 10, 0, 0))
    store = PendingStore(engine, PrivacyDelay(60, 60), clock=clock)
    store.enqueue("fcm", [1], "checkEchoV1", 3600)
    clock.now += timedelta(minutes=2)
    token, [due] = store.claim_due("fcm")
    store.enqueue("fcm", [1], "checkEchoV1", 3600)  # arrives while the flush is sending
    store.finish(token, [due], [], timedelta(seconds=30))
    [item] = pending(engine)
    assert item.claim is None and item.due_at == clock.now + timedelta(seconds=60)


def test_privacy_delay_configuration_is_checked(monkeypatch):
    monkeypatch.setenv("PUSH_PRIVACY_DELAY", "300-60")
    with pytest.raises(ConfigError, match="PUSH_PRIVACY_DELAY"):
        DeliveryPolicy.from_env()
