"""The APNs provider, driven over real HTTP/2 + TLS (the project's HTTP/2 client) against the fake
APNs server."""
from __future__ import annotations

import asyncio
import gc
import logging
import socket
import time
import warnings
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from fakes.apns import FakeApns, make_p8_key
from fakes.server import Network
from shared.config import ConfigError
from shared.core import Device, Outcome, SendResult, WakeUp
from shared.providers.apns import ApnsProvider
from tests.connect_proxy import ConnectProxy

TOKEN = "a1" * 32
OTHER_TOKEN = "b2" * 32
TOPIC = "org.example.wiki"
WAKEUP = WakeUp(message_type="notification", ttl_seconds=3600)


def device(token: str = TOKEN, environment: str | None = "production") -> Device:
    return Device(id=1, token=token, topic=TOPIC, environment=environment)


def make_provider(fake: FakeApns, **overrides: object) -> ApnsProvider:
    settings: dict[str, object] = {
        "key": fake.key_pem,
        "key_id": fake.key_id,
        "team_id": fake.team_id,
        "production_url": fake.base_url,
        "sandbox_url": fake.base_url,
        "ca_file": fake.ca_path,
        "timeout_seconds": 5.0,
    }
    settings.update(overrides)
    return ApnsProvider(**settings)  # type: ignore[arg-type]


@pytest.fixture
async def provider(apns_server: FakeApns) -> AsyncIterator[ApnsProvider]:  # noqa: F811
    built = make_provider(apns_server)
    yield built
    await built.aclose()


async def eventually(condition: Callable[[], bool]) -> None:
    deadline = time.monotonic() + 5
    while not condition():
        assert time.monotonic() < deadline, "condition not met within 5 s"
        await asyncio.sleep(0.01)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


# -- what goes on the wire -------------------------------------------------------------------------


async def test_delivered_wakeup_is_an_immediate_alert_with_the_message_type_only(
    provider: ApnsProvider, apns_server: FakeApns  # noqa: F811
) -> None:
    before = int(time.time())

    result = await provider.send(device(), WAKEUP)

    assert result.outcome is Outcome.DELIVERED
    [request] = apns_server.requests
    assert request.headers[":method"] == "POST"
    assert request.headers[":path"] == f"/3/device/{TOKEN}"
    assert request.headers["apns-topic"] == TOPIC
    assert request.headers["apns-push-type"] == "alert"
    assert request.headers["apns-priority"] == "10"
    assert request.headers["apns-collapse-id"] == "notification"
    expiration = int(request.headers["apns-expiration"])
    assert before + 3600 <= expiration <= int(time.time()) + 3600
    assert request.body == {
        "aps": {"alert": "notification", "mutable-content": 1, "thread-id": "notification"},
        "data": {"type": "notification"},
    }


async def test_requests_carry_an_es256_provider_token_for_the_key_and_team(
    provider: ApnsProvider, apns_server: FakeApns  # noqa: F811
) -> None:
    await provider.send(device(), WAKEUP)

    [request] = apns_server.requests
    scheme, token = request.headers["authorization"].split(" ")
    assert scheme == "bearer"
    header = jwt.get_unverified_header(token)
    assert (header["alg"], header["kid"]) == ("ES256", apns_server.key_id)
    public_key = serialization.load_pem_private_key(apns_server.key_pem.encode(), None).public_key()
    claims = jwt.decode(token, public_key, algorithms=["ES256"])  # type: ignore[arg-type]
    assert claims["iss"] == apns_server.team_id
    assert abs(claims["iat"] - time.time()) < 60


async def test_sandbox_devices_go_to_the_sandbox_endpoint(apns_server: FakeApns) -> None:  # noqa: F811
    with FakeApns(key_pem=apns_server.key_pem) as sandbox:
        provider = make_provider(apns_server, sandbox_url=sandbox.base_url)
        try:
            result = await provider.send(device(environment="sandbox"), WAKEUP)
        finally:
            await provider.aclose()

        assert result.outcome is Outcome.DELIVERED
        assert [r.token for r in sandbox.requests] == [TOKEN]
        assert apns_server.requests == []


@pytest.mark.parametrize("environment", ["production", None, "anything-else"])
async def test_other_devices_go_to_the_production_endpoint(
    apns_server: FakeApns, environment: str | None  # noqa: F811
) -> None:
    with FakeApns(key_pem=apns_server.key_pem) as sandbox:
        provider = make_provider(apns_server, sandbox_url=sandbox.base_url)
        try:
            result = await provider.send(device(environment=environment), WAKEUP)
        finally:
            await provider.aclose()

        assert result.outcome is Outcome.DELIVERED
        assert [r.token for r in apns_server.requests] == [TOKEN]
        assert sandbox.requests == []


async def test_dry_run_sends_nothing_and_counts_as_delivered(
    provider: ApnsProvider, apns_server: FakeApns  # noqa: F811
) -> None:
    result = await provider.send(device(), WakeUp("notification", 3600, dry_run=True))

    assert (result.outcome, result.reason) == (Outcome.DELIVERED, "dry_run")
    assert apns_server.request_count == 0
    assert apns_server.connections_made == 0


async def test_one_connection_serves_successive_sends(
    provider: ApnsProvider, apns_server: FakeApns  # noqa: F811
) -> None:
    first = await provider.send(device(TOKEN), WAKEUP)
    second = await provider.send(device(OTHER_TOKEN), WAKEUP)

    assert first.outcome is second.outcome is Outcome.DELIVERED
    assert apns_server.connections_made == 1


async def test_concurrent_sends_are_multiplexed_once_apple_raises_the_stream_limit() -> None:
    """A connection starts at one stream (as Apple's do) and takes many once its first request
    is accepted; the pool opens one spare connection meanwhile, no more."""
    tokens = [f"{n:064x}" for n in range(50)]
    with FakeApns(network=Network(rtt=0.05, max_concurrent_streams=1)) as fake:
        provider = make_provider(fake)
        try:
            results = await asyncio.gather(*(provider.send(device(t), WAKEUP) for t in tokens))
        finally:
            await provider.aclose()

        assert {r.outcome for r in results} == {Outcome.DELIVERED}
        assert sorted(r.token for r in fake.requests) == sorted(tokens)
        assert fake.connections_made <= 2
        assert fake.peak_streams > 10


async def test_closed_provider_reconnects_on_the_next_send(
    provider: ApnsProvider, apns_server: FakeApns  # noqa: F811
) -> None:
    await provider.send(device(), WAKEUP)
    await provider.aclose()

    result = await provider.send(device(), WAKEUP)

    assert result.outcome is Outcome.DELIVERED
    assert apns_server.connections_made == 2


def test_provider_keeps_working_when_used_from_a_new_event_loop(
    apns_server: FakeApns,  # noqa: F811
) -> None:
    provider = make_provider(apns_server)

    async def send_and_close() -> SendResult:
        try:
            return await provider.send(device(), WAKEUP)
        finally:
            await provider.aclose()

    first = asyncio.run(provider.send(device(), WAKEUP))  # its connection dies with its loop
    second = asyncio.run(send_and_close())

    assert first.outcome is second.outcome is Outcome.DELIVERED
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        gc.collect()  # the first loop's abandoned socket, now rather than in some later test


# -- how answers are classified ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "reason"),
    [
        (410, "Unregistered"),
        (410, "ExpiredToken"),
        (400, "BadDeviceToken"),
        (400, "DeviceTokenNotForTopic"),
    ],
)
async def test_tokens_apple_no_longer_accepts_are_dead(
    provider: ApnsProvider, apns_server: FakeApns, status: int, reason: str  # noqa: F811
) -> None:
    apns_server.respond(TOKEN, status, reason)

    result = await provider.send(device(), WAKEUP)

    assert (result.outcome, result.reason) == (Outcome.DEAD, reason)


@pytest.mark.parametrize(
    ("status", "reason"),
    [
        (429, "TooManyRequests"),
        (429, "TooManyProviderTokenUpdates"),
        (500, "InternalServerError"),
        (503, "ServiceUnavailable"),
        (503, "Shutdown"),
    ],
)
async def test_throttling_and_server_errors_are_transient(
    provider: ApnsProvider, apns_server: FakeApns, status: int, reason: str  # noqa: F811
) -> None:
    apns_server.respond(TOKEN, status, reason)

    result = await provider.send(device(), WAKEUP)

    assert (result.outcome, result.reason) == (Outcome.TRANSIENT, reason)


@pytest.mark.parametrize(
    ("status", "reason", "rate_limited"),
    [
        (429, "TooManyRequests", True),
        (429, "TooManyProviderTokenUpdates", True),
        (503, "ServiceUnavailable", False),
    ],
)
async def test_only_a_429_says_it_is_a_rate_limit(
    provider: ApnsProvider, apns_server: FakeApns, status: int, reason: str, rate_limited: bool  # noqa: F811
) -> None:
    apns_server.respond(TOKEN, status, reason)

    result = await provider.send(device(), WAKEUP)

    assert result.rate_limited is rate_limited


async def test_a_retry_after_apple_sends_is_reported(
    provider: ApnsProvider, apns_server: FakeApns  # noqa: F811
) -> None:
    apns_server.respond(TOKEN, 429, "TooManyRequests", retry_after=30)

    result = await provider.send(device(), WAKEUP)

    assert (result.outcome, result.retry_after) == (Outcome.TRANSIENT, 30)


async def test_expired_provider_token_is_transient(
    provider: ApnsProvider, apns_server: FakeApns  # noqa: F811
) -> None:
    apns_server.clock_offset = 3601  # every token the provider signs now looks an hour old

    result = await provider.send(device(), WAKEUP)

    assert (result.outcome, result.reason) == (Outcome.TRANSIENT, "ExpiredProviderToken")


@pytest.mark.parametrize(
    "override",
    [{"key": make_p8_key()}, {"key_id": "OTHERKEY99"}, {"team_id": "OTHERTEAM9"}],
    ids=["other-key", "other-key-id", "other-team"],
)
async def test_provider_token_apple_cannot_verify_is_our_credentials(
    apns_server: FakeApns, override: dict[str, str]  # noqa: F811
) -> None:
    provider = make_provider(apns_server, **override)
    try:
        result = await provider.send(device(), WAKEUP)
    finally:
        await provider.aclose()

    assert (result.outcome, result.reason) == (Outcome.CREDENTIALS, "InvalidProviderToken")


@pytest.mark.parametrize("reason", [
    "BadCertificate", "BadCertificateEnvironment", "Forbidden", "MissingProviderToken",
    "UnrelatedKeyIdInToken", "BadEnvironmentKeyInToken"])
async def test_apples_other_refusals_of_our_authentication_are_our_credentials(
    provider: ApnsProvider, apns_server: FakeApns, reason: str  # noqa: F811
) -> None:
    apns_server.respond(TOKEN, 403, reason)

    result = await provider.send(device(), WAKEUP)

    assert (result.outcome, result.reason) == (Outcome.CREDENTIALS, reason)


@pytest.mark.parametrize(
    ("status", "reason"),
    [
        (400, "BadTopic"),
        (400, "TopicDisallowed"),
        (400, "MissingTopic"),
        (400, "BadCollapseId"),
        (413, "PayloadTooLarge"),
    ],
)
async def test_other_client_errors_are_rejected(
    provider: ApnsProvider, apns_server: FakeApns, status: int, reason: str  # noqa: F811
) -> None:
    apns_server.respond(TOKEN, status, reason)

    result = await provider.send(device(), WAKEUP)

    assert (result.outcome, result.reason) == (Outcome.REJECTED, reason)


@pytest.mark.parametrize(
    ("status", "outcome"),
    [(502, Outcome.TRANSIENT), (400, Outcome.REJECTED), (410, Outcome.DEAD)],
)
async def test_error_without_a_reason_body_is_classified_by_its_status(
    provider: ApnsProvider, apns_server: FakeApns, status: int, outcome: Outcome  # noqa: F811
) -> None:
    apns_server.respond(TOKEN, status, reason=None)

    result = await provider.send(device(), WAKEUP)

    assert (result.outcome, result.reason) == (outcome, f"http_{status}")


async def test_transient_answer_leaves_the_connection_usable(
    provider: ApnsProvider, apns_server: FakeApns  # noqa: F811
) -> None:
    apns_server.respond(TOKEN, 429, "TooManyRequests", once=True)

    first = await provider.send(device(), WAKEUP)
    second = await provider.send(device(), WAKEUP)

    assert (first.outcome, second.outcome) == (Outcome.TRANSIENT, Outcome.DELIVERED)
    assert apns_server.connections_made == 1


async def test_malformed_device_token_is_dead_without_a_request(
    provider: ApnsProvider, apns_server: FakeApns  # noqa: F811
) -> None:
    result = await provider.send(device("not/a-hex token"), WAKEUP)

    assert (result.outcome, result.reason) == (Outcome.DEAD, "BadDeviceToken")
    assert apns_server.request_count == 0


async def test_device_without_topic_is_rejected_without_a_request(
    provider: ApnsProvider, apns_server: FakeApns  # noqa: F811
) -> None:
    result = await provider.send(Device(id=1, token=TOKEN), WAKEUP)

    assert (result.outcome, result.reason) == (Outcome.REJECTED, "MissingTopic")
    assert apns_server.request_count == 0


# -- network failures ----------------------------------------------------------------------------


async def test_unanswered_request_is_transient_after_the_timeout(
    apns_server: FakeApns,  # noqa: F811
) -> None:
    apns_server.hang(TOKEN)
    provider = make_provider(apns_server, timeout_seconds=0.5)
    started = time.monotonic()
    try:
        result = await provider.send(device(), WAKEUP)
    finally:
        await provider.aclose()

    assert (result.outcome, result.reason) == (Outcome.TRANSIENT, "timeout")
    assert time.monotonic() - started < 5
    assert apns_server.request_count == 1


async def test_answer_arriving_after_the_timeout_does_not_break_the_connection(
    apns_server: FakeApns, caplog: pytest.LogCaptureFixture  # noqa: F811
) -> None:
    apns_server.respond(TOKEN, 200, delay=0.6)
    provider = make_provider(apns_server, timeout_seconds=0.3)
    try:
        opening = await provider.send(device(OTHER_TOKEN), WAKEUP)
        late = await provider.send(device(TOKEN), WAKEUP)
        await eventually(lambda: apns_server.answers_sent == 2)
        following = await provider.send(device(OTHER_TOKEN), WAKEUP)
    finally:
        await provider.aclose()

    assert opening.outcome is Outcome.DELIVERED
    assert (late.outcome, late.reason) == (Outcome.TRANSIENT, "timeout")
    assert following.outcome is Outcome.DELIVERED
    assert apns_server.connections_made == 1
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_a_send_in_flight_when_a_goaway_covers_it_is_answered_once(
    provider: ApnsProvider, apns_server: FakeApns  # noqa: F811
) -> None:
    apns_server.hang(TOKEN, once=True)
    sending = asyncio.create_task(provider.send(device(), WAKEUP))
    await eventually(lambda: apns_server.request_count == 1)

    apns_server.goaway()
    apns_server.release(TOKEN)
    result = await sending

    assert result.outcome is Outcome.DELIVERED
    assert [(r.token, r.connection, r.status) for r in apns_server.requests] == [(TOKEN, 1, 200)]


async def test_only_the_send_past_a_goaways_last_stream_is_sent_again_on_a_new_connection(
    provider: ApnsProvider, apns_server: FakeApns  # noqa: F811
) -> None:
    apns_server.hang(TOKEN, once=True)
    apns_server.hang(OTHER_TOKEN, once=True)
    covered = asyncio.create_task(provider.send(device(TOKEN), WAKEUP))
    await eventually(lambda: apns_server.request_count == 1)
    past = asyncio.create_task(provider.send(device(OTHER_TOKEN), WAKEUP))
    await eventually(lambda: apns_server.request_count == 2)

    apns_server.goaway(last_stream_id=1)  # the first request's stream only
    result = await past
    apns_server.release(TOKEN)
    await covered

    assert result.outcome is Outcome.DELIVERED
    assert [(r.token, r.connection, r.status) for r in apns_server.requests] == [
        (TOKEN, 1, 200), (OTHER_TOKEN, 1, None), (OTHER_TOKEN, 2, 200)
    ]


async def test_the_send_after_a_goaway_takes_a_new_connection_while_the_old_one_drains(
    provider: ApnsProvider, apns_server: FakeApns  # noqa: F811
) -> None:
    apns_server.hang(TOKEN, once=True)
    draining = asyncio.create_task(provider.send(device(TOKEN), WAKEUP))
    await eventually(lambda: apns_server.request_count == 1)
    apns_server.goaway()
    await asyncio.sleep(0.05)  # the GOAWAY is read (sent before, the send would be past it)

    result = await provider.send(device(OTHER_TOKEN), WAKEUP)
    apns_server.release(TOKEN)
    await draining

    assert result.outcome is Outcome.DELIVERED
    assert [(r.token, r.connection) for r in apns_server.requests] == [
        (TOKEN, 1), (OTHER_TOKEN, 2)
    ]


async def test_a_send_finding_the_servers_stream_limit_reached_is_delivered_once_past_a_goaway(
    apns_server: FakeApns,  # noqa: F811
) -> None:
    # aioapns sizes each connection's streams (``free_channels``) from the server's
    # SETTINGS_MAX_CONCURRENT_STREAMS, and its pool opens another connection rather than queue a
    # request on a connection with none free.
    with FakeApns(key_pem=apns_server.key_pem, max_concurrent_streams=1) as limited:
        limited.hang(TOKEN, once=True)
        provider = make_provider(limited, timeout_seconds=2.0)
        try:
            first = asyncio.create_task(provider.send(device(TOKEN), WAKEUP))
            await eventually(lambda: limited.request_count == 1)
            second = asyncio.create_task(provider.send(device(OTHER_TOKEN), WAKEUP))
            await eventually(lambda: limited.request_count == 2)

            limited.goaway(last_stream_id=1)
            limited.release(TOKEN)
            results = await asyncio.wait_for(asyncio.gather(first, second), 5)
        finally:
            await provider.aclose()

        assert [r.outcome for r in results] == [Outcome.DELIVERED, Outcome.DELIVERED]
        assert [(r.token, r.connection, r.status) for r in limited.requests] == [
            (TOKEN, 1, 200), (OTHER_TOKEN, 2, 200)
        ]


async def test_a_goaway_is_logged_with_apples_reason_and_no_device_token(
    provider: ApnsProvider, apns_server: FakeApns, caplog: pytest.LogCaptureFixture  # noqa: F811
) -> None:
    caplog.set_level(logging.DEBUG)
    apns_server.hang(TOKEN, once=True)
    sending = asyncio.create_task(provider.send(device(), WAKEUP))
    await eventually(lambda: apns_server.request_count == 1)

    apns_server.goaway()
    apns_server.release(TOKEN)
    await sending

    [line] = [r.getMessage() for r in caplog.records if "going away" in r.getMessage()]
    assert "reason=Shutdown" in line
    assert TOKEN not in caplog.text


async def test_unreachable_server_is_a_transient_connection_error(
    apns_server: FakeApns,  # noqa: F811
) -> None:
    provider = make_provider(apns_server, production_url=f"https://127.0.0.1:{free_port()}")
    started = time.monotonic()
    try:
        result = await provider.send(device(), WAKEUP)
    finally:
        await provider.aclose()

    assert (result.outcome, result.reason) == (Outcome.TRANSIENT, "connection_error")
    assert time.monotonic() - started < 5


async def test_a_transport_error_is_logged_with_its_class_and_message_and_no_device_token(
    apns_server: FakeApns, caplog: pytest.LogCaptureFixture  # noqa: F811
) -> None:
    caplog.set_level(logging.DEBUG)
    apns_server.hang(TOKEN)
    provider = make_provider(apns_server)
    try:
        sending = asyncio.create_task(provider.send(device(), WAKEUP))
        await eventually(lambda: apns_server.request_count == 1)
        apns_server.drop_connections()
        result = await sending
    finally:
        await provider.aclose()

    assert (result.outcome, result.reason) == (Outcome.TRANSIENT, "connection_error")
    [line] = [r.getMessage() for r in caplog.records if "APNs unreachable" in r.getMessage()]
    assert line == "APNs unreachable: TransportError: the connection was lost"
    assert TOKEN not in caplog.text


async def test_failing_sends_never_log_the_device_token(
    apns_server: FakeApns, caplog: pytest.LogCaptureFixture  # noqa: F811
) -> None:
    caplog.set_level(logging.DEBUG)
    apns_server.respond(TOKEN, 410, "Unregistered", once=True)
    apns_server.respond(TOKEN, 400, "BadDeviceToken", once=True)
    apns_server.respond(TOKEN, 500, reason=None, once=True)
    apns_server.respond(TOKEN, 200, delay=0.6, once=True)
    provider = make_provider(apns_server, timeout_seconds=0.3)
    try:
        outcomes = [(await provider.send(device(), WAKEUP)).outcome for _ in range(4)]
        await eventually(lambda: apns_server.answers_sent == 4)
        outcomes.append((await provider.send(device(), WAKEUP)).outcome)
    finally:
        await provider.aclose()

    assert outcomes == [
        Outcome.DEAD, Outcome.DEAD, Outcome.TRANSIENT, Outcome.TRANSIENT, Outcome.DELIVERED
    ]
    assert TOKEN not in caplog.text
    assert not [r for r in caplog.records if TOKEN in r.getMessage()]


# -- configuration -------------------------------------------------------------------------------


@pytest.fixture
def apns_env(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, apns_server: FakeApns  # noqa: F811
) -> pytest.MonkeyPatch:
    """A complete, valid APNs configuration pointing at the fake; tests then break one thing."""
    monkeypatch.setenv("PUSH_SECRETS_DIR", str(tmp_path / "no-secrets"))
    monkeypatch.setenv("PUSH_APNS_KEY", apns_server.key_pem)
    monkeypatch.setenv("PUSH_APNS_KEY_ID", apns_server.key_id)
    monkeypatch.setenv("PUSH_APNS_TEAM_ID", apns_server.team_id)
    monkeypatch.setenv("PUSH_APNS_PRODUCTION_URL", apns_server.base_url)
    monkeypatch.setenv("PUSH_APNS_SANDBOX_URL", apns_server.base_url)
    monkeypatch.setenv("PUSH_APNS_CA_FILE", apns_server.ca_path)
    monkeypatch.delenv("PUSH_APNS_KEY_FILE", raising=False)
    monkeypatch.delenv("PUSH_APNS_TIMEOUT_SECONDS", raising=False)
    monkeypatch.delenv("PUSH_APNS_MAX_CONNECTIONS", raising=False)
    return monkeypatch


async def test_from_env_builds_a_provider_that_delivers(
    apns_env: pytest.MonkeyPatch, apns_server: FakeApns, tmp_path: Path  # noqa: F811
) -> None:
    key_path = tmp_path / "AuthKey.p8"
    key_path.write_text(apns_server.key_pem)
    apns_env.setenv("PUSH_APNS_KEY", str(key_path))
    apns_env.setenv("PUSH_APNS_TIMEOUT_SECONDS", "2.5")
    apns_env.setenv("PUSH_APNS_MAX_CONNECTIONS", "2")
    provider = ApnsProvider.from_env()
    try:
        result = await provider.send(device(), WAKEUP)
    finally:
        await provider.aclose()

    assert result.outcome is Outcome.DELIVERED


@pytest.mark.parametrize("name", ["PUSH_APNS_KEY", "PUSH_APNS_KEY_ID", "PUSH_APNS_TEAM_ID"])
def test_from_env_names_a_missing_required_setting(apns_env: pytest.MonkeyPatch, name: str) -> None:
    apns_env.delenv(name)

    with pytest.raises(ConfigError, match=name):
        ApnsProvider.from_env()


def _pem(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()


@pytest.mark.parametrize(
    "key",
    [
        "not a key",
        _pem(ec.generate_private_key(ec.SECP384R1())),
        _pem(rsa.generate_private_key(public_exponent=65537, key_size=2048)),
    ],
    ids=["garbage", "p384", "rsa"],
)
def test_from_env_refuses_a_key_that_is_not_an_apns_p256_key(
    apns_env: pytest.MonkeyPatch, key: str
) -> None:
    apns_env.setenv("PUSH_APNS_KEY", key)

    with pytest.raises(ConfigError, match="PUSH_APNS_KEY") as caught:
        ApnsProvider.from_env()
    assert "PRIVATE KEY" not in str(caught.value)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("PUSH_APNS_PRODUCTION_URL", "http://api.push.apple.com"),
        ("PUSH_APNS_SANDBOX_URL", "https://localhost:notaport"),
        ("PUSH_APNS_SANDBOX_URL", "https://host/3/device"),
        ("PUSH_APNS_CA_FILE", "/nonexistent/ca.pem"),
        ("PUSH_APNS_TIMEOUT_SECONDS", "soon"),
        ("PUSH_APNS_TIMEOUT_SECONDS", "0"),
        ("PUSH_APNS_MAX_CONNECTIONS", "0"),
    ],
)
def test_from_env_names_a_malformed_setting(
    apns_env: pytest.MonkeyPatch, name: str, value: str
) -> None:
    apns_env.setenv(name, value)

    with pytest.raises(ConfigError, match=name):
        ApnsProvider.from_env()


# -- forward proxies ----------------------------------------------------------------------------


async def test_sends_through_the_https_proxy_the_environment_names(
    apns_server: FakeApns, connect_proxy: ConnectProxy, monkeypatch: pytest.MonkeyPatch  # noqa: F811
) -> None:
    monkeypatch.setenv("HTTPS_PROXY", connect_proxy.url)
    provider = make_provider(apns_server)
    try:
        result = await provider.send(device(), WAKEUP)
    finally:
        await provider.aclose()

    assert result.outcome is Outcome.DELIVERED
    assert connect_proxy.tunnels == [f"localhost:{apns_server.port}"]
