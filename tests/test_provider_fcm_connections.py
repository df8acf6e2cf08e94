"""The FCM provider's HTTP/2 connections, against the fake FCM server: the limits it keeps to,
what it does when the server ends or loses a connection, and forward proxies from the
environment (a small CONNECT proxy here)."""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator

import pytest

from shared.config import ConfigError
from shared.providers.base import Outcome, SendResult
from shared.providers.fcm import FcmProvider
from tests.fakes.fcm import FakeFcm
from tests.test_provider_fcm import TOKEN, WAKEUP, device, make_provider

PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy", "NO_PROXY", "no_proxy")


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


async def test_sends_a_goaway_says_were_not_processed_are_transient_at_once(
        fcm_server: FakeFcm) -> None:
    fcm_server.script(TOKEN, "HANG")
    fcm = make_provider(fcm_server, timeout_seconds=30)
    sending = asyncio.ensure_future(fcm.send(device(), WAKEUP))
    await wait_for_requests(fcm_server, 1)

    fcm_server.goaway(last_stream_id=0)
    result = await sending
    await fcm.aclose()

    assert result == SendResult(Outcome.TRANSIENT, "connection_error")


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


class ConnectProxy:
    """A forward proxy that only opens CONNECT tunnels (what HTTPS through a proxy needs),
    recording each tunnel's target."""

    def __init__(self) -> None:
        self.tunnels: list[str] = []
        self.server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
        method, target, _ = head.split(" ", 2)
        if method != "CONNECT":
            writer.write(b"HTTP/1.1 405 Method Not Allowed\r\ncontent-length: 0\r\n\r\n")
            writer.close()
            return
        self.tunnels.append(target)
        host, _, port = target.rpartition(":")
        upstream_reader, upstream_writer = await asyncio.open_connection(host, int(port))
        writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
        await asyncio.gather(self.pipe(reader, upstream_writer),
                             self.pipe(upstream_reader, writer))

    @staticmethod
    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()


@pytest.fixture
async def proxy(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[ConnectProxy]:
    """A CONNECT proxy in the test's event loop (google-auth's token request, made in a worker
    thread, goes through it too), with no proxy variable set yet."""
    for name in PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    connect_proxy = ConnectProxy()
    connect_proxy.server = await asyncio.start_server(connect_proxy.handle, "127.0.0.1", 0)
    yield connect_proxy
    connect_proxy.server.close()


async def test_sends_through_the_https_proxy_the_environment_names(
        fcm_server: FakeFcm, proxy: ConnectProxy, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HTTPS_PROXY", proxy.url)
    fcm = make_provider(fcm_server)

    result = await fcm.send(device(), WAKEUP)
    await fcm.aclose()

    assert result == SendResult(Outcome.DELIVERED)
    assert f"127.0.0.1:{fcm_server.port}" in proxy.tunnels
    assert [m.http_version for m in fcm_server.messages] == ["2"]


async def test_no_proxy_naming_the_endpoint_connects_directly(
        fcm_server: FakeFcm, proxy: ConnectProxy, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HTTPS_PROXY", proxy.url)
    monkeypatch.setenv("NO_PROXY", "localhost,127.0.0.1")
    fcm = make_provider(fcm_server)

    result = await fcm.send(device(), WAKEUP)
    await fcm.aclose()

    assert result == SendResult(Outcome.DELIVERED)
    assert proxy.tunnels == []


def test_a_proxy_url_that_is_not_http_is_a_config_error(
        fcm_server: FakeFcm, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTPS_PROXY", "socks5://127.0.0.1:1080")

    with pytest.raises(ConfigError, match="HTTPS_PROXY"):
        make_provider(fcm_server)
