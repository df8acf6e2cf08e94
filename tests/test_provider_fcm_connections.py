"""The FCM provider's HTTP/2 connections, against the fake FCM server: the limits it keeps to,
what it does when the server ends or loses a connection, and forward proxies from the
environment (a small CONNECT proxy here)."""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator

import pytest

from fakes.fcm import FakeFcm
from shared.config import ConfigError
from shared.core import Outcome, SendResult
from shared.providers.fcm import FcmProvider
from tests.test_provider_fcm import TOKEN, WAKEUP, device, make_provider

from tests.connect_proxy import PROXY_VARIABLES, ConnectProxy


@pytest.fixture
async def provider(fcm_server: FakeFcm) -> AsyncIterator[FcmProvider]:
    fcm = make_provider(fcm_server)
    yield fcm
    await fcm.aclose()


@pytest.fixture
def slow_fcm() -> Iterator[FakeFcm]:
    """A fake that takes 0.1 s per answer and allows 3 streams per connection."""
    with FakeFcm(latency=0.1, max_concurrent_streams=3) as fake:
        yield fake


async def wait_for_requests(fake: FakeFcm, count: int) -> None:
    while len(fake.requests) < count:
        await asyncio.sleep(0.01)


# -- limits -------------------------------------------------------------------------------------


async def test_keeps_to_the_servers_limit_of_concurrent_streams(slow_fcm: FakeFcm) -> None:
    fcm = make_provider(slow_fcm, max_connections=1)

    results = await asyncio.gather(*(fcm.send(device(f"t{i}"), WAKEUP) for i in range(10)))
    await fcm.aclose()

    assert {r.outcome for r in results} == {Outcome.DELIVERED}
    assert slow_fcm.peak_streams == 3
    assert slow_fcm.connections_made == 1


async def test_opens_more_connections_up_to_the_limit_when_streams_run_out(
        slow_fcm: FakeFcm) -> None:
    fcm = make_provider(slow_fcm, max_connections=2)

    results = await asyncio.gather(*(fcm.send(device(f"t{i}"), WAKEUP) for i in range(12)))
    await fcm.aclose()

    assert {r.outcome for r in results} == {Outcome.DELIVERED}
    assert slow_fcm.connections_made == 2


async def test_a_send_that_timed_out_gives_its_stream_back() -> None:
    with FakeFcm(max_concurrent_streams=1) as fake:
        fake.script("hangs", "HANG")
        fcm = make_provider(fake, max_connections=1, timeout_seconds=0.3)

        hung = await fcm.send(device("hangs"), WAKEUP)
        after = await fcm.send(device(), WAKEUP)
        await fcm.aclose()

    assert hung == SendResult(Outcome.TRANSIENT, "timeout")
    assert after == SendResult(Outcome.DELIVERED)


# -- connections ending -------------------------------------------------------------------------


async def test_after_a_goaway_the_next_send_opens_a_fresh_connection(
        provider: FcmProvider, fcm_server: FakeFcm) -> None:
    await provider.send(device("a"), WAKEUP)
    fcm_server.goaway()
    await asyncio.sleep(0.05)  # the GOAWAY reaches the client

    result = await provider.send(device("b"), WAKEUP)

    assert result == SendResult(Outcome.DELIVERED)
    assert fcm_server.connections_made == 2


async def test_a_send_a_goaway_says_was_not_processed_is_sent_again_on_a_new_connection(
        fcm_server: FakeFcm) -> None:
    fcm_server.script(TOKEN, "HANG", "OK")
    fcm = make_provider(fcm_server, timeout_seconds=30)
    sending = asyncio.ensure_future(fcm.send(device(), WAKEUP))
    await wait_for_requests(fcm_server, 1)

    fcm_server.goaway(last_stream_id=0)
    result = await sending
    await fcm.aclose()

    assert result == SendResult(Outcome.DELIVERED)
    assert [r.status for r in fcm_server.requests] == [None, 200]
    assert fcm_server.connections_made == 2


async def test_a_send_not_processed_twice_is_transient(fcm_server: FakeFcm) -> None:
    fcm_server.script(TOKEN, "HANG")
    fcm = make_provider(fcm_server, timeout_seconds=30)
    sending = asyncio.ensure_future(fcm.send(device(), WAKEUP))
    for attempt in (1, 2):
        await wait_for_requests(fcm_server, attempt)
        fcm_server.goaway(last_stream_id=0)
    result = await sending
    await fcm.aclose()

    assert result == SendResult(Outcome.TRANSIENT, "connection_error")
    assert fcm_server.connections_made == 2


async def test_sends_a_goaway_lets_finish_are_delivered(slow_fcm: FakeFcm) -> None:
    fcm = make_provider(slow_fcm, timeout_seconds=5)
    sending = asyncio.ensure_future(fcm.send(device(), WAKEUP))
    await wait_for_requests(slow_fcm, 1)

    slow_fcm.goaway()  # every stream received so far is still answered
    result = await sending
    await fcm.aclose()

    assert result == SendResult(Outcome.DELIVERED)


async def test_sends_in_flight_on_a_lost_connection_are_transient_at_once(
        fcm_server: FakeFcm) -> None:
    fcm_server.script(TOKEN, "HANG")
    fcm = make_provider(fcm_server, timeout_seconds=30)
    sending = asyncio.ensure_future(fcm.send(device(), WAKEUP))
    await wait_for_requests(fcm_server, 1)

    fcm_server.drop_connections()
    result = await sending
    await fcm.aclose()

    assert result == SendResult(Outcome.TRANSIENT, "connection_error")


async def test_sends_again_on_a_new_connection_after_losing_one(
        provider: FcmProvider, fcm_server: FakeFcm) -> None:
    await provider.send(device("a"), WAKEUP)
    fcm_server.drop_connections()
    await asyncio.sleep(0.05)  # the loss reaches the client

    result = await provider.send(device("b"), WAKEUP)

    assert result == SendResult(Outcome.DELIVERED)
    assert fcm_server.connections_made == 2


# -- forward proxies ----------------------------------------------------------------------------


async def test_sends_through_the_https_proxy_the_environment_names(
        fcm_server: FakeFcm, connect_proxy: ConnectProxy, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HTTPS_PROXY", connect_proxy.url)
    fcm = make_provider(fcm_server)

    result = await fcm.send(device(), WAKEUP)
    await fcm.aclose()

    assert result == SendResult(Outcome.DELIVERED)
    assert f"127.0.0.1:{fcm_server.port}" in connect_proxy.tunnels
    assert [m.http_version for m in fcm_server.messages] == ["2"]


async def test_no_proxy_naming_the_endpoint_connects_directly(
        fcm_server: FakeFcm, connect_proxy: ConnectProxy, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HTTPS_PROXY", connect_proxy.url)
    monkeypatch.setenv("NO_PROXY", "localhost,127.0.0.1")
    fcm = make_provider(fcm_server)

    result = await fcm.send(device(), WAKEUP)
    await fcm.aclose()

    assert result == SendResult(Outcome.DELIVERED)
    assert connect_proxy.tunnels == []


def test_a_proxy_url_that_is_not_http_is_a_config_error(
        fcm_server: FakeFcm, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTPS_PROXY", "socks5://127.0.0.1:1080")

    with pytest.raises(ConfigError, match="HTTPS_PROXY"):
        make_provider(fcm_server)
