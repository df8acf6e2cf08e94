"""scripts/local_router.py, the local broker: routes by knative/'s Triggers, retries as the broker
does, and routes reply events back through itself."""
from __future__ import annotations

import base64
import importlib.util
import json
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from shared.events import NOTIFICATION_REQUESTED, SUBSCRIPTION_INVALID

REPO = Path(__file__).resolve().parent.parent


def _load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


local_router = _load_script("local_router")

FUNCTIONS = ["dispatch-fcm", "dispatch-apns", "dispatch-webpush", "cleanup-invalid-tokens"]


class Receiver:
    """A function stand-in: records what it gets and answers from a script."""

    def __init__(self) -> None:
        self.received: list[tuple[dict[str, str], bytes]] = []
        self.answers: list[tuple[int, dict[str, str], bytes]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                receiver.received.append(({k.lower(): v for k, v in self.headers.items()}, body))
                status, headers, payload = receiver.answers.pop(0) if receiver.answers else (202, {}, b"")
                self.send_response(status)
                for key, value in headers.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/"
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def wait(self, count: int, timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while len(self.received) < count and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(self.received) >= count, f"{len(self.received)} of {count} deliveries arrived"


@pytest.fixture
def receivers():
    started = {name: Receiver() for name in FUNCTIONS}
    yield started
    for receiver in started.values():
        receiver.server.shutdown()
        receiver.server.server_close()


class Waits(list):
    """The router's sleeps, recorded (and shortened to nothing)."""

    def __call__(self, seconds: float) -> None:
        self.append(seconds)


@pytest.fixture
def waits() -> Waits:
    return Waits()


@pytest.fixture
def router(receivers, waits):
    routes, delivery = local_router.load_routes(REPO / "knative", {n: r.url for n, r in receivers.items()})
    return local_router.Router(routes, delivery, sleep=waits)


def event(type_: str, id_: str = "e1", data: dict | None = None) -> local_router.Event:
    return local_router.Event(
        {"specversion": "1.0", "type": type_, "source": "/test", "id": id_, "datacontenttype": "application/json"},
        json.dumps(data or {"users": ["1"], "message_type": "checkEchoV1"}).encode(),
    )


def test_the_routes_are_the_knative_triggers(receivers):
    routes, delivery = local_router.load_routes(REPO / "knative", {n: r.url for n, r in receivers.items()})
    by_type: dict[str, set[str]] = {}
    for route in routes:
        by_type.setdefault(route.attributes["type"], set()).add(route.subscriber)
    assert by_type == {
        NOTIFICATION_REQUESTED: {"dispatch-fcm", "dispatch-apns", "dispatch-webpush"},
        SUBSCRIPTION_INVALID: {"cleanup-invalid-tokens"},
        "dev.knative.sources.ping": {"dispatch-fcm", "dispatch-apns", "dispatch-webpush", "cleanup-invalid-tokens"},
    }
    assert (delivery.retry, delivery.backoff_policy, delivery.backoff_delay, delivery.timeout) == (20, "linear", 30, 120)
    assert delivery.dead_letter == receivers["cleanup-invalid-tokens"].url + "dead-letters"


def test_the_ping_sources_tick_on_their_schedules(receivers, router):
    """The held-work tick goes through the broker to clean-up; the daily expiry straight to it."""
    sources = {p.name: p for p in local_router.load_ping_sources(REPO / "knative", {n: r.url for n, r in receivers.items()})}
    assert set(sources) == {"cleanup-daily", "held-check"}  # privacy-delay is not listed
    at_0315 = time.struct_time((2026, 1, 5, 3, 15, 0, 0, 5, 0))
    at_0317 = time.struct_time((2026, 1, 5, 3, 17, 0, 0, 5, 0))
    assert sources["held-check"].due(at_0315) and not sources["held-check"].due(at_0317)
    assert sources["cleanup-daily"].due(at_0317) and not sources["cleanup-daily"].due(at_0315)
    router.ping(sources["held-check"], at_0315)
    router.ping(sources["cleanup-daily"], at_0317)
    receivers["cleanup-invalid-tokens"].wait(2)
    ticks = sorted(headers.get("ce-pushtick", "") for headers, _ in receivers["cleanup-invalid-tokens"].received)
    assert ticks == ["", "held"]


def test_retries_are_spaced_as_the_kafka_broker_spaces_them():
    """eventing-kafka-broker's computeRetryPolicy: linear waits delay x n, exponential delay x 2^n,
    before retry n."""
    linear = local_router.Delivery(retry=3, backoff_policy="linear", backoff_delay=30)
    assert [linear.delay(n) for n in (1, 2, 3)] == [30, 60, 90]
    exponential = local_router.Delivery(retry=3, backoff_policy="exponential", backoff_delay=2)
    assert [exponential.delay(n) for n in (1, 2, 3)] == [4, 8, 16]


def test_retry_after_is_honoured_up_to_retry_after_max():
    delivery = local_router.Delivery(backoff_policy="linear", backoff_delay=30, retry_after_max=600)
    assert delivery.delay(1, retry_after=300) == 300  # longer than the backoff: waited for
    assert delivery.delay(1, retry_after=5000) == 600  # capped
    assert delivery.delay(3, retry_after=5) == 90  # shorter than the backoff: the backoff
    assert local_router.Delivery(backoff_delay=30, backoff_policy="linear").delay(1, retry_after=300) == 30


def test_the_router_reads_retry_after_max_from_the_retry_after_component():
    _, delivery = local_router.load_routes(REPO / "knative", {})
    assert delivery.retry_after_max == 600


def test_a_flush_tick_trigger_keeps_its_own_retries_and_the_brokers_dead_letter_sink(receivers):
    routes, _ = local_router.load_routes(REPO / "knative", {n: r.url for n, r in receivers.items()})
    (tick,) = [r for r in routes if r.trigger == "flush-tick-to-dispatch-fcm"]
    assert (tick.delivery.retry, tick.delivery.backoff_policy, tick.delivery.backoff_delay) == (2, "linear", 10)
    assert tick.delivery.dead_letter == receivers["cleanup-invalid-tokens"].url + "dead-letters"


def test_an_event_reaches_every_matching_function_in_binary_mode(router, receivers):
    assert router.accept(event(NOTIFICATION_REQUESTED)) == 3
    for name in ("dispatch-fcm", "dispatch-apns", "dispatch-webpush"):
        receivers[name].wait(1)
        headers, body = receivers[name].received[0]
        assert headers["ce-type"] == NOTIFICATION_REQUESTED and headers["ce-id"] == "e1"
        assert headers["content-type"] == "application/json"
        assert json.loads(body)["users"] == ["1"]
    assert receivers["cleanup-invalid-tokens"].received == []


def test_503_and_429_are_retried_and_400_is_not(router, receivers):
    receivers["dispatch-fcm"].answers = [(503, {}, b""), (429, {}, b""), (202, {}, b"")]
    receivers["dispatch-apns"].answers = [(400, {}, b'{"error": {}}')]
    router.accept(event(NOTIFICATION_REQUESTED))
    receivers["dispatch-fcm"].wait(3)
    time.sleep(0.2)
    assert len(receivers["dispatch-apns"].received) == 1


def test_the_router_waits_for_retry_after_as_the_schedule_allows(router, receivers, waits):
    receivers["dispatch-fcm"].answers = [(503, {"Retry-After": "300"}, b""), (429, {"Retry-After": "5"}, b""), (202, {}, b"")]
    router.deliver(next(r for r in router.routes if r.trigger == "notification-to-dispatch-fcm"),
                   event(NOTIFICATION_REQUESTED), 0)
    assert waits == [300, 60]


def test_what_fails_every_retry_goes_to_the_dead_letter_sink_with_the_error(router, receivers, waits):
    receivers["dispatch-webpush"].answers = [(503, {}, b'{"error": {"code": "retry"}}')] * 21
    route = next(r for r in router.routes if r.trigger == "notification-to-dispatch-webpush")
    router.deliver(route, event(NOTIFICATION_REQUESTED, "dead-1"), 0)
    assert len(receivers["dispatch-webpush"].received) == 21  # the first try and 20 retries
    assert sum(waits) == 30 * sum(range(1, 21))  # 105 minutes of the broker's schedule
    (letter_headers, letter_body) = receivers["cleanup-invalid-tokens"].received[-1]
    assert letter_headers["ce-id"] == "dead-1" and letter_headers["ce-type"] == NOTIFICATION_REQUESTED
    assert letter_headers["ce-knativeerrorcode"] == "503"
    assert letter_headers["ce-knativeerrordest"] == route.url
    assert base64.b64decode(letter_headers["ce-knativeerrordata"]) == b'{"error": {"code": "retry"}}'
    assert json.loads(letter_body)["users"] == ["1"]


def test_an_event_refused_for_good_is_not_dead_lettered(router, receivers):
    receivers["dispatch-apns"].answers = [(400, {}, b"{}")]
    router.deliver(next(r for r in router.routes if r.trigger == "notification-to-dispatch-apns"),
                   event(NOTIFICATION_REQUESTED), 0)
    assert receivers["cleanup-invalid-tokens"].received == []


def test_a_2xx_with_a_body_that_is_not_an_event_is_retried(router, receivers):
    receivers["dispatch-webpush"].answers = [(200, {"Content-Type": "text/plain"}, b"OK")]
    router.accept(event(NOTIFICATION_REQUESTED))
    receivers["dispatch-webpush"].wait(2)


def test_a_reply_event_is_routed_again(router, receivers):
    reply_headers = {
        "ce-specversion": "1.0", "ce-type": SUBSCRIPTION_INVALID, "ce-source": "/push-functions/dispatch-webpush",
        "ce-id": "r1", "Content-Type": "application/json",
    }
    receivers["dispatch-webpush"].answers = [(200, reply_headers, b'{"subscriptions": []}')]
    router.accept(event(NOTIFICATION_REQUESTED))
    receivers["cleanup-invalid-tokens"].wait(1)
    headers, body = receivers["cleanup-invalid-tokens"].received[0]
    assert headers["ce-type"] == SUBSCRIPTION_INVALID and headers["ce-id"] == "r1"
    assert json.loads(body) == {"subscriptions": []}


def test_structured_events_are_read_and_non_events_refused():
    structured = json.dumps({
        "specversion": "1.0", "type": "t", "source": "/s", "id": "1", "data": {"a": 1},
    }).encode()
    parsed = local_router.parse_event({"Content-Type": "application/cloudevents+json"}, structured)
    assert parsed.attributes["type"] == "t" and json.loads(parsed.data) == {"a": 1}
    assert parsed.binary()[0]["Content-Type"] == "application/json"
    with pytest.raises(local_router.NotAnEvent):
        local_router.parse_event({"Content-Type": "application/json"}, b"{}")
    with pytest.raises(local_router.NotAnEvent):
        local_router.parse_event({"ce-specversion": "1.0", "ce-type": "t"}, b"")
