"""Dead letters are kept, counted and replayed: clean-up's /dead-letters route (the broker's
dead-letter sink), `pushctl dead-letters list|replay`, and the local broker (scripts/local_router.py)
living through a provider outage with the shipped retry schedule, time compressed."""
from __future__ import annotations

import base64
import importlib.util
import json
import socket
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import ThreadingHTTPServer

import pytest
import uvicorn
from functions_framework.aio import create_asgi_app
from sqlalchemy import select
from sqlalchemy.orm import Session

from shared.cli import main as pushctl
from shared.dead_letters import DeadLetterStore
from shared.events import NOTIFICATION_REQUESTED, PING
from shared.models import DeadLetter
from tests import events
from tests.conftest import REPO
from tests.metrics_scrape import changes, scrape


def _load_router():
    spec = importlib.util.spec_from_file_location("local_router", REPO / "scripts" / "local_router.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["local_router"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


local_router = _load_router()

ERRORS = {"knativeerrordest": "http://dispatch-fcm.push.svc.cluster.local",
          "knativeerrorcode": "503", "knativeerrordata": base64.b64encode(b'{"error":{}}').decode()}


def dead_letter(type_: str = NOTIFICATION_REQUESTED, id_: str = "e-1", **errors: str) -> dict:
    """A dead-lettered event as the broker posts it: the event, with Knative's error attributes."""
    event = events.cloud_event(type_, {"users": ["7"], "message_type": "checkEchoV1"}, id_=id_)
    for name, value in {**ERRORS, **errors}.items():
        event[name] = value
    return events.binary(event)


def kept(engine) -> list[DeadLetter]:
    with Session(engine) as session:
        return list(session.scalars(select(DeadLetter).order_by(DeadLetter.id)))


@pytest.fixture
def cleanup(function_client):
    return function_client("cleanup-invalid-tokens")


# --- clean-up keeps what the broker gave up on ---------------------------------------------------


async def test_a_dead_letter_is_kept_with_the_error_that_failed_it(cleanup, engine):
    response = await cleanup.post("/dead-letters", **dead_letter())
    assert response.status_code == 202
    (letter,) = kept(engine)
    assert (letter.event_id, letter.event_type, letter.error_code) == ("e-1", NOTIFICATION_REQUESTED, 503)
    assert letter.destination == ERRORS["knativeerrordest"]
    assert json.loads(letter.data) == {"users": ["7"], "message_type": "checkEchoV1"}
    assert json.loads(letter.attributes)["knativeerrordata"] == ERRORS["knativeerrordata"]


async def test_a_dead_letter_posted_twice_is_kept_once(cleanup, engine):
    for _ in range(2):
        assert (await cleanup.post("/dead-letters", **dead_letter())).status_code == 202
    assert len(kept(engine)) == 1


async def test_the_same_event_failing_at_two_dispatchers_is_kept_for_each(cleanup, engine):
    await cleanup.post("/dead-letters", **dead_letter())
    await cleanup.post("/dead-letters", **dead_letter(knativeerrordest="http://dispatch-apns.push.svc.cluster.local"))
    assert [letter.destination for letter in kept(engine)] == [
        ERRORS["knativeerrordest"], "http://dispatch-apns.push.svc.cluster.local"]


async def test_a_dead_lettered_tick_is_counted_not_kept(cleanup, engine):
    before = scrape()
    assert (await cleanup.post("/dead-letters", **dead_letter(PING, "tick"))).status_code == 202
    await cleanup.post("/dead-letters", **dead_letter())
    assert kept(engine)[0].event_type == NOTIFICATION_REQUESTED and len(kept(engine)) == 1
    assert changes(before, scrape(), "push_dead_letters_received_total") == {
        ("push_dead_letters_received_total", frozenset({("event_type", PING), ("kept", "false")})): 1.0,
        ("push_dead_letters_received_total", frozenset({("event_type", NOTIFICATION_REQUESTED), ("kept", "true")})): 1.0,
    }


async def test_the_kept_dead_letters_are_a_gauge_for_the_alert(cleanup, engine, monkeypatch):
    from shared import metrics

    monkeypatch.setattr(metrics.DEAD_LETTER_TOTAL, "ttl", 0.0)  # read afresh at each scrape
    await cleanup.post("/dead-letters", **dead_letter())
    await cleanup.post("/dead-letters", **dead_letter(id_="e-2"))
    assert scrape()[("push_dead_letters", frozenset())] == 2


async def test_what_is_not_a_cloudevent_is_refused_and_not_kept(cleanup, engine):
    response = await cleanup.post("/dead-letters", content=b"{}", headers={"Content-Type": "application/json"})
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "not_a_cloudevent"
    assert kept(engine) == []


# --- pushctl dead-letters ------------------------------------------------------------------------


def keep(engine, id_: str = "e-1", **errors: str) -> None:
    event = events.cloud_event(NOTIFICATION_REQUESTED, {"users": ["7"], "message_type": "checkEchoV1"}, id_=id_)
    for name, value in {**ERRORS, **errors}.items():
        event[name] = value
    DeadLetterStore(engine).keep(event)


def test_list_shows_each_dead_letter(engine, capsys):
    keep(engine)
    assert pushctl(["dead-letters", "list"]) == 0
    out = capsys.readouterr().out
    assert f"{NOTIFICATION_REQUESTED}\tid=e-1\tcode=503\tdest={ERRORS['knativeerrordest']}" in out


def test_replay_posts_the_event_as_first_sent_and_deletes_it(engine, sink, capsys):
    keep(engine)
    assert pushctl(["dead-letters", "replay", "--to", sink.url]) == 0
    ((headers, data),) = sink.events
    assert (headers["ce-id"], headers["ce-type"], headers["ce-source"]) == ("e-1", NOTIFICATION_REQUESTED, "/test")
    assert not [name for name in headers if name.startswith("ce-knativeerror")]
    assert headers["content-type"] == "application/json"
    assert data["users"] == ["7"]
    assert kept(engine) == []


def test_a_replay_that_is_not_taken_keeps_the_letter_and_fails(engine, sink, capsys):
    keep(engine)
    sink.status = 503
    assert pushctl(["dead-letters", "replay", "--to", sink.url]) == 1
    (letter,) = kept(engine)
    assert (letter.replay_attempts, letter.last_replay_error) == (1, "HTTP 503")
    assert "replays failed: 1 (HTTP 503)" in (pushctl(["dead-letters", "list"]), capsys.readouterr().out)[1]


def test_replay_sends_the_shared_secret_when_one_is_set(engine, sink, monkeypatch):
    monkeypatch.setenv("PUSH_INTERNAL_TOKEN", "s3cret-for-internal-calls")
    keep(engine)
    assert pushctl(["dead-letters", "replay", "--to", sink.url]) == 0
    assert sink.events[0][0]["x-push-internal-token"] == "s3cret-for-internal-calls"


# --- the local broker through an outage -------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def served(name: str) -> Iterator[str]:
    """The function ``name`` (loaded as functions-framework loads it) served over HTTP on a
    port of its own, as the router reaches functions; its URL."""
    app = create_asgi_app(target=name.replace("-", "_"), source=str(REPO / "functions" / name / "main.py"))
    module = sys.modules["main"]
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error", lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 15
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), f"{name} did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        if hasattr(module, "dispatcher"):
            import asyncio

            asyncio.run(module.dispatcher.provider.aclose())


@pytest.fixture
def fcm(fcm_server, tmp_path, monkeypatch):
    from tests.rigs import FcmRig

    rig = FcmRig(fcm_server, tmp_path)
    rig.configure(monkeypatch)
    return rig


@contextmanager
def local_broker(time_scale: float) -> Iterator[tuple[object, str]]:
    """dispatch-fcm and clean-up served, and the router routing to them with the shipped
    Triggers and delivery spec, every wait multiplied by ``time_scale``; the router and its URL."""
    with served("dispatch-fcm") as fcm_url, served("cleanup-invalid-tokens") as cleanup_url:
        routes, delivery = local_router.load_routes(
            REPO / "knative", {"dispatch-fcm": fcm_url, "cleanup-invalid-tokens": cleanup_url})
        router = local_router.Router(routes, delivery, time_scale=time_scale)
        server = ThreadingHTTPServer(("127.0.0.1", 0), local_router.make_handler(router))
        threading.Thread(target=server.serve_forever, daemon=True).start()
        try:
            yield router, f"http://127.0.0.1:{server.server_address[1]}/"
        finally:
            server.shutdown()
            server.server_close()


def post(url: str, **request: object) -> int:
    import urllib.request

    with urllib.request.urlopen(urllib.request.Request(url, data=request["content"], headers=request["headers"],
                                                       method="POST"), timeout=10) as response:
        return response.status


def wait_for(condition, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


def test_a_ten_minute_provider_outage_loses_nothing(fcm, engine):
    """FCM answers 503 for ten minutes (6 s at a hundredth of the time); the broker's schedule
    (30 s x n) keeps retrying, and once FCM is back the device is woken exactly once."""
    device = fcm.add(engine, "7")
    fcm.fake.script(device.token, "UNAVAILABLE")
    with local_broker(time_scale=0.01) as (_router, url):
        assert post(url, **events.notification(["7"], id_="outage-1")) == 202
        time.sleep(600 * 0.01)
        assert fcm.wakeups(device) == [] and fcm.attempts(device) >= 5
        fcm.fake.script(device.token, "OK")
        assert wait_for(lambda: fcm.wakeups(device) == ["checkEchoV1"], timeout=30)
        time.sleep(0.5)
    assert fcm.wakeups(device) == ["checkEchoV1"]
    assert kept(engine) == []


def test_an_outage_past_every_retry_is_dead_lettered_and_replayed_once(fcm, engine, capsys):
    """Past the whole schedule (105 minutes, 6.3 s at a thousandth) the event is kept as a dead
    letter; replayed once FCM is back, it wakes the device once, and a second replay finds
    nothing left to send."""
    device = fcm.add(engine, "7")
    fcm.fake.script(device.token, "UNAVAILABLE")
    with local_broker(time_scale=0.001) as (_router, url):
        assert post(url, **events.notification(["7"], id_="outage-2")) == 202
        assert wait_for(lambda: len(kept(engine)) == 1, timeout=60)
        (letter,) = kept(engine)
        assert (letter.event_id, letter.error_code) == ("outage-2", 503)
        assert fcm.attempts(device) == 21 and fcm.wakeups(device) == []
        fcm.fake.script(device.token, "OK")
        assert pushctl(["dead-letters", "replay", "--to", url]) == 0
        assert wait_for(lambda: fcm.wakeups(device) == ["checkEchoV1"], timeout=30)
        assert kept(engine) == []
        keep(engine, "outage-2", knativeerrordest="again")  # the same event, dead-lettered again
        assert pushctl(["dead-letters", "replay", "--to", url]) == 0
        time.sleep(0.5)
    assert fcm.wakeups(device) == ["checkEchoV1"]
