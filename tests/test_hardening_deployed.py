"""Issue 14's cases on the functions as deployed: started by the image's command line (the
Dockerfile's CMD: gunicorn, the uvicorn worker of shared/gunicorn_config.py, the function's ASGI
app; tests/deployed.py), spoken to over real connections.

Bounded work per connection (shared/http_protocol.py): a flood of header bytes is cut off at
the head limit without growing the worker, and a request trickling in is cut off with 408 within
the stated bound. Then the probe's Web Push endpoints (refused at subscribe; refused at send time
without a connection when stored before the rules; a redirect not followed) and a token naming
``"123 "``. tests/test_hardening_endpoints.py and tests/test_hardening_user_ids.py hold the
finer cases in process.
"""
from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from shared.db import get_engine
from shared.http_protocol import BODY_TIMEOUT_SECONDS, HEAD_TIMEOUT_SECONDS, LINGER_SECONDS, MAX_HEAD_BYTES
from shared.models import Delivery, Subscription
from tests import events
from tests import subscription_bodies as bodies
from tests.conftest import _migrate
from tests.deployed import Deployed, as_image
from tests.test_hardening_endpoints import PROBED, InternalService, stored_inward_rows, stored_row

FLOOD_BYTES = 300 * 1024 * 1024
#: What a worker may grow by while refusing a flood: buffers, not the flood.
RSS_SLACK_MB = 5.0
#: How much later than its bound a timed-out request may be answered on a loaded machine.
LATE = 8.0


@pytest.fixture(scope="module")
def subscribe(issuer, tmp_path_factory) -> Iterator[Deployed]:
    """subscribe as deployed, on a SQLite database of its own (``.database_url``)."""
    work = tmp_path_factory.mktemp("deployed-subscribe")
    url = f"sqlite:///{work / 'push.sqlite3'}"
    _migrate(url)
    (work / "auth-public.pem").write_text(issuer.public_pem)
    environment = {k: v for k, v in os.environ.items() if not k.startswith("PUSH_")} | {
        "PUSH_DATABASE_URL": url, "PUSH_AUTH_PUBLIC_KEY": str(work / "auth-public.pem"),
        "PUSH_SUBSCRIBE_RATE_LIMIT": "off",
    }
    with as_image("subscribe", environment, work / "subscribe.log") as function:
        function.database_url = url  # type: ignore[attr-defined]
        yield function
    get_engine(url).dispose()


def rows(function: Deployed) -> int:
    with Session(get_engine(function.database_url)) as session:  # type: ignore[attr-defined]
        return session.scalar(select(func.count()).select_from(Subscription))


def read_answer(sock, timeout: float) -> tuple[bytes, float]:
    """Everything the server sends until it closes (or ``timeout``), and when it began."""
    sock.settimeout(timeout)
    received, first = b"", None
    try:
        while chunk := sock.recv(65536):
            first = first or time.monotonic()
            received += chunk
    except OSError:
        pass
    return received, first or time.monotonic()


def status_and_error(answer: bytes) -> tuple[int, dict]:
    assert answer.startswith(b"HTTP/1.1 "), f"no answer, or not HTTP: {answer[:80]!r}"
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), json.loads(body)["error"]


# --- bounded work per connection ----------------------------------------------------------


@pytest.mark.parametrize("shape", ["header_lines", "one_header_value"])
def test_a_300_mb_head_is_cut_off_at_the_limit_without_growing_the_worker(subscribe, shape):
    before = subscribe.worker_rss_mb()
    started = time.monotonic()
    with subscribe.connect(timeout=60) as sock:
        sock.sendall(b"POST / HTTP/1.1\r\nHost: push\r\n" + (b"X-Big: " if shape == "one_header_value" else b""))
        piece = (b"X-Filler: " + b"a" * 1000 + b"\r\n") * 64 if shape == "header_lines" else b"a" * 65536
        sent = 0
        try:
            while sent < FLOOD_BYTES:
                sock.sendall(piece)
                sent += len(piece)
            sock.sendall(b"\r\n\r\n")
        except OSError:
            pass  # the server stopped reading: the cut-off
        answer, _ = read_answer(sock, 30)
    assert status_and_error(answer) == (431, {
        "code": "headers_too_large",
        "message": f"the request line and header fields must total at most {MAX_HEAD_BYTES} bytes",
    })
    assert time.monotonic() - started < 30  # httptools alone spent 114 s on one huge value
    assert subscribe.worker_rss_mb() - before < RSS_SLACK_MB  # it grew by 300 MB, kept
    assert subscribe.request("GET", "/_/health")[0] == 200


def test_a_head_over_the_limit_on_a_kept_alive_connection_is_cut_off_too(subscribe, issuer):
    with subscribe.connect() as sock:
        sock.sendall(b"GET /_/health HTTP/1.1\r\nHost: push\r\n\r\n")
        first = b""
        while not first.endswith(b'{"status":"ok"}'):
            first += sock.recv(4096)
        assert first.startswith(b"HTTP/1.1 200")
        sock.sendall(b"GET / HTTP/1.1\r\nHost: push\r\nX-Filler: " + b"a" * MAX_HEAD_BYTES + b"\r\n\r\n")
        answer, _ = read_answer(sock, 30)
    assert status_and_error(answer) == (431, {
        "code": "headers_too_large",
        "message": f"the request line and header fields must total at most {MAX_HEAD_BYTES} bytes",
    })


def test_a_head_just_under_the_limit_reaches_the_function(subscribe, issuer):
    """The function's own limits (100 fields, 16 KiB of them) then apply as before."""
    status, _ = subscribe.request("GET", "/", headers={**issuer.headers("42"), "X-Filler": "a" * 12000})
    assert status == 200
    status, body = subscribe.request("GET", "/", headers={**issuer.headers("42"), "X-Filler": "a" * 17000})
    assert status == 431
    assert json.loads(body)["error"]["message"] == "the request's header fields must total at most 16384 bytes"


def trickle(sock, data: bytes, every: float, until: float) -> bytes:
    """Send ``data`` a byte every ``every`` seconds until the server answers or ``until`` s
    pass; what it answered."""
    deadline = time.monotonic() + until
    for byte in data:
        try:
            sock.sendall(bytes([byte]))
        except OSError:
            break
        sock.settimeout(every)
        try:
            answer = sock.recv(65536)
        except TimeoutError:
            if time.monotonic() > deadline:
                return b""
            continue
        return answer + read_answer(sock, LINGER_SECONDS + 5)[0]
    return read_answer(sock, 5)[0]


def test_a_body_trickling_a_byte_every_2_s_is_cut_off_with_408(subscribe, issuer):
    body = json.dumps(bodies.fcm()).encode()
    head = (f"POST / HTTP/1.1\r\nHost: push\r\nAuthorization: {issuer.headers('42')['Authorization']}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode()
    before = rows(subscribe)
    with subscribe.connect() as sock:
        sock.sendall(head)
        head_sent = time.monotonic()
        answer = trickle(sock, body, every=2.0, until=BODY_TIMEOUT_SECONDS + LATE)
        elapsed = time.monotonic() - head_sent
    assert status_and_error(answer) == (408, {
        "code": "request_timeout", "message": f"the request body did not arrive within {BODY_TIMEOUT_SECONDS:g} s",
    })
    assert BODY_TIMEOUT_SECONDS - 1 <= elapsed <= BODY_TIMEOUT_SECONDS + LATE
    assert rows(subscribe) == before


def test_a_head_trickling_a_byte_every_2_s_is_cut_off_with_408(subscribe, issuer):
    head = f"GET / HTTP/1.1\r\nHost: push\r\nAuthorization: {issuer.headers('42')['Authorization']}\r\n\r\n"
    with subscribe.connect() as sock:
        opened = time.monotonic()
        answer = trickle(sock, head.encode(), every=2.0, until=HEAD_TIMEOUT_SECONDS + LATE)
        elapsed = time.monotonic() - opened
    assert status_and_error(answer)[0] == 408
    assert HEAD_TIMEOUT_SECONDS - 1 <= elapsed <= HEAD_TIMEOUT_SECONDS + LATE


def test_an_answer_given_before_the_body_arrived_stays_the_only_answer(subscribe):
    """Without a token, subscribe answers 401 at once; the trickle that follows gets no second
    answer, and the connection is closed within the body's bound all the same."""
    with subscribe.connect() as sock:
        sock.sendall(b"POST / HTTP/1.1\r\nHost: push\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n")
        head_sent = time.monotonic()
        answer = trickle(sock, b"x" * 100, every=1.0, until=BODY_TIMEOUT_SECONDS + LATE)
        elapsed = time.monotonic() - head_sent
    assert answer.startswith(b"HTTP/1.1 401") and answer.count(b"HTTP/1.1 ") == 1
    assert elapsed <= BODY_TIMEOUT_SECONDS + LATE


def test_a_slow_but_steady_client_is_served(subscribe, issuer):
    """A phone on a poor link: a subscribe body in pieces over about 2 s."""
    body = json.dumps(bodies.fcm()).encode()
    head = (f"POST / HTTP/1.1\r\nHost: push\r\nAuthorization: {issuer.headers('7')['Authorization']}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode()
    with subscribe.connect() as sock:
        for start in range(0, len(head), 40):
            sock.sendall(head[start:start + 40])
            time.sleep(0.05)
        for start in range(0, len(body), 40):
            sock.sendall(body[start:start + 40])
            time.sleep(0.2)
        sock.settimeout(10)
        answer = sock.recv(65536)
    assert answer.startswith(b"HTTP/1.1 201")


# --- Web Push endpoints and user ids at subscribe --------------------------------------------


@pytest.mark.parametrize("endpoint", PROBED.values(), ids=PROBED.keys())
def test_the_probes_endpoints_are_refused_and_nothing_is_written(subscribe, issuer, endpoint):
    before = rows(subscribe)
    status, body = subscribe.request(
        "POST", "/", json.dumps(bodies.webpush(endpoint)).encode(),
        {**issuer.headers("42"), "Content-Type": "application/json"},
    )
    assert status == 400
    assert json.loads(body)["error"]["field"] == "subscription.endpoint"
    assert rows(subscribe) == before


def test_a_push_service_endpoint_is_accepted(subscribe, issuer):
    status, _ = subscribe.request(
        "POST", "/", json.dumps(bodies.webpush()).encode(), {**issuer.headers("42"), "Content-Type": "application/json"},
    )
    assert status == 201


@pytest.mark.parametrize("sub", ["123 ", " 123", "123\n", "12\x003"])
def test_a_token_naming_a_padded_or_controlled_user_id_is_refused(subscribe, issuer, sub):
    status, body = subscribe.request("GET", "/", headers=issuer.headers(sub))
    assert status == 401 and json.loads(body)["error"]["code"] == "invalid_token"


# --- Web Push endpoints at send time ----------------------------------------------------------


async def test_the_dispatcher_refuses_rows_stored_before_the_rules_and_follows_no_redirect(
    webpush_rig, engine, tmp_path: Path
):
    internal = await InternalService(webpush_rig.fake).start()
    redirecting = await InternalService(webpush_rig.fake).start(
        answer=b"HTTP/1.1 307 Temporary Redirect\r\nLocation: %s\r\nContent-Length: 0\r\n\r\n"
        % webpush_rig.fake.subscribe()["endpoint"].encode()
    )
    refused = stored_inward_rows(engine, internal.port)
    redirected = stored_row(engine, "victim", f"https://localhost:{redirecting.port}/push/x")
    allowed = webpush_rig.add(engine, "victim")
    environment = dict(os.environ) | {
        "PUSH_WEBPUSH_ALLOW_LOCAL_ENDPOINTS": f"localhost:{webpush_rig.fake.port},localhost:{redirecting.port}",
    }
    try:
        with as_image("dispatch-webpush", environment, tmp_path / "dispatch.log") as dispatcher:
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{dispatcher.port}", timeout=30) as client:
                response = await client.post("/", **events.notification(["victim"]))
    finally:
        await internal.stop()
        await redirecting.stop()

    assert response.status_code == 202
    assert internal.connections == 0
    assert redirecting.connections == 1
    assert webpush_rig.wakeups(allowed) == ["checkEchoV1"]
    assert len(webpush_rig.fake.pushes) == 1  # the redirect's target got nothing
    with Session(engine) as session:
        assert session.scalar(select(func.count()).select_from(Subscription)) == len(refused) + 2
        outcomes = {row.subscription_id: (row.state, row.reason) for row in session.scalars(select(Delivery))}
    assert [outcomes[row.id] for row in refused] == [("rejected", "endpoint_not_allowed")] * len(refused)
    assert outcomes[redirected.id] == ("rejected", "http_307")
