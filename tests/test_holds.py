"""Holds: an operator's pause and credentials a provider refused keep the wake-ups in the database
and send each once when the hold ends; faults at the fake providers, on SQLite and MariaDB.
Time is moved in the database (due and probe times), never slept."""
from __future__ import annotations

import json
import logging
from datetime import timedelta

import pytest
from sqlalchemy import update
from sqlalchemy.orm import Session

from fakes import fcm as fake_fcm
from fakes.apns import make_p8_key
from shared.cli import main as pushctl
from shared.holds import HoldStore
from shared.models import Hold, PendingPush
from shared.policy import PendingStore
from shared.subscriptions import utcnow
from shared.vapid import generate_vapid_keys
from tests import events
from tests.metrics_scrape import changes, scrape, series


def holds(engine) -> list[tuple[str, str, str]]:
    return sorted((h.kind, h.provider, h.app) for h in HoldStore(engine).read().holds)


def kept(engine) -> list[tuple[int, str | None]]:
    with Session(engine) as session:
        return sorted((p.subscription_id, p.kept) for p in session.query(PendingPush))


def probe_due(engine) -> None:
    with Session(engine) as session, session.begin():
        session.execute(update(Hold).values(probe_at=utcnow() - timedelta(seconds=1)))


def expire_kept(engine) -> None:
    with Session(engine) as session, session.begin():
        session.execute(update(PendingPush).values(expires_at=utcnow() - timedelta(seconds=1)))


@pytest.fixture
def immediate_holds(monkeypatch):
    """Every dispatcher reads the holds on each send: the 5 s cache is tested in
    tests/test_holds_deployed.py, with processes as deployed."""
    monkeypatch.setattr("shared.holds.CACHE_SECONDS", 0.0)


# --- pause -----------------------------------------------------------------------------------


async def test_a_paused_provider_sends_nothing_and_each_kept_wake_up_goes_once_on_resume(
        rig, function_client, engine, immediate_holds):
    dispatch = function_client(rig.function)
    rows = [rig.add(engine, "alice"), rig.add(engine, "bob")]
    assert pushctl(["pause", "--provider", rig.provider, "--reason", "incident 42", "--by", "ops"]) == 0
    before = scrape()

    first = await dispatch.post("/", **events.notification(["alice", "bob"], id_="e1"))
    again = await dispatch.post("/", **events.notification(["alice", "bob"], id_="e1"))  # redelivered
    other = await dispatch.post("/", **events.notification(["alice"], id_="e2"))

    assert [first.status_code, again.status_code, other.status_code] == [202, 202, 202]
    assert [rig.attempts(row) for row in rows] == [0, 0]
    assert kept(engine) == sorted((row.id, "pause") for row in rows)
    counted = changes(before, scrape(), "push_sends_total")
    assert counted[series("push_sends_total", provider=rig.provider, outcome="kept", reason="paused")] == 3
    assert (await dispatch.post("/", **events.ping())).status_code == 202
    assert [rig.attempts(row) for row in rows] == [0, 0]  # a tick while paused sends nothing

    assert pushctl(["resume", "--provider", rig.provider]) == 0
    assert (await dispatch.post("/", **events.ping())).status_code == 202
    assert (await dispatch.post("/", **events.ping())).status_code == 202
    assert [rig.wakeups(row) for row in rows] == [["checkEchoV1"], ["checkEchoV1"]]
    assert kept(engine) == []


async def test_a_pause_of_one_app_leaves_the_others_sending(webpush_rig, function_client, engine, immediate_holds):
    dispatch = function_client(webpush_rig.function)
    row = webpush_rig.add(engine, "alice")
    assert pushctl(["pause", "--provider", "webpush", "--app", "commons", "--reason", "r"]) == 0
    assert (await dispatch.post("/", **events.notification(["alice"]))).status_code == 202
    assert webpush_rig.wakeups(row) == ["checkEchoV1"]  # the default app is not paused
    assert pushctl(["pause", "--app", "default", "--reason", "r"]) == 0  # every provider, default app
    assert (await dispatch.post("/", **events.notification(["alice"]))).status_code == 202
    assert webpush_rig.wakeups(row) == ["checkEchoV1"]


async def test_kept_wake_ups_whose_ttl_ran_out_are_counted_as_expired_not_sent(
        webpush_rig, function_client, engine, immediate_holds):
    dispatch = function_client(webpush_rig.function)
    row = webpush_rig.add(engine, "alice")
    pushctl(["pause", "--reason", "r"])
    await dispatch.post("/", **events.notification(["alice"], ttl_seconds=60))
    expire_kept(engine)
    pushctl(["resume"])
    before = scrape()
    await dispatch.post("/", **events.ping())
    assert webpush_rig.attempts(row) == 0
    assert kept(engine) == []
    assert changes(before, scrape(), "push_sends_total")[
        series("push_sends_total", provider="webpush", outcome="expired", reason="ttl")] == 1


async def test_a_discarding_pause_drops_and_counts_the_wake_ups_kept_ones_too(
        webpush_rig, function_client, engine, immediate_holds):
    dispatch = function_client(webpush_rig.function)
    row = webpush_rig.add(engine, "alice")
    pushctl(["pause", "--reason", "keeping them"])
    await dispatch.post("/", **events.notification(["alice"], message_type="checkEchoV1"))
    pushctl(["pause", "--reason", "the wake-ups are the problem", "--discard"])
    before = scrape()
    assert (await dispatch.post("/", **events.notification(["alice"]))).status_code == 202
    await dispatch.post("/", **events.ping())
    pushctl(["resume"])
    await dispatch.post("/", **events.ping())
    assert webpush_rig.attempts(row) == 0
    assert kept(engine) == []
    counted = changes(before, scrape(), "push_sends_total")
    assert counted[series("push_sends_total", provider="webpush", outcome="discarded", reason="paused")] == 2


async def test_subscribe_and_unsubscribe_work_while_everything_is_paused(function_client, auth_env, engine):
    from tests import subscription_bodies as bodies

    pushctl(["pause", "--reason", "incident"])
    subscribe, unsubscribe = function_client("subscribe"), function_client("unsubscribe")
    body = bodies.fcm()
    assert (await subscribe.post("/", json=body, headers=auth_env.headers("alice"))).status_code == 201
    gone = await unsubscribe.post("/", json=body, headers=auth_env.headers("alice"))
    assert gone.status_code in (200, 204)


def test_pushctl_status_says_what_is_paused_since_when_by_whom_why_and_what_is_kept(
        engine, capsys):
    assert pushctl(["pause", "--provider", "apns", "--app", "wikipedia", "--reason", "bad payload", "--by", "kim"]) == 0
    PendingStore(engine).keep("apns", [(7, "wikipedia"), (8, "wikipedia")], "checkEchoV1", 3600, "pause")
    capsys.readouterr()
    assert pushctl(["status"]) == 0
    out = capsys.readouterr().out
    assert "paused: apns, app wikipedia since 20" in out and "by kim" in out and "bad payload" in out
    assert "waiting: apns app wikipedia: 2 kept" in out
    assert pushctl(["resume", "--provider", "fcm"]) == 1  # not what was paused
    assert pushctl(["resume", "--provider", "apns", "--app", "wikipedia"]) == 0
    capsys.readouterr()
    pushctl(["status"])
    assert "nothing is paused or held" in capsys.readouterr().out


def test_paused_scopes_are_exported_with_their_age(engine, monkeypatch):
    from shared import metrics

    monkeypatch.setattr(metrics.HOLD_TOTALS, "read", HoldStore(engine).read)
    monkeypatch.setattr(metrics.HOLD_TOTALS, "waiting", PendingStore(engine).waiting)
    monkeypatch.setattr(metrics.HOLD_TOTALS, "ttl", 0.0)
    pushctl(["pause", "--provider", "fcm", "--reason", "r"])
    HoldStore(engine).trip("apns", "", "InvalidProviderToken")
    PendingStore(engine).keep("apns", [(1, "")], "checkEchoV1", 60, "credentials")
    now = scrape()
    assert now[series("push_paused", provider="fcm", app="*")] == 1
    assert now[series("push_paused_seconds", provider="fcm", app="*")] >= 0
    assert now[series("push_credentials_refused", provider="apns", app="default")] == 1
    assert now[series("push_kept", provider="apns", app="default")] == 1


# --- credentials ---------------------------------------------------------------------------


SCENARIOS = {
    # name: (provider, break, fix; fix returns True when the fix is new credentials: a new process)
    "fcm-invalid-grant": "fcm",
    "fcm-401-unauthenticated": "fcm",
    "fcm-403-permission-denied": "fcm",
    "apns-403-invalid-provider-token": "apns",
    "webpush-401": "webpush",
    "webpush-403-other-vapid-key": "webpush",
}


def break_credentials(name: str, rig, monkeypatch, tmp_path, rows) -> None:
    fake = rig.fake
    if name == "fcm-invalid-grant":  # the key was deleted at Google: the token grant fails
        monkeypatch.setenv("PUSH_FCM_CREDENTIALS", fake.service_account_json(trusted=False))
    elif name == "fcm-401-unauthenticated":
        for row in rows:
            fake.script(row.token, "UNAUTHENTICATED")
    elif name == "fcm-403-permission-denied":  # the service account lost its permission
        for row in rows:
            fake.script(row.token, "PERMISSION_DENIED")
    elif name == "apns-403-invalid-provider-token":  # a wrong .p8 under the right key id
        monkeypatch.setenv("PUSH_APNS_KEY", make_p8_key())
    elif name == "webpush-401":
        for row in rows:
            fake.script(json.loads(row.token), then=401)
    elif name == "webpush-403-other-vapid-key":  # rotated: not the key the browsers subscribed with
        monkeypatch.setenv("PUSH_VAPID_PRIVATE_KEY", generate_vapid_keys().private_key)


def fix_credentials(name: str, rig, monkeypatch, rows, good_vapid: str | None) -> bool:
    """Fix what :func:`break_credentials` broke; True when that takes a new dispatcher."""
    fake = rig.fake
    if name == "fcm-invalid-grant":
        monkeypatch.setenv("PUSH_FCM_CREDENTIALS", fake.service_account_json())
        return True
    if name in ("fcm-401-unauthenticated", "fcm-403-permission-denied"):
        for row in rows:
            fake.script(row.token, fake_fcm.OK)
        return False
    if name == "apns-403-invalid-provider-token":
        monkeypatch.setenv("PUSH_APNS_KEY", fake.key_pem)
        return True
    if name == "webpush-401":
        for row in rows:
            fake.script(json.loads(row.token), 201)
        return False
    monkeypatch.setenv("PUSH_VAPID_PRIVATE_KEY", good_vapid)
    return True


@pytest.mark.parametrize("scenario", SCENARIOS)
async def test_refused_credentials_lose_nothing_and_each_wake_up_goes_once_after_the_fix(
        scenario, request, function_client, engine, tmp_path, monkeypatch, caplog, immediate_holds):
    from tests.rigs import RIGS

    rig_class, fixture = RIGS[SCENARIOS[scenario]]
    rig = rig_class(request.getfixturevalue(fixture), tmp_path)
    rig.configure(monkeypatch)
    if scenario == "webpush-403-other-vapid-key":  # the browsers subscribed with the good key
        from shared.providers.webpush import WebPushProvider
        good = WebPushProvider.from_env().application_server_key
        rig.fake.application_server_key = good
    good_vapid = __import__("os").environ.get("PUSH_VAPID_PRIVATE_KEY")
    rows = [rig.add(engine, "alice"), rig.add(engine, "bob")]
    break_credentials(scenario, rig, monkeypatch, tmp_path, rows)
    caplog.set_level(logging.INFO)
    broken = function_client(rig.function)
    before = scrape()

    answers = [(await broken.post("/", **events.notification(["alice", "bob"]))).status_code]
    refused_sends = [rig.attempts(row) for row in rows]
    answers += [(await broken.post("/", **events.notification(["alice", "bob"]))).status_code for _ in range(2)]

    assert answers == [202, 202, 202]  # kept safe: the broker need not retry
    assert [rig.attempts(row) for row in rows] == refused_sends  # held without contacting the provider
    assert kept(engine) == sorted((row.id, "credentials") for row in rows)
    assert holds(engine) == [("credentials", rig.provider, "")]
    counted = changes(before, scrape(), "push_sends_total")
    assert sum(v for (name, labels), v in counted.items() if ("outcome", "credentials") in labels) == 6
    refused = [r for r in caplog.records if r.levelno == logging.ERROR and "refuses our credentials" in r.getMessage()]
    assert len(refused) == 1 and f"{rig.provider} refuses our credentials for app default" in refused[0].getMessage()

    dispatch = function_client(rig.function) if fix_credentials(scenario, rig, monkeypatch, rows, good_vapid) else broken
    assert (await dispatch.post("/", **events.ping())).status_code == 202  # no probe due yet
    assert [rig.wakeups(row) for row in rows] == [[], []]
    probe_due(engine)
    assert (await dispatch.post("/", **events.ping())).status_code in (200, 202)
    assert (await dispatch.post("/", **events.ping())).status_code in (200, 202)

    assert [rig.wakeups(row) for row in rows] == [["checkEchoV1"], ["checkEchoV1"]]
    assert holds(engine) == [] and kept(engine) == []
    assert not any(secret in caplog.text for secret in secrets_of(rig, monkeypatch) | {row.token for row in rows})


def secrets_of(rig, monkeypatch) -> set[str]:
    """The key material a dispatcher held: none of it may reach a log line."""
    import os

    found = set()
    for name in ("PUSH_APNS_KEY", "PUSH_VAPID_PRIVATE_KEY"):
        if os.environ.get(name):
            found.add(os.environ[name].strip().splitlines()[1 if "BEGIN" in os.environ[name] else 0][:40])
    if rig.provider == "fcm":
        found |= {json.loads(rig.fake.service_account_json(trusted=t))["private_key"].splitlines()[1] for t in (True, False)}
    return found


async def test_a_failed_probe_keeps_the_wake_ups_and_backs_off(webpush_rig, function_client, engine, immediate_holds):
    dispatch = function_client(webpush_rig.function)
    row = webpush_rig.add(engine, "alice")
    webpush_rig.fake.script(json.loads(row.token), then=403)
    await dispatch.post("/", **events.notification(["alice"]))
    probe_due(engine)
    await dispatch.post("/", **events.ping())
    await dispatch.post("/", **events.ping())  # the next probe is not due yet
    assert webpush_rig.attempts(row) == 2
    [hold] = HoldStore(engine).read().holds
    assert hold.failures == 1 and hold.probe_at > utcnow() + timedelta(seconds=100)
    assert kept(engine) == [(row.id, "credentials")]


async def test_an_event_whose_probe_gets_through_lifts_the_hold_and_sends_what_was_kept(
        webpush_rig, function_client, engine, immediate_holds):
    """Piggybacked: no tick needed when events keep coming."""
    dispatch = function_client(webpush_rig.function)
    row, other = webpush_rig.add(engine, "alice"), webpush_rig.add(engine, "bob")
    webpush_rig.fake.script(json.loads(row.token), 401)  # once, then accepted
    webpush_rig.fake.script(json.loads(other.token), 401)
    await dispatch.post("/", **events.notification(["alice", "bob"], message_type="checkEchoV1"))
    probe_due(engine)
    assert (await dispatch.post("/", **events.notification(["bob"], id_="later"))).status_code == 202
    # alice: the kept wake-up; bob: the new event's (the probe), then the kept one, once each.
    assert webpush_rig.wakeups(row) == ["checkEchoV1"]
    assert webpush_rig.wakeups(other) == ["checkEchoV1", "checkEchoV1"]
    assert holds(engine) == [] and kept(engine) == []


async def test_clean_up_wakes_the_dispatchers_only_when_held_work_is_due(function_client, engine):
    cleanup = function_client("cleanup-invalid-tokens")
    tick = {"headers": {**events.ping()["headers"], "ce-pushtick": "held"}, "content": b""}
    assert (await cleanup.post("/", **tick)).status_code == 202  # nothing held
    pushctl(["pause", "--reason", "r"])
    PendingStore(engine).keep("fcm", [(1, "")], "checkEchoV1", 3600, "pause")
    assert (await cleanup.post("/", **tick)).status_code == 202  # held, and still paused
    pushctl(["resume"])
    answer = await cleanup.post("/", **tick)
    assert answer.status_code == 200
    assert (answer.headers["ce-type"], answer.headers["ce-pushtick"]) == ("dev.knative.sources.ping", "flush")
