"""Holds: an operator's pause and credentials a provider refused keep the wake-ups in the database
and send each once when the hold ends; faults at the fake providers, on SQLite and MariaDB.
Time is moved in the database (due and probe times), never slept."""
from __future__ import annotations

import json
import logging
import os
from datetime import datetime, timedelta

import pytest
from sqlalchemy import update
from sqlalchemy.orm import Session

from fakes import fcm as fake_fcm
from fakes.apns import make_p8_key
from shared.cli import main as pushctl
from shared.core import utcnow
from shared.holds import KEY_REFUSALS_TO_HOLD, HoldStore
from shared.events import SUBSCRIPTION_INVALID
from shared.models import Hold, PendingPush
from shared.pending import Due, PendingStore
from shared.subscriptions import SubscriptionStore
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


def make_rig(request, provider: str, tmp_path, monkeypatch):
    """``provider``'s rig (tests/rigs.py), its fake started and the dispatcher configured for it."""
    from tests.rigs import RIGS

    rig_class, fixture = RIGS[provider]
    rig = rig_class(request.getfixturevalue(fixture), tmp_path)
    rig.configure(monkeypatch)
    return rig


@pytest.fixture
def fcm_rig(request, tmp_path, monkeypatch):
    return make_rig(request, "fcm", tmp_path, monkeypatch)


@pytest.fixture
def immediate_holds(monkeypatch):
    """Every dispatcher reads the holds on each send: the 5 s cache is tested in
    tests/test_holds_deployed.py, with processes as deployed."""
    monkeypatch.setattr("shared.hold_gate.CACHE_SECONDS", 0.0)


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
    "webpush-401-other-vapid-key": "webpush",  # Mozilla's answer to a key mismatch
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
    elif name in ("webpush-403-other-vapid-key", "webpush-401-other-vapid-key"):  # rotated: not the browsers' key
        fake.key_mismatch_status = int(name.split("-")[1])
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
    rig = make_rig(request, SCENARIOS[scenario], tmp_path, monkeypatch)
    if scenario in ("webpush-403-other-vapid-key", "webpush-401-other-vapid-key"):  # the browsers subscribed with the good key
        from shared.providers.webpush import WebPushProvider
        good = WebPushProvider.from_env().application_server_key
        rig.fake.application_server_key = good
    good_vapid = os.environ.get("PUSH_VAPID_PRIVATE_KEY")
    # Web Push holds the app once several devices refuse our key (one alone may be stale).
    users = [f"user{n}" for n in range(KEY_REFUSALS_TO_HOLD if rig.provider == "webpush" else 2)]
    rows = [rig.add(engine, user) for user in users]
    break_credentials(scenario, rig, monkeypatch, tmp_path, rows)
    caplog.set_level(logging.INFO)
    broken = function_client(rig.function)
    before = scrape()

    answers = [(await broken.post("/", **events.notification(users))).status_code]
    refused_sends = [rig.attempts(row) for row in rows]
    answers += [(await broken.post("/", **events.notification(users))).status_code for _ in range(2)]

    assert answers == [202, 202, 202]  # kept safe: the broker need not retry
    assert [rig.attempts(row) for row in rows] == refused_sends  # held without contacting the provider
    assert kept(engine) == sorted((row.id, "credentials") for row in rows)
    assert holds(engine) == [("credentials", rig.provider, "")]
    counted = changes(before, scrape(), "push_sends_total")
    kept_outcomes = {("outcome", "credentials"), ("outcome", "key_refused")}
    assert sum(v for (name, labels), v in counted.items() if kept_outcomes & set(labels)) == 3 * len(rows)
    refused = [r for r in caplog.records if r.levelno == logging.ERROR and "refuses our credentials" in r.getMessage()]
    assert len(refused) == 1 and f"{rig.provider} refuses our credentials for app default" in refused[0].getMessage()

    dispatch = function_client(rig.function) if fix_credentials(scenario, rig, monkeypatch, rows, good_vapid) else broken
    assert (await dispatch.post("/", **events.ping())).status_code == 202  # no probe due yet
    assert [rig.wakeups(row) for row in rows] == [[]] * len(rows)
    probe_due(engine)
    assert (await dispatch.post("/", **events.ping())).status_code in (200, 202)
    assert (await dispatch.post("/", **events.ping())).status_code in (200, 202)

    assert [rig.wakeups(row) for row in rows] == [["checkEchoV1"]] * len(rows)
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


@pytest.mark.parametrize("provider", ["fcm", "webpush"])
async def test_a_failed_probe_keeps_the_wake_ups_and_backs_off(
        provider, request, function_client, engine, tmp_path, monkeypatch, immediate_holds):
    """FCM: a credentials hold. Web Push, one device refusing our key: the app's ``refused``
    mark, probed alike (one device alone may be stale, or our key wrong)."""
    rig = make_rig(request, provider, tmp_path, monkeypatch)
    dispatch = function_client(rig.function)
    row = rig.add(engine, "alice")
    if provider == "fcm":
        rig.fake.script(row.token, "PERMISSION_DENIED")
    else:
        rig.fake.script(json.loads(row.token), then=403)
    await dispatch.post("/", **events.notification(["alice"]))
    probe_due(engine)
    await dispatch.post("/", **events.ping())
    await dispatch.post("/", **events.ping())  # the next probe is not due yet
    assert rig.attempts(row) == 2
    [hold] = HoldStore(engine).read().holds
    assert hold.failures == 1 and hold.probe_at > utcnow() + timedelta(seconds=100)
    why = {"fcm": "credentials", "webpush": "refused"}[provider]
    assert (hold.kind, kept(engine)) == (why, [(row.id, why)])


async def test_an_event_whose_probe_gets_through_lifts_the_hold_and_sends_what_was_kept(
        fcm_rig, function_client, engine, immediate_holds):
    """Piggybacked: no tick needed when events keep coming."""
    dispatch = function_client(fcm_rig.function)
    row, other = fcm_rig.add(engine, "alice"), fcm_rig.add(engine, "bob")
    fcm_rig.fake.script(row.token, "PERMISSION_DENIED", fake_fcm.OK)  # once, then accepted
    fcm_rig.fake.script(other.token, "PERMISSION_DENIED", fake_fcm.OK)
    await dispatch.post("/", **events.notification(["alice", "bob"], message_type="checkEchoV1"))
    assert holds(engine) == [("credentials", "fcm", "")]
    probe_due(engine)
    assert (await dispatch.post("/", **events.notification(["bob"], id_="later"))).status_code == 202
    # alice: the kept wake-up; bob: the new event's (the probe), then the kept one, once each.
    assert fcm_rig.wakeups(row) == ["checkEchoV1"]
    assert fcm_rig.wakeups(other) == ["checkEchoV1", "checkEchoV1"]
    assert holds(engine) == [] and kept(engine) == []


# --- Web Push: one stale subscription, or our key wrong? -------------------------------------


@pytest.mark.parametrize("status", [403, 401])  # a mismatch as FCM and Apple answer it; as Mozilla does
async def test_a_stale_subscription_among_healthy_ones_holds_nothing_and_is_rejected_after_one_recheck(
        status, webpush_rig, function_client, engine, immediate_holds):
    webpush_rig.fake.key_mismatch_status = status
    dispatch = function_client(webpush_rig.function)
    users = ["ann", "ben", "cy"]
    healthy = [webpush_rig.add(engine, user) for user in users]
    stale = webpush_rig.add_stale(engine, "old")
    before = scrape()

    alone = await dispatch.post("/", **events.notification(["old"]))
    assert alone.status_code == 202
    assert kept(engine) == [(stale.id, "refused")]  # whose fault: not known yet
    assert holds(engine) == [("refused", "webpush", "")]  # a mark: it holds no send

    others = await dispatch.post("/", **events.notification(users))  # they deliver: our key works
    assert others.status_code == 202  # no dead token to report
    assert [webpush_rig.wakeups(row) for row in healthy] == [["checkEchoV1"]] * 3
    assert webpush_rig.attempts(stale) == 2  # sent once more after that, refused again
    assert webpush_rig.wakeups(stale) == []
    assert kept(engine) == [] and holds(engine) == []
    counted = changes(before, scrape(), "push_sends_total")
    assert counted[series("push_sends_total", provider="webpush", outcome="key_refused", reason=f"http_{status}")] == 1
    assert counted[series("push_sends_total", provider="webpush", outcome="rejected", reason="vapid_key_mismatch")] == 1
    assert SubscriptionStore(engine).by_ids([stale.id])  # not dead: kept for its browser to subscribe anew

    everyone = await dispatch.post("/", **events.notification([*users, "old"]))
    assert everyone.status_code == 202
    assert [webpush_rig.wakeups(row) for row in healthy] == [["checkEchoV1"] * 2] * 3
    assert ("credentials", "webpush", "") not in holds(engine)


async def test_refusals_with_a_delivery_in_between_never_add_up_to_a_hold(
        webpush_rig, function_client, engine, immediate_holds):
    """As many stale devices as it takes to hold, and more, but a delivery between them."""
    dispatch = function_client(webpush_rig.function)
    first = [f"old{n}" for n in range(KEY_REFUSALS_TO_HOLD - 1)]
    second = [f"older{n}" for n in range(KEY_REFUSALS_TO_HOLD - 1)]
    stale = [webpush_rig.add_stale(engine, user) for user in first + second]
    healthy = webpush_rig.add(engine, "ann")

    await dispatch.post("/", **events.notification(first))
    await dispatch.post("/", **events.notification(["ann"]))
    await dispatch.post("/", **events.notification(second))

    assert webpush_rig.wakeups(healthy) == ["checkEchoV1"]
    assert holds(engine) == [("refused", "webpush", "")]
    assert kept(engine) == sorted((row.id, "refused") for row in stale[len(first):])  # the first: rejected
    assert [webpush_rig.attempts(row) for row in stale] == [2] * len(first) + [1] * len(second)


async def test_a_key_wrong_for_an_app_with_fewer_devices_than_it_takes_to_hold_loses_nothing(
        webpush_rig, function_client, engine, monkeypatch, immediate_holds):
    """One device cannot tell a stale subscription from our key: its wake-ups wait (sent to it
    each time, never held), the mark is probed, and after the fix the wake-up goes once."""
    from shared.providers.webpush import WebPushProvider

    good = os.environ["PUSH_VAPID_PRIVATE_KEY"]
    webpush_rig.fake.application_server_key = WebPushProvider.from_env().application_server_key
    row = webpush_rig.add(engine, "alice")
    monkeypatch.setenv("PUSH_VAPID_PRIVATE_KEY", generate_vapid_keys().private_key)  # rotated wrongly
    broken = function_client(webpush_rig.function)
    assert [(await broken.post("/", **events.notification(["alice"]))).status_code for _ in range(2)] == [202, 202]
    assert webpush_rig.attempts(row) == 2
    assert kept(engine) == [(row.id, "refused")] and holds(engine) == [("refused", "webpush", "")]

    monkeypatch.setenv("PUSH_VAPID_PRIVATE_KEY", good)
    fixed = function_client(webpush_rig.function)
    await fixed.post("/", **events.ping())
    assert webpush_rig.attempts(row) == 2  # not probed before its time
    probe_due(engine)
    for _ in range(2):
        assert (await fixed.post("/", **events.ping())).status_code == 202
    assert webpush_rig.wakeups(row) == ["checkEchoV1"]
    assert kept(engine) == [] and holds(engine) == []


def test_pushctl_status_shows_devices_refusing_our_key(engine, capsys):
    from shared.db import run_transaction

    store = HoldStore(engine)
    PendingStore(engine).keep("webpush", [(3, "")], "checkEchoV1", 60, "refused")
    run_transaction(engine, lambda connection: store.refused_in(connection, "webpush", "", "http_403"))
    capsys.readouterr()
    assert pushctl(["status"]) == 0
    out = capsys.readouterr().out
    assert "key refused by some devices: webpush, app default since 20" in out and "nothing held" in out


# --- what kept wake-ups carry, and what their sends find --------------------------------------


async def test_a_kept_wake_up_goes_out_with_what_is_left_of_its_ttl(rig, function_client, engine, immediate_holds):
    dispatch = function_client(rig.function)
    row = rig.add(engine, "alice")
    pushctl(["pause", "--provider", rig.provider, "--reason", "r"])
    await dispatch.post("/", **events.notification(["alice"], ttl_seconds=3600))
    with Session(engine) as session, session.begin():  # as if kept for 2,600 of its 3,600 s
        session.execute(update(PendingPush).values(expires_at=utcnow() + timedelta(seconds=1000)))
    pushctl(["resume", "--provider", rig.provider])
    await dispatch.post("/", **events.ping())
    [ttl] = rig.ttls(row)
    assert 990 <= ttl <= 1000


def test_a_due_wake_up_is_sent_with_the_rest_of_its_ttl_or_not_at_all():
    now = datetime(2026, 1, 1, 12, 0, 0)
    assert Due(1, "t", 3600, 1, now + timedelta(seconds=10.9)).ttl_at(now) == 10
    assert Due(1, "t", 3600, 1, now).ttl_at(now) == 0  # due this very second: TTL 0, now or never
    assert Due(1, "t", 3600, 1, now - timedelta(seconds=1)).ttl_at(now) is None  # expired
    assert Due(1, "t", 3600, 1, None).ttl_at(now) == 3600  # a privacy-delay wake-up: its own TTL


async def test_a_dead_token_found_by_a_probe_is_reported_to_clean_up(fcm_rig, function_client, engine, immediate_holds):
    dispatch = function_client(fcm_rig.function)
    row = fcm_rig.add(engine, "alice")
    fcm_rig.fake.script(row.token, "PERMISSION_DENIED", "UNREGISTERED")
    await dispatch.post("/", **events.notification(["alice"]))
    probe_due(engine)
    answer = await dispatch.post("/", **events.ping())
    assert answer.status_code == 200
    attributes, data = events.reply_event(answer)
    assert attributes["type"] == SUBSCRIPTION_INVALID
    assert [(item["id"], item["reason"]) for item in data["subscriptions"]] == [(row.id, "UNREGISTERED")]
    assert kept(engine) == []


async def test_dead_tokens_found_by_a_flush_of_kept_wake_ups_go_to_k_sink(
        rig, function_client, engine, sink, monkeypatch, immediate_holds):
    monkeypatch.setenv("K_SINK", sink.url)
    dispatch = function_client(rig.function)
    row = rig.add(engine, "alice")
    pushctl(["pause", "--reason", "r"])
    await dispatch.post("/", **events.notification(["alice"]))
    rig.dead(row)
    pushctl(["resume"])
    assert (await dispatch.post("/", **events.ping())).status_code == 202
    [(headers, data)] = sink.events
    assert headers["ce-type"] == SUBSCRIPTION_INVALID
    assert [item["id"] for item in data["subscriptions"]] == [row.id]


async def test_a_dead_token_found_by_the_flush_after_an_event_is_in_the_events_reply(
        webpush_rig, function_client, engine, immediate_holds):
    dispatch = function_client(webpush_rig.function)
    gone, alive = webpush_rig.add(engine, "alice"), webpush_rig.add(engine, "bob")
    pushctl(["pause", "--reason", "r"])
    await dispatch.post("/", **events.notification(["alice"]))
    webpush_rig.dead(gone)
    pushctl(["resume"])
    answer = await dispatch.post("/", **events.notification(["bob"]))  # sees the pause end, then flushes
    assert answer.status_code == 200
    _, data = events.reply_event(answer)
    assert [item["id"] for item in data["subscriptions"]] == [gone.id]
    assert webpush_rig.wakeups(alive) == ["checkEchoV1"]


# --- the event's log line ----------------------------------------------------------------------


def event_line(caplog) -> logging.LogRecord:
    [line] = [r for r in caplog.records if r.name == "shared.dispatch" and "answered" in r.getMessage()]
    return line


@pytest.mark.parametrize("hold, field, words", [
    ("pause", "kept", "2 kept (paused)"),
    ("discard", "discarded", "2 discarded (paused)"),
    ("credentials", "credentials", "2 kept (credentials refused)"),
    ("key", "key_refused", "2 kept (device refused our key)"),
])
async def test_the_events_log_line_counts_what_was_kept_or_dropped(
        hold, field, words, request, function_client, engine, tmp_path, monkeypatch, caplog, immediate_holds):
    rig = make_rig(request, "webpush" if hold == "key" else "fcm", tmp_path, monkeypatch)
    rows = [rig.add(engine, "alice"), rig.add(engine, "bob")]
    if hold in ("pause", "discard"):
        pushctl(["pause", "--reason", "r", *(["--discard"] if hold == "discard" else [])])
    elif hold == "credentials":
        monkeypatch.setenv("PUSH_FCM_CREDENTIALS", rig.fake.service_account_json(trusted=False))
    else:
        for row in rows:
            rig.fake.script(json.loads(row.token), then=403)
    dispatch = function_client(rig.function)
    caplog.set_level(logging.INFO)
    assert (await dispatch.post("/", **events.notification(["alice", "bob"]))).status_code == 202
    line = event_line(caplog)
    assert words in line.getMessage()
    assert getattr(line, field) == 2 and line.delivered == 0


async def test_a_ticks_log_line_counts_the_kept_wake_ups_that_expired(
        webpush_rig, function_client, engine, caplog, immediate_holds):
    dispatch = function_client(webpush_rig.function)
    webpush_rig.add(engine, "alice")
    pushctl(["pause", "--reason", "r"])
    await dispatch.post("/", **events.notification(["alice"], ttl_seconds=60))
    expire_kept(engine)
    pushctl(["resume"])
    caplog.set_level(logging.INFO)
    caplog.clear()
    await dispatch.post("/", **events.ping())
    line = event_line(caplog)
    assert "1 expired" in line.getMessage() and line.expired == 1


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
