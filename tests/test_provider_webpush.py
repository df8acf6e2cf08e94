"""Web Push provider: what it puts on the wire and how it reads every answer.

These drive the real WebPushProvider (its own RFC 8291 encryption and HTTP/1.1 over real TLS)
against the fake push service of fakes/webpush.py, which verifies VAPID and decrypts each
push the way a push service and a browser would, with an independent implementation (http_ece).
"""
from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import socket
import ssl
import struct
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fakes.webpush import HANG, Answer, FakeWebPushService
from shared.config import ConfigError
from shared.core import Device, Outcome, SendResult, WakeUp
from shared.endpoints import EndpointRules
from shared.providers.webpush import WebPushProvider
from shared.vapid import generate_vapid_keys
from tests.connect_proxy import ConnectProxy

KEYS = generate_vapid_keys()
SUBJECT = "mailto:push-ops@example.org"


def local_rules(*ports: int) -> EndpointRules:
    """The production rules, with the local receivers on these ports of localhost allowed."""
    return EndpointRules(local_endpoints=frozenset(("localhost", port) for port in ports))


def make_provider(server: FakeWebPushService, *, also: tuple[int, ...] = (), **settings: Any) -> WebPushProvider:
    """A provider for the fake push service, and for local receivers on the ports ``also``."""
    options: dict[str, Any] = {
        "vapid_private_key": KEYS.private_key,
        "vapid_subject": SUBJECT,
        "ca_file": server.ca_file,
        "timeout_seconds": 5.0,
        "endpoint_rules": local_rules(server.port, *also),
    }
    options.update(settings)
    return WebPushProvider(**options)


@pytest.fixture
async def provider(webpush_server: FakeWebPushService) -> AsyncIterator[WebPushProvider]:
    provider = make_provider(webpush_server)
    yield provider
    await provider.aclose()


def device(subscription: dict[str, Any]) -> Device:
    return Device(id=7, token=json.dumps(subscription))


def wakeup(message_type: str = "notification", ttl_seconds: int = 3600) -> WakeUp:
    return WakeUp(message_type=message_type, ttl_seconds=ttl_seconds)


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unb64url(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --- what goes on the wire -------------------------------------------------------------------


async def test_the_decrypted_payload_is_exactly_the_message_type(provider, webpush_server):
    subscription = webpush_server.subscribe()

    result = await provider.send(device(subscription), wakeup("talk-page-edit"))

    assert result == SendResult(Outcome.DELIVERED)
    [push] = webpush_server.pushes_to(subscription)
    assert push.message() == {"type": "talk-page-edit"}


async def test_the_body_is_one_aes128gcm_record_announcing_4096_octet_records(
    provider, webpush_server
):
    subscription = webpush_server.subscribe()

    await provider.send(device(subscription), wakeup("notification"))

    [push] = webpush_server.pushes
    assert push.body is not None
    # RFC 8188 header: salt (16), record size (4), key id length (1), key id (the sender's key).
    record_size, key_id_length = struct.unpack("!IB", push.body[16:21])
    assert (record_size, key_id_length, push.body[21]) == (4096, 65, 4)
    # One record: the payload, its last-record delimiter, the 16-octet tag.
    assert len(push.body) == 21 + 65 + len(b'{"type":"notification"}') + 1 + 16


async def two_bodies(provider, webpush_server) -> tuple[bytes, bytes]:
    """The encrypted bodies of two pushes of the same wake-up to the same browser."""
    subscription = webpush_server.subscribe()
    for _ in range(2):
        await provider.send(device(subscription), wakeup())
    first, second = (push.body for push in webpush_server.pushes)
    assert first is not None and second is not None
    return first, second


async def test_each_push_is_encrypted_with_a_fresh_salt(provider, webpush_server):
    first, second = await two_bodies(provider, webpush_server)
    assert first[:16] != second[:16]


async def test_each_push_is_encrypted_with_a_fresh_ephemeral_key(provider, webpush_server):
    first, second = await two_bodies(provider, webpush_server)
    assert first[21:86] != second[21:86]


async def test_vapid_header_carries_the_configured_key_and_subject_for_the_endpoint_origin(
    provider, webpush_server
):
    subscription = webpush_server.subscribe(application_server_key=KEYS.public_key)

    await provider.send(device(subscription), wakeup())

    [push] = webpush_server.pushes
    assert push.error is None
    assert push.vapid_key == KEYS.public_key == provider.application_server_key
    assert push.claims is not None
    assert push.claims["sub"] == SUBJECT
    assert push.claims["aud"] == webpush_server.origin
    assert time.time() < push.claims["exp"] <= time.time() + 24 * 3600


async def test_ttl_header_is_the_wakeups_ttl(provider, webpush_server):
    subscription = webpush_server.subscribe()

    await provider.send(device(subscription), wakeup(ttl_seconds=900))

    assert webpush_server.pushes[0].ttl == "900"


async def test_urgency_header_is_normal_by_default(provider, webpush_server):
    await provider.send(device(webpush_server.subscribe()), wakeup())

    assert webpush_server.pushes[0].urgency == "normal"


async def test_urgency_header_follows_the_setting(webpush_server):
    provider = make_provider(webpush_server, urgency="high")
    try:
        await provider.send(device(webpush_server.subscribe()), wakeup())
    finally:
        await provider.aclose()

    assert webpush_server.pushes[0].urgency == "high"


async def test_topic_header_is_the_message_type_so_a_newer_wakeup_replaces_a_pending_one(
    provider, webpush_server
):
    await provider.send(device(webpush_server.subscribe()), wakeup("notification"))

    assert webpush_server.pushes[0].topic == "notification"


async def test_a_message_type_that_is_no_valid_topic_gets_a_stable_valid_topic(
    provider, webpush_server
):
    subscription = webpush_server.subscribe()
    message_type = "wiki.edit:talk page"  # '.', ':' and ' ' are not allowed in a Topic

    first = await provider.send(device(subscription), wakeup(message_type))
    second = await provider.send(device(subscription), wakeup(message_type))

    assert first.outcome is second.outcome is Outcome.DELIVERED
    topics = {push.topic for push in webpush_server.pushes}
    assert len(topics) == 1 and None not in topics
    assert webpush_server.pushes[0].message() == {"type": message_type}


# --- reuse -----------------------------------------------------------------------------------


async def test_the_vapid_header_is_signed_once_per_origin_and_reused(provider, webpush_server):
    first, second = webpush_server.subscribe(), webpush_server.subscribe()

    for subscription in (first, second, first, second, first):
        assert (await provider.send(device(subscription), wakeup())).outcome is Outcome.DELIVERED

    assert len({push.vapid_token for push in webpush_server.pushes}) == 1


async def test_each_origin_gets_its_own_vapid_header(webpush_server):
    with FakeWebPushService(ca=webpush_server.ca) as other_service:
        provider = make_provider(webpush_server, also=(other_service.port,))
        here, there = webpush_server.subscribe(), other_service.subscribe()

        assert (await provider.send(device(here), wakeup())).outcome is Outcome.DELIVERED
        assert (await provider.send(device(there), wakeup())).outcome is Outcome.DELIVERED

        assert other_service.pushes[0].claims["aud"] == other_service.origin
        assert webpush_server.pushes[0].claims["aud"] == webpush_server.origin
        await provider.aclose()


async def test_consecutive_sends_reuse_one_connection(provider, webpush_server):
    subscription = webpush_server.subscribe()

    for _ in range(3):
        await provider.send(device(subscription), wakeup())

    assert len({push.client_port for push in webpush_server.pushes}) == 1


async def test_aclose_closes_the_connections_and_a_later_send_opens_new_ones(
    provider, webpush_server
):
    subscription = webpush_server.subscribe()

    await provider.send(device(subscription), wakeup())
    await provider.aclose()
    result = await provider.send(device(subscription), wakeup())

    assert result.outcome is Outcome.DELIVERED
    first, second = webpush_server.pushes
    assert first.client_port != second.client_port


async def test_a_connection_the_push_service_closed_is_replaced_by_a_new_one(
    provider, webpush_server
):
    """An HTTP/2 push service says GOAWAY before it closes an idle connection."""
    subscription = webpush_server.subscribe()
    await provider.send(device(subscription), wakeup())

    webpush_server.goaway()
    webpush_server.drop_connections()
    result = await provider.send(device(subscription), wakeup())

    assert result == SendResult(Outcome.DELIVERED)
    first, second = webpush_server.pushes
    assert first.client_port != second.client_port


async def test_an_http1_connection_the_push_service_closed_is_replaced_by_a_new_one():
    """HTTP/1.1 has no GOAWAY: a kept-alive connection closed just before it carried the push
    got none of it, and the push goes again once on a new connection."""
    with FakeWebPushService(http2=False) as http1_service:
        provider = make_provider(http1_service)
        subscription = http1_service.subscribe()
        try:
            await provider.send(device(subscription), wakeup())
            http1_service.drop_connections()
            result = await provider.send(device(subscription), wakeup())
        finally:
            await provider.aclose()

        assert result == SendResult(Outcome.DELIVERED)
        first, second = http1_service.pushes
        assert first.client_port != second.client_port


@pytest.mark.parametrize("http2", [True, False])
async def test_pushes_go_over_http2_when_the_push_service_agrees_and_http1_otherwise(http2):
    with FakeWebPushService(http2=http2) as service:
        provider = make_provider(service)
        subscription = service.subscribe()
        try:
            results = await asyncio.gather(
                *(provider.send(device(subscription), wakeup()) for _ in range(20)))
        finally:
            await provider.aclose()

        assert {r.outcome for r in results} == {Outcome.DELIVERED}
        counts = service.counts
        assert counts.pushes_accepted == 20
        if http2:
            assert (counts.connections_made, counts.http1_connections) == (1, 0)
        else:  # ALPN chose HTTP/1.1 on the first connection: one request at a time on each
            assert counts.http1_connections == counts.connections_made > 1


# --- classifying answers ---------------------------------------------------------------------


@pytest.mark.parametrize("status", [404, 410])
async def test_a_gone_subscription_is_dead(provider, webpush_server, status):
    subscription = webpush_server.subscribe()
    webpush_server.script(subscription, status)

    result = await provider.send(device(subscription), wakeup())

    assert result == SendResult(Outcome.DEAD, f"http_{status}")


async def test_429_is_a_transient_rate_limit_with_retry_after_in_seconds(provider, webpush_server):
    subscription = webpush_server.subscribe()
    webpush_server.script(subscription, Answer(429, retry_after="7"))

    result = await provider.send(device(subscription), wakeup())

    assert result == SendResult(Outcome.TRANSIENT, "http_429", retry_after=7.0, rate_limited=True)


async def test_retry_after_as_an_http_date_becomes_seconds_from_now(provider, webpush_server):
    subscription = webpush_server.subscribe()
    later = format_datetime(datetime.now(UTC) + timedelta(seconds=120), usegmt=True)
    webpush_server.script(subscription, Answer(503, retry_after=later))

    result = await provider.send(device(subscription), wakeup())

    assert result.outcome is Outcome.TRANSIENT and result.reason == "http_503"
    assert result.retry_after is not None and 60 < result.retry_after <= 120


@pytest.mark.parametrize("status", [500, 503])
async def test_server_errors_are_transient_while_they_last(provider, webpush_server, status):
    subscription = webpush_server.subscribe()
    webpush_server.script(subscription, then=status)

    results = [await provider.send(device(subscription), wakeup()) for _ in range(2)]

    assert results == [SendResult(Outcome.TRANSIENT, f"http_{status}")] * 2


async def test_a_push_retried_after_a_503_is_delivered(provider, webpush_server):
    subscription = webpush_server.subscribe()
    webpush_server.script(subscription, 503, 201)

    first = await provider.send(device(subscription), wakeup())
    second = await provider.send(device(subscription), wakeup())

    assert (first.outcome, second.outcome) == (Outcome.TRANSIENT, Outcome.DELIVERED)
    assert [push.status for push in webpush_server.pushes] == [503, 201]


@pytest.mark.parametrize("status", [400, 413, 422])
async def test_other_client_errors_are_rejected(provider, webpush_server, status):
    subscription = webpush_server.subscribe()
    webpush_server.script(subscription, status)

    result = await provider.send(device(subscription), wakeup())

    assert result == SendResult(Outcome.REJECTED, f"http_{status}")


@pytest.mark.parametrize("status", [401, 403])
async def test_the_push_service_refusing_our_vapid_header_is_our_key_refused(provider, webpush_server, status):
    """Whose fault (this subscription's or our key's) is for the hold gate to find out."""
    subscription = webpush_server.subscribe()
    webpush_server.script(subscription, status)

    result = await provider.send(device(subscription), wakeup())

    assert result == SendResult(Outcome.KEY_REFUSED, f"http_{status}")


@pytest.mark.parametrize("status", [403, 401])  # as FCM and Apple answer a mismatch; as Mozilla does
async def test_a_vapid_key_other_than_the_subscriptions_is_our_key_refused(provider, webpush_server, status):
    """RFC 8292 section 4.2: a subscription is bound to the key it was made with."""
    webpush_server.key_mismatch_status = status
    subscription = webpush_server.subscribe(application_server_key=generate_vapid_keys().public_key)

    result = await provider.send(device(subscription), wakeup())

    assert result == SendResult(Outcome.KEY_REFUSED, f"http_{status}")


def _replace_keys(**keys: str | None) -> Callable[[dict[str, Any]], str]:
    def token(subscription: dict[str, Any]) -> str:
        return json.dumps({**subscription, "keys": {**subscription["keys"], **keys}})

    return token


def _replace_endpoint(endpoint: str) -> Callable[[dict[str, Any]], str]:
    return lambda subscription: json.dumps({**subscription, "endpoint": endpoint})


UNUSABLE_SUBSCRIPTIONS = [
    pytest.param(lambda s: "not json", id="not-json"),
    pytest.param(lambda s: json.dumps([s]), id="not-an-object"),
    pytest.param(lambda s: json.dumps({"endpoint": s["endpoint"]}), id="no-keys"),
    pytest.param(_replace_keys(auth=None), id="no-auth"),
    pytest.param(_replace_keys(p256dh="not base64!"), id="p256dh-not-base64url"),
    pytest.param(_replace_keys(p256dh=b64url(b"\x04" + bytes(64))), id="p256dh-not-on-curve"),
    pytest.param(_replace_keys(p256dh=b64url(bytes(32))), id="p256dh-wrong-length"),
    pytest.param(_replace_keys(auth=b64url(bytes(8))), id="auth-wrong-length"),
    pytest.param(_replace_endpoint("http://localhost/push/x"), id="endpoint-not-https"),
    pytest.param(_replace_endpoint("https:///push/x"), id="endpoint-without-host"),
    pytest.param(_replace_endpoint("https://push.exa mple.org/x"), id="endpoint-bad-host"),
    pytest.param(_replace_endpoint("https://localhost:99999/push/x"), id="endpoint-bad-port"),
]


@pytest.mark.parametrize("make_token", UNUSABLE_SUBSCRIPTIONS)
async def test_an_unusable_subscription_is_dead_and_nothing_is_sent(
    provider, webpush_server, make_token
):
    token = make_token(webpush_server.subscribe())

    result = await provider.send(Device(id=7, token=token), wakeup())

    assert result == SendResult(Outcome.DEAD, "invalid_subscription")
    assert webpush_server.pushes == []


async def test_a_hanging_push_service_is_transient_within_the_configured_timeout(webpush_server):
    subscription = webpush_server.subscribe()
    webpush_server.script(subscription, HANG)
    provider = make_provider(webpush_server, timeout_seconds=0.3)
    started = time.monotonic()
    try:
        result = await provider.send(device(subscription), wakeup())
    finally:
        await provider.aclose()
        # aiohttp closes a timed-out connection with a TLS close handshake it does not wait
        # for: let it finish before pytest-asyncio closes the loop (else a ResourceWarning).
        await asyncio.sleep(0.05)

    assert result == SendResult(Outcome.TRANSIENT, "timeout")
    assert time.monotonic() - started < 5
    assert [push.status for push in webpush_server.pushes] == [None]


async def test_an_unreachable_endpoint_is_transient(webpush_server):
    port = free_port()
    provider = make_provider(webpush_server, also=(port,))
    subscription = webpush_server.subscribe()
    subscription["endpoint"] = f"https://localhost:{port}/push/gone"

    result = await provider.send(device(subscription), wakeup())
    await provider.aclose()

    assert result == SendResult(Outcome.TRANSIENT, "connection_error")


async def test_a_push_service_with_an_untrusted_certificate_is_transient(webpush_server):
    provider = make_provider(webpush_server, ca_file=None)
    try:
        result = await provider.send(device(webpush_server.subscribe()), wakeup())
    finally:
        await provider.aclose()

    assert result == SendResult(Outcome.TRANSIENT, "tls_error")
    assert webpush_server.pushes == []


async def test_an_answer_that_is_not_http_is_transient(webpush_server):
    """A push service (or something in between) answering garbage: nothing to classify."""
    server_ssl = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    webpush_server.ca.issue_cert("localhost").configure_cert(server_ssl)

    async def answer_garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"NOT HTTP AT ALL\r\n\r\n")
        await writer.drain()

    server = await asyncio.start_server(answer_garbage, "127.0.0.1", 0, ssl=server_ssl)
    port = server.sockets[0].getsockname()[1]
    provider = make_provider(webpush_server, also=(port,))
    subscription = webpush_server.subscribe()
    subscription["endpoint"] = f"https://localhost:{port}/push/x"
    try:
        result = await provider.send(device(subscription), wakeup())
    finally:
        await provider.aclose()
        server.close()
        await server.wait_closed()

    assert result == SendResult(Outcome.TRANSIENT, "unreadable_response")


# --- dry run ---------------------------------------------------------------------------------


async def test_a_dry_run_sends_nothing_and_counts_as_delivered(provider, webpush_server):
    subscription = webpush_server.subscribe()

    result = await provider.send(device(subscription), WakeUp("notification", 60, dry_run=True))

    assert result == SendResult(Outcome.DELIVERED, "dry_run")
    assert webpush_server.pushes == []


async def test_a_dry_run_still_reports_an_unusable_subscription_as_dead(provider):
    result = await provider.send(Device(id=7, token="{}"), WakeUp("notification", 60, dry_run=True))

    assert result == SendResult(Outcome.DEAD, "invalid_subscription")


# --- logs ------------------------------------------------------------------------------------


async def test_logs_never_show_the_endpoint_or_the_keys(webpush_server, caplog):
    caplog.set_level(logging.DEBUG)
    port = free_port()
    provider = make_provider(webpush_server, also=(port,))
    subscription = webpush_server.subscribe()
    webpush_server.script(subscription, 400, 503, 410)
    unreachable = {**subscription, "endpoint": f"https://localhost:{port}/push/gone"}
    refused = {**subscription, "endpoint": "https://10.1.2.3/push/x"}
    broken = {**subscription, "keys": {**subscription["keys"], "auth": "x"}}

    for target in (subscription, subscription, subscription, subscription, unreachable, refused, broken):
        await provider.send(device(target), wakeup())
    await provider.aclose()

    assert "device 7" in caplog.text  # the failures were logged, by device id
    for secret in (
        subscription["endpoint"],
        subscription["endpoint"].rsplit("/", 1)[1],
        subscription["keys"]["p256dh"],
        subscription["keys"]["auth"],
        f"localhost:{webpush_server.port}",
        unreachable["endpoint"].split("/")[2],
        "10.1.2.3",
        KEYS.private_key,
    ):
        assert secret not in caplog.text


# --- configuration ---------------------------------------------------------------------------


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    """No PUSH_* variables, and an empty secrets directory instead of the OpenFaaS one."""
    for name in list(os.environ):
        if name.startswith("PUSH_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("PUSH_SECRETS_DIR", str(tmp_path / "secrets"))
    return monkeypatch


def _private_key() -> ec.EllipticCurvePrivateKey:
    return ec.derive_private_key(int.from_bytes(unb64url(KEYS.private_key), "big"), ec.SECP256R1())


def _pem(private_format: serialization.PrivateFormat) -> str:
    return _private_key().private_bytes(
        serialization.Encoding.PEM, private_format, serialization.NoEncryption()
    ).decode()


@pytest.mark.parametrize(
    "key_text",
    [
        pytest.param(KEYS.private_key, id="raw-base64url"),
        pytest.param(_pem(serialization.PrivateFormat.PKCS8), id="pkcs8-pem"),
        pytest.param(_pem(serialization.PrivateFormat.TraditionalOpenSSL), id="sec1-pem"),
    ],
)
async def test_from_env_accepts_the_private_key_raw_or_as_pem(clean_env, webpush_server, key_text):
    clean_env.setenv("PUSH_VAPID_PRIVATE_KEY", key_text)
    clean_env.setenv("PUSH_VAPID_SUBJECT", SUBJECT)
    clean_env.setenv("PUSH_WEBPUSH_CA_FILE", webpush_server.ca_file)
    clean_env.setenv("PUSH_WEBPUSH_ALLOW_LOCAL_ENDPOINTS", f"localhost:{webpush_server.port}")

    provider = WebPushProvider.from_env()
    try:
        result = await provider.send(device(webpush_server.subscribe()), wakeup())
    finally:
        await provider.aclose()

    assert result.outcome is Outcome.DELIVERED
    assert webpush_server.pushes[0].vapid_key == KEYS.public_key


async def test_from_env_reads_a_pem_key_file_and_the_urgency(clean_env, webpush_server, tmp_path):
    key_file = tmp_path / "vapid.pem"
    key_file.write_text(_pem(serialization.PrivateFormat.PKCS8))
    clean_env.setenv("PUSH_VAPID_PRIVATE_KEY_FILE", str(key_file))
    clean_env.setenv("PUSH_VAPID_SUBJECT", "https://wiki.example.org/push-contact")
    clean_env.setenv("PUSH_WEBPUSH_CA_FILE", webpush_server.ca_file)
    clean_env.setenv("PUSH_WEBPUSH_URGENCY", "low")
    clean_env.setenv("PUSH_WEBPUSH_ALLOW_LOCAL_ENDPOINTS", f"localhost:{webpush_server.port}")

    provider = WebPushProvider.from_env()
    try:
        await provider.send(device(webpush_server.subscribe()), wakeup())
    finally:
        await provider.aclose()

    [push] = webpush_server.pushes
    assert (push.vapid_key, push.urgency) == (KEYS.public_key, "low")
    assert push.claims["sub"] == "https://wiki.example.org/push-contact"


VALID_ENV = {"PUSH_VAPID_PRIVATE_KEY": KEYS.private_key, "PUSH_VAPID_SUBJECT": SUBJECT}


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("PUSH_VAPID_PRIVATE_KEY", None),
        ("PUSH_VAPID_PRIVATE_KEY", "not a key at all"),
        ("PUSH_VAPID_PRIVATE_KEY", b64url(bytes(range(31)))),
        ("PUSH_VAPID_PRIVATE_KEY", b64url(bytes(32))),
        ("PUSH_VAPID_PRIVATE_KEY", "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----"),
        (
            "PUSH_VAPID_PRIVATE_KEY",
            ec.generate_private_key(ec.SECP384R1())
            .private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
            .decode(),
        ),
        ("PUSH_VAPID_SUBJECT", None),
        ("PUSH_VAPID_SUBJECT", "push-ops@example.org"),
        ("PUSH_VAPID_SUBJECT", "http://example.org"),
        ("PUSH_VAPID_SUBJECT", "mailto:nobody"),
        ("PUSH_WEBPUSH_URGENCY", "urgent"),
        ("PUSH_WEBPUSH_TIMEOUT_SECONDS", "soon"),
        ("PUSH_WEBPUSH_TIMEOUT_SECONDS", "0"),
        ("PUSH_WEBPUSH_MAX_CONNECTIONS", "0"),
        ("PUSH_WEBPUSH_CA_FILE", "/nonexistent/ca.pem"),
        ("PUSH_WEBPUSH_ALLOWED_HOSTS", "10.0.0.1"),
        ("PUSH_WEBPUSH_ALLOWED_HOSTS", "push.example.net:8443"),
        ("PUSH_WEBPUSH_ALLOW_LOCAL_ENDPOINTS", "localhost"),
        ("PUSH_WEBPUSH_ALLOW_LOCAL_ENDPOINTS", "*:8090"),
    ],
    ids=lambda value: value if value is None or len(value) < 30 else value[:27] + "...",
)
def test_from_env_errors_name_the_variable(clean_env, variable, value):
    for name, good in VALID_ENV.items():
        clean_env.setenv(name, good)
    if value is None:
        clean_env.delenv(variable)
    else:
        clean_env.setenv(variable, value)

    with pytest.raises(ConfigError, match=variable):
        WebPushProvider.from_env()


def test_a_bad_private_key_is_not_echoed_in_the_error(clean_env):
    wrong_length_key = b64url(bytes(range(1, 34)))
    clean_env.setenv("PUSH_VAPID_PRIVATE_KEY", wrong_length_key)
    clean_env.setenv("PUSH_VAPID_SUBJECT", SUBJECT)

    with pytest.raises(ConfigError) as error:
        WebPushProvider.from_env()

    assert wrong_length_key not in str(error.value)


# --- key generation --------------------------------------------------------------------------


def test_generated_vapid_keys_are_a_raw_private_key_and_its_uncompressed_public_point():
    keys = generate_vapid_keys()

    private = unb64url(keys.private_key)
    public = unb64url(keys.public_key)
    assert len(private) == 32
    assert len(public) == 65 and public[0] == 4
    derived = ec.derive_private_key(int.from_bytes(private, "big"), ec.SECP256R1())
    assert derived.public_key().public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    ) == public
    assert "=" not in keys.private_key + keys.public_key


# --- forward proxies -------------------------------------------------------------------------


async def test_pushes_go_through_the_https_proxy_the_environment_names(
        webpush_server, connect_proxy: ConnectProxy, monkeypatch):
    monkeypatch.setenv("HTTPS_PROXY", connect_proxy.url)
    subscription = webpush_server.subscribe()
    provider = make_provider(webpush_server)
    try:
        result = await provider.send(device(subscription), wakeup())
    finally:
        await provider.aclose()

    assert result.outcome is Outcome.DELIVERED
    # The endpoint's name, resolved and checked here (shared/endpoints.py), not by the proxy.
    assert connect_proxy.tunnels == [f"127.0.0.1:{webpush_server.port}"]
    assert webpush_server.pushes[0].message() == {"type": "notification"}


def test_a_proxy_url_that_is_not_http_is_a_config_error(webpush_server, monkeypatch):
    monkeypatch.setenv("HTTPS_PROXY", "socks5://127.0.0.1:1080")
    with pytest.raises(ConfigError, match="HTTPS_PROXY"):
        make_provider(webpush_server)


async def test_through_a_proxy_the_tunnel_goes_to_the_address_the_endpoint_rules_checked(
        webpush_server, connect_proxy: ConnectProxy, monkeypatch):
    """HTTPS_PROXY does not hand the name to the proxy to resolve: the guard against endpoints
    that lead inward (shared/endpoints.py) still chooses the address."""
    from shared.endpoints import EndpointRules

    asked: list[str] = []

    async def resolve(host: str, port: int) -> list[str]:
        asked.append(host)
        return ["127.0.0.1"]

    monkeypatch.setenv("HTTPS_PROXY", connect_proxy.url)
    rules = EndpointRules(local_endpoints=frozenset({("localhost", webpush_server.port)}),
                          resolver=resolve)
    subscription = webpush_server.subscribe()
    provider = make_provider(webpush_server, endpoint_rules=rules)
    try:
        result = await provider.send(device(subscription), wakeup())
    finally:
        await provider.aclose()

    assert result.outcome is Outcome.DELIVERED
    assert connect_proxy.tunnels == [f"127.0.0.1:{webpush_server.port}"]
    assert asked == ["localhost"]
