"""Faults, each counted: how many wake-ups were due, how many devices got none (lost) and how
many got more than one (duplicated). Expected: zero lost, zero duplicated, in every scenario.

- the provider rate limiting / unavailable with Retry-After, then recovering;
- the provider hanging: the provider timeout and the dispatch deadline answer in time;
- a token reported dead while its owner re-subscribes: clean-up keeps the re-subscribed row;
- the database cut (a TCP proxy in front of MariaDB) before an event's claim, as the claim
  commits, between claim and send, while the sends are on the wire, mid-record (the statement
  lost, or committed with its answer lost), and for longer than the deadline mid-run;
- the dispatcher process SIGKILLed mid-event and the event redelivered to a fresh process.

Run with ``-s`` to see each scenario's counts (one ``FAULT`` line each).
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

import httpx
import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from fakes import fcm as fake_fcm
from fakes import webpush as fake_webpush
from fakes.server import Network
from shared.models import Delivery, Subscription
from shared.recorder import ROOM
from shared.subscriptions import SubscriptionStore
from tests import crash, events, stores
from tests.conftest import RECYCLE_AFTER, REPO
from tests.db_proxy import CuttableProxy
from tests.hardening import load_function
from tests.rigs import FcmRig

MAX_REDELIVERIES = 10


@dataclass
class Tally:
    scenario: str
    due: int
    lost: int
    duplicated: int
    deliveries: int  # broker deliveries (first + redeliveries) it took

    def line(self) -> str:
        return (f"FAULT {self.scenario}: wake-ups due {self.due}, lost {self.lost}, "
                f"duplicated {self.duplicated}, deliveries {self.deliveries}")


def tally(scenario: str, rig, rows, deliveries: int, per_device: int = 1) -> Tally:
    counts = [len(rig.wakeups(row)) for row in rows]
    result = Tally(
        scenario, per_device * len(rows), sum(max(per_device - c, 0) for c in counts),
        sum(max(c - per_device, 0) for c in counts), deliveries,
    )
    print("\n" + result.line())
    return result


def hang_once(rig, row) -> None:
    """The provider never answers the next send to this device; later ones succeed."""
    if rig.provider == "fcm":
        rig.fake.script(row.token, fake_fcm.HANG, fake_fcm.OK)
    elif rig.provider == "apns":
        rig.fake.hang(row.token, once=True)
    else:
        rig.fake.script(json.loads(row.token), fake_webpush.HANG)


async def deliver_until_done(client, posted: dict, retryable=(429, 503)) -> tuple[int, list]:
    """Post the event as the broker does: again while the answer is retryable (without waiting
    the Retry-After, to keep the test short). Returns how many deliveries it took, and answers."""
    answers = []
    for attempt in range(1, MAX_REDELIVERIES + 1):
        response = await client.post("/", **posted)
        answers.append(response.status_code)
        if response.status_code not in retryable:
            return attempt, answers
        assert int(response.headers["retry-after"]) >= 1
    raise AssertionError(f"still retryable after {MAX_REDELIVERIES} deliveries: {answers}")


# --- the provider -------------------------------------------------------------------------


async def test_provider_rate_limiting_then_recovering(rig, function_client, engine):
    dispatch = function_client(rig.function)
    limited, unavailable, fine = rig.add(engine, "a"), rig.add(engine, "b"), rig.add(engine, "c")
    rig.rate_limited_once(limited, retry_after=2)
    rig.transient_once(unavailable)
    posted = events.notification(["a", "b", "c"], id_="rate-limited-1")
    deliveries, answers = await deliver_until_done(dispatch, posted)
    assert answers[0] in (429, 503) and answers[-1] == 202
    result = tally(f"{rig.provider} 429/503 then recovering", rig, [limited, unavailable, fine], deliveries)
    assert (result.lost, result.duplicated) == (0, 0)


async def test_provider_hanging_is_cut_by_the_timeout_before_the_deadline(rig, function_client, engine, monkeypatch):
    monkeypatch.setenv(f"PUSH_{rig.provider.upper()}_TIMEOUT_SECONDS", "1")
    monkeypatch.setenv("PUSH_DISPATCH_DEADLINE_SECONDS", "3")
    dispatch = function_client(rig.function)
    stuck, fine = rig.add(engine, "a"), rig.add(engine, "a")
    hang_once(rig, stuck)
    posted = events.notification(["a"], id_="hanging-1")
    started = time.monotonic()
    first = await dispatch.post("/", **posted)
    elapsed = time.monotonic() - started
    assert first.status_code == 503 and elapsed < 3 + 1, elapsed
    deliveries, answers = await deliver_until_done(dispatch, posted)
    assert answers[-1] == 202
    result = tally(f"{rig.provider} hanging (answered in {elapsed:.1f} s)", rig, [stuck, fine], deliveries + 1)
    assert (result.lost, result.duplicated) == (0, 0)


async def test_deadline_cuts_a_hang_the_provider_timeout_does_not(function_client, fcm_server, tmp_path, engine, monkeypatch):
    rig = FcmRig(fcm_server, tmp_path)
    rig.configure(monkeypatch)
    monkeypatch.setenv("PUSH_FCM_TIMEOUT_SECONDS", "30")
    monkeypatch.setenv("PUSH_DISPATCH_DEADLINE_SECONDS", "1.5")
    dispatch = function_client("dispatch-fcm")
    stuck = rig.add(engine, "a")
    hang_once(rig, stuck)
    posted = events.notification(["a"], id_="deadline-1")
    started = time.monotonic()
    assert (await dispatch.post("/", **posted)).status_code == 503
    assert time.monotonic() - started < 1.5 + 1
    deliveries, answers = await deliver_until_done(dispatch, posted)
    result = tally("fcm hanging past the deadline", rig, [stuck], deliveries + 1)
    assert (result.lost, result.duplicated) == (0, 0)


# --- a token dying while its owner re-subscribes ---------------------------------------------------


async def test_dead_report_racing_a_resubscribe_keeps_the_resubscribed_row(
    rig, function_client, engine, auth_env
):
    dispatch, cleanup = function_client(rig.function), function_client("cleanup-invalid-tokens")
    subscribe = function_client("subscribe")
    row = rig.add(engine, "alice")
    other = rig.add(engine, "alice")
    rig.dead(row)
    reply = await dispatch.post("/", **events.notification(["alice"], id_="dying-1"))
    assert reply.status_code == 200
    # The app registers the same device again (through the API) before clean-up runs.
    if rig.provider == "webpush":
        body = {"provider": "webpush", "subscription": json.loads(row.token)}
    elif rig.provider == "apns":
        body = {"provider": "apns", "token": row.token, "topic": row.topic, "environment": row.environment}
    else:
        body = {"provider": "fcm", "token": row.token}
    assert (await subscribe.post("/", json=body, headers=auth_env.headers("alice"))).status_code == 200
    headers = {k: v for k, v in reply.headers.items() if k.startswith("ce-") or k == "content-type"}
    for _ in range(2):  # the report, and its redelivery
        assert (await cleanup.post("/", content=reply.content, headers=headers)).status_code == 202
    with Session(engine) as session:
        kept = sorted(session.scalars(select(Subscription.id)))
    assert kept == sorted([row.id, other.id])
    print(f"\nFAULT {rig.provider} dead report racing a re-subscribe: subscriptions 2, lost {2 - len(kept)}")


# --- the database cut off -------------------------------------------------------------------


DEVICES = 20  # 10 users with 2 devices each


@contextlib.asynccontextmanager
async def dispatcher_behind(
    proxy: CuttableProxy, rig, database_url: str, monkeypatch, deadline: str = "10", drain: str = "5"
) -> AsyncIterator[httpx.AsyncClient]:
    """The rig's dispatcher, loaded as functions-framework loads it, reaching MariaDB through
    ``proxy``, with a deadline and drain the tests' outages fit in."""
    monkeypatch.setenv("PUSH_DATABASE_URL", proxy.url(database_url))
    monkeypatch.setenv("PUSH_DATABASE_CONNECT_TIMEOUT", "2")
    monkeypatch.setenv("PUSH_DISPATCH_DEADLINE_SECONDS", deadline)
    monkeypatch.setenv("PUSH_DISPATCH_DRAIN_SECONDS", drain)
    app, module = load_function(rig.function)
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://f", timeout=60) as client:
            yield client
    finally:
        await module.dispatcher.aclose()


@pytest.fixture
def proxy() -> Iterator[CuttableProxy]:
    proxy = CuttableProxy()
    yield proxy
    proxy.close()


def devices(rig, engine) -> tuple[list[str], list]:
    users = [f"user-{i}" for i in range(DEVICES // 2)]
    return users, [rig.add(engine, user) for user in users for _ in range(2)]


async def answered_through(client, posted: dict, proxy: CuttableProxy, cut_when: threading.Event | None,
                           down_for: float = 1.0) -> int:
    """Post the event; once ``cut_when`` is set (now, when ``None``: cut first), keep the database
    away ``down_for`` seconds, then bring it back; the event's first answer."""
    if cut_when is None:
        proxy.cut()
    answer = asyncio.create_task(client.post("/", **posted))
    if cut_when is not None:
        assert await asyncio.to_thread(cut_when.wait, 10), "the proxy was never cut"
    await asyncio.sleep(down_for)
    proxy.restore()
    return (await answer).status_code


async def served_once(client, posted: dict, rig, engine, rows, scenario: str, first: int) -> None:
    """Every device got the wake-up once, the ledger says so, and a redelivery sends nothing."""
    assert first == 202  # the outage cost time, not a redelivery
    again = await client.post("/", **posted)
    assert again.status_code == 202
    with Session(engine) as session:
        states = list(session.scalars(select(Delivery.state)))
    assert states == ["delivered"] * len(rows)
    result = tally(f"fcm database cut {scenario} (MariaDB)", rig, rows, 2)
    assert (result.lost, result.duplicated) == (0, 0)


MARIADB = pytest.mark.parametrize("database_url", ["mariadb"], indirect=True)


#: Where a cut lands in an event's conversation with the database (tests/db_proxy.py), and
#: what that tests: (trigger, mode, after).
CUT_POINTS: dict[str, tuple[bytes, str, bytes] | None] = {
    # Cut before the event comes: the claim is tried until the database is back.
    "before the claim": None,
    # The claim commits and its answer is lost: the retry, with the same token, finds it ours.
    "as the claim commits": (b"COMMIT", "after", b"INSERT IGNORE INTO deliveries"),
    # Claimed; the sends go out with the database away, their outcomes wait for it.
    "between claim and send": (b"COMMIT", "reply", b"INSERT IGNORE INTO deliveries"),
    # A record never reaches the server.
    "mid-record, the statement lost": (b"UPDATE deliveries", "before", b""),
    # A record commits and its answer is lost: written again, harmlessly.
    "mid-record, the answer lost": (b"COMMIT", "after", b"UPDATE deliveries"),
}


@MARIADB
@pytest.mark.parametrize("scenario", list(CUT_POINTS))
async def test_database_cut_at_each_point_of_an_event_loses_nothing_and_sends_nothing_twice(
    fcm_server, tmp_path, engine, database_url, monkeypatch, proxy, scenario
):
    rig = FcmRig(fcm_server, tmp_path)
    rig.configure(monkeypatch)
    users, rows = devices(rig, engine)
    posted = events.notification(users, id_=f"cut-{scenario}")
    point = CUT_POINTS[scenario]
    async with dispatcher_behind(proxy, rig, database_url, monkeypatch) as client:
        cut_when = None if point is None else proxy.arm(point[0], point[1], after=point[2])
        first = await answered_through(client, posted, proxy, cut_when)
        await served_once(client, posted, rig, engine, rows, scenario, first)


@MARIADB
async def test_database_cut_while_sends_are_on_the_wire_records_them_once_it_is_back(
    fcm_server, tmp_path, engine, database_url, monkeypatch, proxy
):
    rig = FcmRig(fcm_server, tmp_path)
    rig.configure(monkeypatch)
    users, rows = devices(rig, engine)
    posted = events.notification(users, id_="cut-mid-send")
    rig.fake.latency = 0.5  # every send on the wire for half a second
    async with dispatcher_behind(proxy, rig, database_url, monkeypatch) as client:
        on_the_wire = threading.Event()
        answer = asyncio.create_task(answered_through(client, posted, proxy, on_the_wire))
        while not rig.fake.requests:
            await asyncio.sleep(0.01)
        proxy.cut()
        on_the_wire.set()
        first = await answer
        await served_once(client, posted, rig, engine, rows, "mid-send", first)


@MARIADB
async def test_database_away_mid_event_holds_back_the_sends_beyond_the_recorders_room(
    fcm_server, tmp_path, engine, database_url, monkeypatch, proxy
):
    """With the database away after the claim, the sends go on only until ROOM outcomes wait for
    it (plus those already on the wire, at most the concurrency): no send is made whose outcome
    could not be written. Once it is back the rest go out, each device once."""
    rig = FcmRig(fcm_server, tmp_path)
    rig.configure(monkeypatch)
    concurrency = 4
    monkeypatch.setenv("PUSH_DISPATCH_CONCURRENCY", str(concurrency))
    users = [f"user-{i}" for i in range(3 * ROOM)]
    rows = [rig.add(engine, user) for user in users]
    posted = events.notification(users, id_="cut-beyond-room")
    async with dispatcher_behind(proxy, rig, database_url, monkeypatch) as client:
        claimed = proxy.arm(b"COMMIT", "reply", after=b"INSERT IGNORE INTO deliveries")
        answer = asyncio.create_task(client.post("/", **posted))
        assert await asyncio.to_thread(claimed.wait, 10), "the proxy was never cut"
        await asyncio.sleep(1.0)
        sent_while_away = len(rig.fake.requests)
        proxy.restore()
        first = (await answer).status_code
        assert ROOM <= sent_while_away <= ROOM + concurrency - 1
        await served_once(client, posted, rig, engine, rows, "with more sends than the recorder's room", first)


@MARIADB
async def test_database_cut_off_mid_run_then_back(rig, database_url, engine, monkeypatch, proxy):
    """An outage longer than the deadline and the drain: the events it covers are answered 503
    (nothing claimed, nothing sent) and redelivered once it is over; the others go through."""
    users = [f"user-{i}" for i in range(20)]
    rows = [rig.add(engine, user) for user in users]  # written directly, not through the proxy
    posted = [events.notification([user], id_=f"db-cut-{i}") for i, user in enumerate(users)]
    answers: dict[int, list[int]] = {i: [] for i in range(len(users))}
    async with dispatcher_behind(proxy, rig, database_url, monkeypatch, deadline="1", drain="0.5") as client:
        for i in range(10):
            answers[i].append((await client.post("/", **posted[i])).status_code)
        proxy.cut()
        cut_off = await asyncio.gather(*(client.post("/", **posted[i]) for i in range(10, 20)))
        for i, response in zip(range(10, 20), cut_off):
            answers[i].append(response.status_code)
            assert response.status_code == 503 and response.headers["retry-after"]
        proxy.restore()
        for i in range(10, 20):
            deliveries, more = await deliver_until_done(client, posted[i])
            answers[i].extend(more)
        for i in range(20):  # the broker may redeliver a finished event too: nothing again
            answers[i].append((await client.post("/", **posted[i])).status_code)
    assert all(a[0] == 202 for a in list(answers.values())[:10])
    assert all(a[-1] == 202 for a in answers.values())
    result = tally(f"{rig.provider} database cut for 10 of 20 events", rig, rows,
                   sum(len(a) for a in answers.values()))
    assert (result.lost, result.duplicated) == (0, 0)


# --- the dispatcher killed mid-event ----------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_dispatcher(env: dict, port: int) -> subprocess.Popen:
    process = subprocess.Popen(
        [sys.executable, "-m", "functions_framework", "--target", "dispatch_fcm",
         "--source", str(REPO / "functions" / "dispatch-fcm" / "main.py"), "--asgi",
         "--host", "127.0.0.1", "--port", str(port)],
        env=env, cwd=str(REPO), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True,  # its server may fork workers: kill the whole group
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                return process
        except httpx.HTTPError:
            time.sleep(0.1)
    kill(process)
    raise AssertionError("the dispatcher did not start")


def kill(process: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    """Signal the process's whole group (functions-framework's server and its workers)."""
    try:
        os.killpg(process.pid, sig)
    except ProcessLookupError:
        pass
    process.wait(10)


async def test_dispatcher_killed_mid_event_and_redelivered_to_a_fresh_one(
    fcm_server, tmp_path, engine, database_url, monkeypatch
):
    rig = FcmRig(fcm_server, tmp_path)
    rig.configure(monkeypatch)
    lease = 5  # short, so the fresh dispatcher takes over soon; above the deadline, as it must be
    env = {**os.environ, "PUSH_DELIVERY_LEASE_SECONDS": str(lease), "PUSH_METRICS_PORT": "off",
           "PUSH_DISPATCH_DEADLINE_SECONDS": "4", "PUSH_DISPATCH_DRAIN_SECONDS": "0.5", "PYTHONPATH": str(REPO)}
    rows = [rig.add(engine, "alice") for _ in range(3)]
    stuck = rows[0]
    rig.fake.script(stuck.token, fake_fcm.HANG, fake_fcm.OK)
    posted = events.notification(["alice"], id_="killed-1")
    port = free_port()
    first = start_dispatcher(env, port)
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            in_flight = asyncio.create_task(client.post("/", **posted))
            # Wait until the dispatcher claimed the devices and the two others were delivered.
            deadline = time.monotonic() + 20
            while len(rig.fake.messages) < 2 and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            assert len(rig.fake.messages) == 2
            await asyncio.sleep(0.3)
            kill(first)
            with pytest.raises(httpx.HTTPError):
                await in_flight
    finally:
        kill(first)
    with Session(engine) as session:
        claims = session.scalar(select(func.count()).select_from(Delivery))
    assert claims == 3  # two recorded done, one claimed and never finished
    killed_at = time.monotonic()
    port = free_port()
    fresh = start_dispatcher(env, port)
    try:
        answers = []
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            for _ in range(MAX_REDELIVERIES):
                response = await client.post("/", **posted)
                answers.append(response.status_code)
                if response.status_code == 202:
                    break
                await asyncio.sleep(1)  # the broker's back-off, shortened
    finally:
        kill(fresh, signal.SIGTERM)
    assert answers[-1] == 202
    assert time.monotonic() - killed_at >= lease - 0.5  # taken over only once the lease ran out
    result = tally("fcm dispatcher SIGKILLed mid-event", rig, rows, 1 + len(answers))
    assert (result.lost, result.duplicated) == (0, 0)


@pytest.mark.parametrize("database_url", ["mariadb"], indirect=True)
def test_a_sigkill_late_in_an_event_resends_at_most_what_was_on_the_wire_and_the_recorders_room(engine, database_url, tmp_path):
    """dispatch-fcm as its image runs it, SIGKILLed at the 290th of 300 sends, twice, each event
    redelivered to a fresh process after the lease (tests/crash.py). Nothing is lost, and re-sent
    are at most the sends whose answer the process had not read (the send concurrency) and the
    answers it had read but not written, which no send starts with ROOM of them outstanding
    (shared.recorder). The distribution over many kills is bench/faults.py's."""
    with crash.CountingFcm(network=Network(recycle_after=RECYCLE_AFTER)) as fake:
        environment = {k: v for k, v in os.environ.items() if not k.startswith("PUSH_")} | {
            "PUSH_DATABASE_URL": database_url, "PUSH_METRICS_PORT": "off",
            "PUSH_FCM_CREDENTIALS": str(fake.write_service_account(tmp_path / "fcm-sa.json")),
            "PUSH_FCM_ENDPOINT": fake.endpoint, "PUSH_FCM_CA_FILE": fake.ca_path,
        }
        store = SubscriptionStore(engine)
        users = [f"killed-{i}" for i in range(300)]
        tokens = [stores.subscribe(store, user, FcmRig(fake, tmp_path).new_subscription()).subscription.token
                  for user in users]
        kills = []
        with crash.dispatchers(environment, tmp_path / "dispatch-fcm.log") as fresh:
            current = next(fresh)
            assert crash.post(current, events.notification(users, id_="warm-up")) == 202
            for number in range(2):
                following = next(fresh)
                kills.append(crash.kill_once(fake, current, following, users, tokens, f"killed-{number}", 290))
                current = following
    for kill in kills:
        print(f"\nFAULT fcm SIGKILL at send 290 of 300: {crash.as_dict(kill)}")
        assert kill.lost == 0
        assert kill.duplicated <= crash.CONCURRENCY + ROOM - 1, kill
