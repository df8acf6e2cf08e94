"""The FCM provider, driven over real HTTPS (HTTP/2) against the fake FCM server and its fake
OAuth token endpoint: what it puts on the wire, how it gets and refreshes its access token, and
how it classifies every answer FCM can give."""
from __future__ import annotations

import asyncio
import gc
import json
import logging
import socket
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from fakes.fcm import Answer, FakeFcm, fcm_error
from shared.config import ConfigError
from shared.core import Device, Outcome, SendResult, WakeUp
from shared.providers.fcm import FcmProvider

TOKEN = "fGx1T0kEn:APA91bHPRgkF3JUikC4ENAHEeMrd41Zxv3hVZjC9KtT8OvPVGJ-hQMRKRrZuJAEcl7B338qju59zJMjw2DELjzEvxwYv7hH5Ynpc1ODQ0aT4U4OFEeco8ohsN5PjL1iC2dNtk2BAokeMCg2ZXKqpc8FXKmhX94kIxQ"
WAKEUP = WakeUp(message_type="new_notification", ttl_seconds=300)
FCM_VARIABLES = (
    "PUSH_FCM_CREDENTIALS", "PUSH_FCM_CREDENTIALS_FILE", "PUSH_FCM_PROJECT_ID",
    "PUSH_FCM_ENDPOINT", "PUSH_FCM_CA_FILE", "PUSH_FCM_TIMEOUT_SECONDS",
    "PUSH_FCM_MAX_CONNECTIONS",
)


def device(token: str = TOKEN) -> Device:
    return Device(id=7, token=token)


def make_provider(fake: FakeFcm, **overrides: Any) -> FcmProvider:
    """A provider configured for ``fake``, with some settings overridden."""
    settings: dict[str, Any] = {
        "credentials": fake.service_account_json(),
        "endpoint": fake.endpoint,
        "ca_file": fake.ca_path,
        "timeout_seconds": 5.0,
    }
    return FcmProvider(**{**settings, **overrides})


def unused_port() -> int:
    """A local port nothing listens on (it was free a moment ago)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
async def provider(fcm_server: FakeFcm) -> AsyncIterator[FcmProvider]:  # noqa: F811
    fcm = make_provider(fcm_server)
    yield fcm
    await fcm.aclose()


@pytest.fixture
def fcm_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[pytest.MonkeyPatch]:
    """No PUSH_FCM_* setting, and an empty secrets directory."""
    for name in FCM_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("PUSH_SECRETS_DIR", str(tmp_path / "secrets"))
    yield monkeypatch


# -- what goes on the wire ---------------------------------------------------------------------


async def test_delivers_a_data_only_high_priority_collapsible_message(
        provider: FcmProvider, fcm_server: FakeFcm) -> None:  # noqa: F811
    result = await provider.send(device(), WAKEUP)

    assert result == SendResult(Outcome.DELIVERED)
    [received] = fcm_server.requests
    assert received.status == 200
    assert received.body == {
        "message": {
            "token": TOKEN,
            "data": {"type": "new_notification"},
            "android": {"collapse_key": "new_notification", "priority": "high", "ttl": "300s"},
        }
    }
    assert received.validate_only is False


async def test_sends_over_http2(provider: FcmProvider, fcm_server: FakeFcm) -> None:  # noqa: F811
    await provider.send(device(), WAKEUP)

    assert [m.http_version for m in fcm_server.messages] == ["2"]


async def test_dry_run_asks_fcm_to_validate_only(
        provider: FcmProvider, fcm_server: FakeFcm) -> None:  # noqa: F811
    result = await provider.send(device(), WakeUp("new_notification", 300, dry_run=True))

    assert result.outcome is Outcome.DELIVERED
    [received] = fcm_server.messages
    assert received.validate_only is True
    assert received.body["validate_only"] is True


async def test_caps_a_ttl_longer_than_fcm_allows_at_four_weeks(
        provider: FcmProvider, fcm_server: FakeFcm) -> None:  # noqa: F811
    result = await provider.send(device(), WakeUp("new_notification", 90 * 24 * 3600))

    assert result.outcome is Outcome.DELIVERED
    assert fcm_server.messages[0].body["message"]["android"]["ttl"] == "2419200s"


# -- the access token --------------------------------------------------------------------------


async def test_fetches_the_access_token_once_and_reuses_it(
        provider: FcmProvider, fcm_server: FakeFcm) -> None:  # noqa: F811
    for token in ("a", "b", "c"):
        assert (await provider.send(device(token), WAKEUP)).outcome is Outcome.DELIVERED

    assert fcm_server.token_requests == 1


async def test_concurrent_first_sends_fetch_a_single_token(
        provider: FcmProvider, fcm_server: FakeFcm) -> None:  # noqa: F811
    results = await asyncio.gather(*(provider.send(device(f"t{i}"), WAKEUP) for i in range(20)))

    assert {r.outcome for r in results} == {Outcome.DELIVERED}
    assert fcm_server.token_requests == 1


async def test_refreshes_a_token_before_it_expires(
        provider: FcmProvider, fcm_server: FakeFcm) -> None:  # noqa: F811
    # A token this short-lived is inside google-auth's refresh margin (minutes) from the start.
    fcm_server.access_token_lifetime = 60

    await provider.send(device("a"), WAKEUP)
    await provider.send(device("b"), WAKEUP)

    assert fcm_server.token_requests == 2
    assert len(fcm_server.messages) == 2


async def test_refreshes_the_token_and_retries_once_when_fcm_refuses_it(
        provider: FcmProvider, fcm_server: FakeFcm) -> None:  # noqa: F811
    await provider.send(device("a"), WAKEUP)
    fcm_server.revoke_access_tokens()

    result = await provider.send(device("b"), WAKEUP)

    assert result.outcome is Outcome.DELIVERED
    assert fcm_server.token_requests == 2
    assert [m.token for m in fcm_server.messages] == ["a", "b"]


async def test_a_token_refused_again_after_the_refresh_is_our_credentials(
        provider: FcmProvider, fcm_server: FakeFcm) -> None:  # noqa: F811
    fcm_server.script(TOKEN, "UNAUTHENTICATED")

    result = await provider.send(device(), WAKEUP)

    assert result == SendResult(Outcome.CREDENTIALS, "UNAUTHENTICATED")
    assert [r.status for r in fcm_server.requests] == [401, 401]
    assert fcm_server.token_requests == 2


async def test_third_party_auth_error_is_rejected_without_refreshing_our_token(
        provider: FcmProvider, fcm_server: FakeFcm) -> None:  # noqa: F811
    fcm_server.script(TOKEN, "THIRD_PARTY_AUTH_ERROR")

    result = await provider.send(device(), WAKEUP)

    assert result == SendResult(Outcome.REJECTED, "THIRD_PARTY_AUTH_ERROR")
    assert [r.status for r in fcm_server.requests] == [401]
    assert fcm_server.token_requests == 1


async def test_a_token_endpoint_out_of_reach_is_transient(fcm_server: FakeFcm) -> None:  # noqa: F811
    info = fcm_server.service_account_info()
    info["token_uri"] = f"https://127.0.0.1:{unused_port()}/token"
    fcm = make_provider(fcm_server, credentials=json.dumps(info))

    result = await fcm.send(device(), WAKEUP)
    await fcm.aclose()

    assert result == SendResult(Outcome.TRANSIENT, "oauth_unavailable")
    assert fcm_server.requests == []


async def test_a_service_account_key_google_refuses_is_our_credentials(
        fcm_server: FakeFcm) -> None:  # noqa: F811
    fcm = make_provider(fcm_server, credentials=fcm_server.service_account_json(trusted=False))

    result = await fcm.send(device(), WAKEUP)
    await fcm.aclose()

    assert result == SendResult(Outcome.CREDENTIALS, "oauth_refused")
    assert fcm_server.requests == []


async def test_a_refused_grant_is_not_asked_again_by_every_send_of_an_event(
        fcm_server: FakeFcm) -> None:  # noqa: F811
    """invalid_grant fails every send; each asking the token endpoint in turn would hammer it."""
    fcm = make_provider(fcm_server, credentials=fcm_server.service_account_json(trusted=False))

    results = await asyncio.gather(*(fcm.send(device(f"t{n}"), WAKEUP) for n in range(20)))
    await fcm.aclose()

    assert {r.outcome for r in results} == {Outcome.CREDENTIALS}
    assert fcm_server.grants_refused == 1


# -- classification of FCM's answers -----------------------------------------------------------


@pytest.mark.parametrize("answer", [
    "UNREGISTERED", "INVALID_TOKEN", "INVALID_TOKEN_MESSAGE_ONLY", "SENDER_ID_MISMATCH"])
async def test_answers_that_condemn_the_token_are_dead(
        provider: FcmProvider, fcm_server: FakeFcm, answer: str) -> None:  # noqa: F811
    fcm_server.script(TOKEN, answer)

    result = await provider.send(device(), WAKEUP)

    assert result.outcome is Outcome.DEAD
    assert result.reason == ("INVALID_ARGUMENT" if answer.startswith("INVALID_TOKEN") else answer)


async def test_quota_exceeded_is_a_transient_rate_limit_with_fcms_retry_after(
        provider: FcmProvider, fcm_server: FakeFcm) -> None:  # noqa: F811
    fcm_server.script(TOKEN, fcm_error("QUOTA_EXCEEDED", retry_after=30))

    result = await provider.send(device(), WAKEUP)

    assert result == SendResult(Outcome.TRANSIENT, "QUOTA_EXCEEDED", retry_after=30.0, rate_limited=True)


@pytest.mark.parametrize("answer", ["INTERNAL", "UNAVAILABLE"])
async def test_server_errors_are_transient(
        provider: FcmProvider, fcm_server: FakeFcm, answer: str) -> None:  # noqa: F811
    fcm_server.script(TOKEN, answer)

    result = await provider.send(device(), WAKEUP)

    assert result == SendResult(Outcome.TRANSIENT, answer)


async def test_a_proxy_error_page_is_transient(
        provider: FcmProvider, fcm_server: FakeFcm) -> None:  # noqa: F811
    fcm_server.script(TOKEN, Answer(502, b"<html><title>Error 502 (Server Error)!!1</title>",
                                    ((b"content-type", b"text/html; charset=UTF-8"),)))

    result = await provider.send(device(), WAKEUP)

    assert result == SendResult(Outcome.TRANSIENT, "http_502")


async def test_leaves_retrying_to_the_caller(
        provider: FcmProvider, fcm_server: FakeFcm) -> None:  # noqa: F811
    fcm_server.script(TOKEN, "UNAVAILABLE", "OK")

    first = await provider.send(device(), WAKEUP)
    assert first.outcome is Outcome.TRANSIENT
    assert [r.status for r in fcm_server.requests] == [503]

    second = await provider.send(device(), WAKEUP)
    assert second.outcome is Outcome.DELIVERED


async def test_a_refusal_of_the_request_itself_is_rejected_and_keeps_the_token(
        provider: FcmProvider, fcm_server: FakeFcm) -> None:  # noqa: F811
    fcm_server.script(TOKEN, "INVALID_ARGUMENT")

    result = await provider.send(device(), WAKEUP)

    assert result == SendResult(Outcome.REJECTED, "INVALID_ARGUMENT")


async def test_permission_denied_is_our_credentials_not_the_message(
        provider: FcmProvider, fcm_server: FakeFcm) -> None:  # noqa: F811
    """403 PERMISSION_DENIED (an IAM permission the service account lacks) refuses any message;
    403 SENDER_ID_MISMATCH, about the token, stays dead (above)."""
    fcm_server.script(TOKEN, "PERMISSION_DENIED")

    result = await provider.send(device(), WAKEUP)

    assert result == SendResult(Outcome.CREDENTIALS, "PERMISSION_DENIED")


async def test_a_wrong_project_is_our_credentials_not_dead(fcm_server: FakeFcm) -> None:  # noqa: F811
    fcm = make_provider(fcm_server, project_id="someone-elses-project")

    result = await fcm.send(device(), WAKEUP)
    await fcm.aclose()

    assert result == SendResult(Outcome.CREDENTIALS, "PERMISSION_DENIED")


# -- network failures --------------------------------------------------------------------------


async def test_an_unanswered_send_is_transient_within_the_timeout(
        fcm_server: FakeFcm) -> None:  # noqa: F811
    fcm_server.script(TOKEN, "HANG")
    fcm = make_provider(fcm_server, timeout_seconds=0.5)

    started = time.monotonic()
    result = await fcm.send(device(), WAKEUP)
    elapsed = time.monotonic() - started
    await fcm.aclose()

    assert result == SendResult(Outcome.TRANSIENT, "timeout")
    assert elapsed < 5


async def test_fcm_out_of_reach_is_transient(fcm_server: FakeFcm) -> None:  # noqa: F811
    fcm = make_provider(fcm_server, endpoint=f"https://127.0.0.1:{unused_port()}")

    result = await fcm.send(device(), WAKEUP)
    await fcm.aclose()

    assert result == SendResult(Outcome.TRANSIENT, "connection_error")


def test_a_closed_provider_sends_again_in_a_new_event_loop_with_its_cached_access_token(
        fcm_server: FakeFcm) -> None:  # noqa: F811
    fcm = make_provider(fcm_server)

    async def invocation(token: str) -> SendResult:
        try:
            return await fcm.send(device(token), WAKEUP)
        finally:
            await fcm.aclose()

    first = asyncio.run(invocation("a"))
    second = asyncio.run(invocation("b"))

    assert first.outcome is second.outcome is Outcome.DELIVERED
    assert fcm_server.token_requests == 1


@pytest.mark.filterwarnings("ignore::ResourceWarning")
def test_keeps_working_when_an_invocation_leaves_it_open_and_the_next_runs_a_new_loop(
        fcm_server: FakeFcm) -> None:  # noqa: F811
    fcm = make_provider(fcm_server)

    first = asyncio.run(fcm.send(device("a"), WAKEUP))
    second = asyncio.run(fcm.send(device("b"), WAKEUP))
    asyncio.run(fcm.aclose())
    # The first loop's connection can only be closed by the garbage collector (with a
    # ResourceWarning): collect it here rather than in some later test.
    gc.collect()

    assert first.outcome is second.outcome is Outcome.DELIVERED
    assert fcm_server.token_requests == 1


async def test_never_logs_or_reports_the_device_token(
        provider: FcmProvider, fcm_server: FakeFcm,  # noqa: F811
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    answers = ["OK", "UNREGISTERED", "INVALID_TOKEN", "INVALID_ARGUMENT", "UNAVAILABLE",
               "THIRD_PARTY_AUTH_ERROR", "UNAUTHENTICATED"]
    results = []
    for answer in answers:
        token = f"{TOKEN}-{answer}"
        fcm_server.script(token, answer)
        results.append(await provider.send(device(token), WAKEUP))

    assert caplog.records, "the scenario should have logged something"
    assert TOKEN not in caplog.text
    assert not any(TOKEN in r.reason for r in results)


# -- configuration -----------------------------------------------------------------------------


async def test_from_env_reads_every_setting(
        fcm_server: FakeFcm, fcm_environment: pytest.MonkeyPatch, tmp_path: Path) -> None:  # noqa: F811
    credentials = fcm_server.write_service_account(tmp_path / "service-account.json")
    fcm_environment.setenv("PUSH_FCM_CREDENTIALS", str(credentials))
    fcm_environment.setenv("PUSH_FCM_ENDPOINT", fcm_server.endpoint)
    fcm_environment.setenv("PUSH_FCM_CA_FILE", fcm_server.ca_path)
    fcm_environment.setenv("PUSH_FCM_TIMEOUT_SECONDS", "3")
    fcm_environment.setenv("PUSH_FCM_MAX_CONNECTIONS", "2")

    fcm = FcmProvider.from_env()
    result = await fcm.send(device(), WAKEUP)
    await fcm.aclose()

    assert fcm.project_id == fcm_server.project_id
    assert result.outcome is Outcome.DELIVERED


def test_from_env_project_id_overrides_the_service_accounts(
        fcm_server: FakeFcm, fcm_environment: pytest.MonkeyPatch) -> None:  # noqa: F811
    fcm_environment.setenv("PUSH_FCM_CREDENTIALS", fcm_server.service_account_json())
    fcm_environment.setenv("PUSH_FCM_PROJECT_ID", "another-project")

    assert FcmProvider.from_env().project_id == "another-project"


@pytest.mark.parametrize(("variable", "value"), [
    ("PUSH_FCM_CREDENTIALS", None),
    ("PUSH_FCM_CREDENTIALS", "{not json"),
    ("PUSH_FCM_CREDENTIALS", '{"type": "authorized_user", "refresh_token": "x"}'),
    ("PUSH_FCM_CREDENTIALS", '{"type": "service_account", "project_id": "p"}'),
    ("PUSH_FCM_CA_FILE", "/nonexistent/ca.pem"),
    ("PUSH_FCM_TIMEOUT_SECONDS", "soon"),
    ("PUSH_FCM_MAX_CONNECTIONS", "0"),
    ("PUSH_FCM_ENDPOINT", "fcm.googleapis.com"),
])
def test_from_env_errors_name_the_variable(
        fcm_server: FakeFcm, fcm_environment: pytest.MonkeyPatch,  # noqa: F811
        variable: str, value: str | None) -> None:
    fcm_environment.setenv("PUSH_FCM_CREDENTIALS", fcm_server.service_account_json())
    if value is None:
        fcm_environment.delenv(variable)
    else:
        fcm_environment.setenv(variable, value)

    with pytest.raises(ConfigError, match=variable):
        FcmProvider.from_env()


def test_from_env_needs_a_project_id_somewhere(
        fcm_server: FakeFcm, fcm_environment: pytest.MonkeyPatch) -> None:  # noqa: F811
    info = fcm_server.service_account_info()
    del info["project_id"]
    fcm_environment.setenv("PUSH_FCM_CREDENTIALS", json.dumps(info))

    with pytest.raises(ConfigError, match="PUSH_FCM_PROJECT_ID"):
        FcmProvider.from_env()
