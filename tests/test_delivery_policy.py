"""Delivery policy: per-event-type limits and the privacy delay with coalescing, kept in the
database so that replicas and restarts share them. Time is driven by injected clocks or by moving
stored due times, never by sleeping."""
from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from datetime import datetime, timedelta

import pytest
from sqlalchemy import Engine, event, select, update
from sqlalchemy.orm import Session

from shared.config import ConfigError
from shared.core import Device, Outcome, SendResult, WakeUp, utcnow
from shared.deliveries import DeliveryLedger
from shared.dispatch import Dispatcher
from shared.models import PendingPush
from shared.pending import PendingStore
from shared.ratelimits import RateLimiter
from shared.settings import DeliverySettings, DispatchSettings, Limit, NotificationSettings, PrivacyDelay
from shared.subscriptions import NewSubscription, SubscriptionStore
from tests import events
from tests import subscription_bodies as bodies
from tests.hardening import load_function
from tests.metrics_scrape import changes, scrape, series
from tests.rigs import FcmRig
from tests.stores import subscribe


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


def test_a_refund_goes_back_to_the_window_its_hit_was_counted_in(engine):
    """A send that fails transiently just after a window boundary must give its hit back to the
    window it used up, not take one off the new window's count."""
    clock = Clock(datetime(2026, 1, 1, 10, 59, 59))
    limiter = RateLimiter(engine, clock)
    limit = Limit.parse("1/hour", "test")
    counted_at = clock.now
    assert limiter.hit(["k"], limit, counted_at) == [True]
    clock.now = datetime(2026, 1, 1, 11, 0, 1)
    assert limiter.hit(["k"], limit) == [True]
    limiter.refund(["k"], limit, counted_at)
    assert limiter.hit(["k"], limit) == [False]
    assert limiter.hit(["k"], limit, counted_at) == [True]


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
        DeliverySettings.from_env()


def test_limits_may_come_from_a_file(tmp_path, monkeypatch):
    path = tmp_path / "limits.json"
    path.write_text('{"edit-user-talk": "5/hour"}')
    monkeypatch.setenv("PUSH_EVENT_LIMITS", str(path))
    assert DeliverySettings.from_env().limits == {"edit-user-talk": Limit(5, 3600)}


async def test_with_the_privacy_delay_every_event_queued_counts_against_its_limit(
    rig, function_client, engine, monkeypatch
):
    """Limits are applied when an event is queued, and a pending wake-up does not keep the event
    types folded into it (that would need a schema change): two events folded into one wake-up
    use up a limit of two, as the README says."""
    monkeypatch.setenv("PUSH_EVENT_LIMITS", json.dumps({"edit-user-talk": "2/hour"}))
    monkeypatch.setenv("PUSH_PRIVACY_DELAY", "60-300")
    dispatch = function_client(rig.function)
    row = rig.add(engine, "alice")
    for _ in range(2):
        await dispatch.post("/", **events.notification(["alice"]))
    make_due(engine)
    await dispatch.post("/", **events.ping())
    await dispatch.post("/", **events.notification(["alice"]))
    make_due(engine)
    await dispatch.post("/", **events.ping())
    assert rig.wakeups(row) == ["checkEchoV1"]


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


class ClaimsMeet:
    """A ``before_cursor_execute`` hook that holds each of two flushes' claims between its SELECT
    of free rows and its first UPDATE until both have selected: both then saw every row free,
    and only the claim's conditional UPDATE keeps them from sending a row twice."""

    def __init__(self) -> None:
        self.barrier = threading.Barrier(2, timeout=30)  # the timeout only turns a bug into an error
        self.waiting = 2
        self.lock = threading.Lock()

    def __call__(self, _connection, _cursor, statement: str, *_args: object) -> None:
        if not (statement.startswith("UPDATE pending_pushes") and "claim IS NULL" in statement):
            return
        with self.lock:
            if not self.waiting:
                return
            self.waiting -= 1
        self.barrier.wait()


@pytest.fixture
def claims_meet(engine: Engine) -> Iterator[None]:
    """Makes two flushes' claims overlap on MariaDB. On SQLite, where ``BEGIN IMMEDIATE`` makes a
    second claim wait for the first to commit, they cannot overlap at all."""
    if engine.dialect.name == "sqlite":
        yield
        return
    hook = ClaimsMeet()
    event.listen(engine, "before_cursor_execute", hook)
    try:
        yield
    finally:
        event.remove(engine, "before_cursor_execute", hook)
    assert hook.waiting == 0, "the two claims never met"


class Rendezvous:
    """A provider whose sends return only once ``count`` of them are in flight together."""

    name = "fcm"
    echo = None  # serves no Echo request

    def __init__(self, count: int) -> None:
        self.count = count
        self.started = 0
        self.all_in_flight = asyncio.Event()

    async def send(self, device: Device, wakeup: WakeUp) -> SendResult:
        self.started += 1
        if self.started == self.count:
            self.all_in_flight.set()
        await self.all_in_flight.wait()
        return SendResult(Outcome.DELIVERED)

    async def aclose(self) -> None:
        pass


class HeldBack:
    """A provider that delivers at once, except to device ``held``, whose send waits for
    ``release``."""

    name = "fcm"
    echo = None  # serves no Echo request

    def __init__(self, held: int) -> None:
        self.held = held
        self.release = asyncio.Event()

    async def send(self, device: Device, wakeup: WakeUp) -> SendResult:
        if device.id == self.held:
            await self.release.wait()
        return SendResult(Outcome.DELIVERED)

    async def aclose(self) -> None:
        pass


def fcm_device(engine, user: str = "alice") -> int:
    token = bodies.fcm_token()
    return subscribe(SubscriptionStore(engine), user, NewSubscription("fcm", token, token)).subscription.id


def flushing(engine, provider, store: PendingStore) -> Dispatcher:
    """A dispatcher whose sends give up after 10 s: a flush that waits for that fails its test."""
    return Dispatcher(
        provider, SubscriptionStore(engine), DeliveryLedger(engine), NotificationSettings(),
        DispatchSettings(deadline_seconds=10.0), pending=store,
    )


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


async def test_two_replicas_flushing_at_once_send_each_pending_push_once(
    rig, function_client, engine, monkeypatch, claims_meet
):
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
    assert item.created_at == clock.now


async def test_a_flush_sends_every_message_type_and_ttl_at_once_under_one_deadline(engine):
    """Groups sent one after another each had the whole deadline, so a hanging provider kept a
    flush going past its lease (the next tick then sent its wake-ups again) and past the
    platform's timeout. These sends return only while both groups are in flight together."""
    clock = Clock(datetime(2026, 1, 1, 10, 0, 0))
    store = PendingStore(engine, PrivacyDelay(0, 0), clock=clock)
    store.enqueue("fcm", [fcm_device(engine)], "checkEchoV1", 60)
    store.enqueue("fcm", [fcm_device(engine)], "checkEchoV1", 3600)
    clock.now += timedelta(seconds=1)
    report = await flushing(engine, Rendezvous(2), store).flush()
    assert report.delivered == 2
    assert pending(engine) == []


async def test_a_flush_records_each_sent_wake_up_while_others_are_still_in_flight(engine, monkeypatch):
    """A flush that dies midway leaves its claims to run out, and a later tick sends what they
    hold: a wake-up already sent must be gone from the queue by then, or it is sent twice."""
    clock = Clock(datetime(2026, 1, 1, 10, 0, 0))
    store = PendingStore(engine, PrivacyDelay(0, 0), clock=clock)
    sent, held = fcm_device(engine), fcm_device(engine)
    store.enqueue("fcm", [sent, held], "checkEchoV1", 3600)
    clock.now += timedelta(seconds=1)
    recorded = asyncio.Event()
    loop = asyncio.get_running_loop()
    finish = store.finish_many

    def finish_and_tell(*args: object, **kwargs: object) -> list[None]:
        done = finish(*args, **kwargs)
        loop.call_soon_threadsafe(recorded.set)
        return done

    monkeypatch.setattr(store, "finish_many", finish_and_tell)
    provider = HeldBack(held)
    flush = asyncio.create_task(flushing(engine, provider, store).flush())
    await recorded.wait()
    assert [(item.subscription_id, item.claim is not None) for item in pending(engine)] == [(held, True)]
    provider.release.set()
    assert (await flush).delivered == 2


class Counting:
    """A provider that delivers every send after ``seconds``, and remembers whom it sent to."""

    name = "fcm"
    echo = None  # serves no Echo request

    def __init__(self, seconds: float = 0.0) -> None:
        self.seconds = seconds
        self.sent: list[int] = []

    async def send(self, device: Device, wakeup: WakeUp) -> SendResult:
        await asyncio.sleep(self.seconds)
        self.sent.append(device.id)
        return SendResult(Outcome.DELIVERED)

    async def aclose(self) -> None:
        pass


async def test_a_flush_sends_everything_due_round_after_round(engine, monkeypatch):
    """More is due than one round claims (two missed ticks' worth, say): one tick sends it all."""
    monkeypatch.setattr("shared.dispatch.flush.FLUSH_BATCH", 3)
    clock = Clock(datetime(2026, 1, 1, 10, 0, 0))
    store = PendingStore(engine, PrivacyDelay(0, 0), clock=clock)
    devices = [fcm_device(engine) for _ in range(8)]
    store.enqueue("fcm", devices, "checkEchoV1", 3600)
    clock.now += timedelta(seconds=1)
    provider = Counting()
    report = await flushing(engine, provider, store).flush()
    assert report.delivered == 8
    assert sorted(provider.sent) == sorted(devices)
    assert pending(engine) == []


async def test_a_flush_starts_no_round_once_its_deadline_is_near(engine, monkeypatch):
    """Rounds of two sends taking 0.3 s each, under a 1 s deadline: the flush stops after a few
    rounds, what it did not reach stays pending unclaimed for the next tick, nothing twice."""
    monkeypatch.setattr("shared.dispatch.flush.FLUSH_BATCH", 2)
    clock = Clock(datetime(2026, 1, 1, 10, 0, 0))
    store = PendingStore(engine, PrivacyDelay(0, 0), clock=clock)
    devices = [fcm_device(engine, f"user-{n}") for n in range(20)]  # a user keeps at most 10
    store.enqueue("fcm", devices, "checkEchoV1", 3600)
    clock.now += timedelta(seconds=1)
    provider = Counting(seconds=0.3)
    dispatcher = Dispatcher(
        provider, SubscriptionStore(engine), DeliveryLedger(engine), NotificationSettings(),
        DispatchSettings(deadline_seconds=1.0), pending=store,
    )
    report = await dispatcher.flush()
    assert 0 < report.delivered < len(devices)
    assert len(provider.sent) == len(set(provider.sent)) == report.delivered
    left = pending(engine)
    assert sorted(item.subscription_id for item in left) == sorted(set(devices) - set(provider.sent))
    assert all(item.claim is None for item in left)


def test_a_flushs_claim_lasts_push_pending_lease_seconds(engine, monkeypatch):
    monkeypatch.setenv("PUSH_PRIVACY_DELAY", "0-0")
    monkeypatch.setenv("PUSH_PENDING_LEASE_SECONDS", "300")
    clock = Clock(datetime(2026, 1, 1, 10, 0, 0))
    delivery = DeliverySettings.from_env()
    store = PendingStore(engine, delivery.privacy_delay, clock=clock, lease_seconds=delivery.pending_lease_seconds)
    store.enqueue("fcm", [1], "checkEchoV1", 3600)
    store.claim_due("fcm")
    [item] = pending(engine)
    assert item.claimed_until == clock.now + timedelta(seconds=300)


def test_pending_lease_must_be_above_the_dispatch_deadline(monkeypatch):
    """A claim that runs out while its flush still sends lets the next tick send again."""
    monkeypatch.setenv("PUSH_PRIVACY_DELAY", "60-300")
    monkeypatch.setenv("PUSH_DISPATCH_DEADLINE_SECONDS", "120")
    with pytest.raises(ConfigError, match="PUSH_PENDING_LEASE_SECONDS .* PUSH_DISPATCH_DEADLINE_SECONDS"):
        DispatchSettings.from_env()


def test_pending_lease_must_also_cover_the_drain(monkeypatch):
    """A flush may still record its sends for the drain after its deadline (shared.recorder)."""
    monkeypatch.setenv("PUSH_PRIVACY_DELAY", "60-300")
    monkeypatch.setenv("PUSH_DISPATCH_DEADLINE_SECONDS", "100")
    monkeypatch.setenv("PUSH_DISPATCH_DRAIN_SECONDS", "30")
    with pytest.raises(ConfigError, match="PUSH_PENDING_LEASE_SECONDS .* PUSH_DISPATCH_DRAIN_SECONDS"):
        DispatchSettings.from_env()


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_a_dispatcher_refuses_a_delivery_lease_within_the_deadline_and_drain(database_url, fcm_server, tmp_path, monkeypatch):
    """A delivery claim that runs out while its invocation may still send or record lets a
    redelivery take the devices over and send again: the dispatcher does not start so."""
    FcmRig(fcm_server, tmp_path).configure(monkeypatch)
    monkeypatch.setenv("PUSH_DELIVERY_LEASE_SECONDS", "70")  # the deadline is 60, the drain 10
    with pytest.raises(ConfigError, match="PUSH_DELIVERY_LEASE_SECONDS \\(70\\) must be above "
                                          "PUSH_DISPATCH_DEADLINE_SECONDS \\(60\\) \\+ PUSH_DISPATCH_DRAIN_SECONDS \\(10\\)"):
        load_function("dispatch-fcm")


def test_a_wake_up_handed_back_after_a_transient_failure_is_as_old_as_the_hand_back(engine):
    """``push_pending_oldest_age_seconds`` shows how far behind the queue is: a wake-up retried
    later is not late by the time it spent before its failed send."""
    clock = Clock(datetime(2026, 1, 1, 10, 0, 0))
    store = PendingStore(engine, PrivacyDelay(60, 60), clock=clock)
    store.enqueue("fcm", [1], "checkEchoV1", 3600)
    clock.now += timedelta(minutes=2)
    token, [due] = store.claim_due("fcm")
    store.finish(token, [], [due], timedelta(seconds=30))
    assert store.stats() == {"fcm": (1, 0.0)}


def test_privacy_delay_configuration_is_checked(monkeypatch):
    monkeypatch.setenv("PUSH_PRIVACY_DELAY", "300-60")
    with pytest.raises(ConfigError, match="PUSH_PRIVACY_DELAY"):
        DeliverySettings.from_env()
