"""The Web Push provider's HTTP/1.1 client (``_Connection`` in shared/providers/webpush.py) against
answers the fake push service (aiohttp) does not give: each server here is a small TLS server,
trusted by the fake's CA, that reads a push and writes the answer bytes it is given."""
from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

import pytest

from fakes.webpush import FakeWebPushService
from shared.core import Outcome, SendResult
from shared.providers.webpush import WebPushProvider
from tests.test_provider_webpush import device, make_provider, wakeup

Answering = Callable[[bytes], Awaitable[dict]]
"""Starts a server that answers every push with the given bytes; returns a subscription to it."""


async def read_push(reader: asyncio.StreamReader) -> None:
    """Read one request: its head, then the body its Content-Length announces."""
    head = await reader.readuntil(b"\r\n\r\n")
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length:"))
    await reader.readexactly(length)


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    """The listening socket the answering server serves on, bound before the provider is made,
    which allows its port as a local receiver."""
    with socket.create_server(("127.0.0.1", 0)) as sock:
        yield sock


@pytest.fixture
async def answering(webpush_server: FakeWebPushService, listener: socket.socket) -> AsyncIterator[Answering]:
    servers: list[asyncio.Server] = []

    async def start(answer: bytes) -> dict:
        server_ssl = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        webpush_server.ca.issue_cert("localhost").configure_cert(server_ssl)

        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                while True:
                    await read_push(reader)
                    writer.write(answer)
                    await writer.drain()
            except (asyncio.IncompleteReadError, ConnectionError):
                writer.close()

        server = await asyncio.start_server(serve, sock=listener, ssl=server_ssl)
        servers.append(server)
        subscription = webpush_server.subscribe()
        port = listener.getsockname()[1]
        subscription["endpoint"] = f"https://localhost:{port}/push/x"
        return subscription

    yield start
    for server in servers:
        server.close()
        await server.wait_closed()


@pytest.fixture
async def provider(webpush_server: FakeWebPushService, listener: socket.socket) -> AsyncIterator[WebPushProvider]:
    provider = make_provider(webpush_server, also=(listener.getsockname()[1],))
    yield provider
    await provider.aclose()


@pytest.mark.parametrize("interim", [
    pytest.param(b"HTTP/1.1 100 Continue\r\n\r\n", id="100-continue"),
    pytest.param(b"HTTP/1.1 103 Early Hints\r\nLink: </a>; rel=preload\r\n\r\n", id="103"),
])
async def test_an_interim_answer_is_passed_over_for_the_final_one(
        provider, answering, interim: bytes) -> None:
    subscription = await answering(interim + b"HTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n")

    first = await provider.send(device(subscription), wakeup())
    again = await provider.send(device(subscription), wakeup())  # on the kept-alive connection

    assert first == again == SendResult(Outcome.DELIVERED)


@pytest.mark.parametrize("answer", [
    pytest.param(b"HTTP/1.1 201 Created\r\nContent-Length: 5\r\n\r\nhello", id="content-length"),
    pytest.param(b"HTTP/1.1 201 Created\r\nTransfer-Encoding: chunked\r\n\r\n"
                 b"5\r\nhello\r\n0\r\n\r\n", id="chunked"),
    pytest.param(b"HTTP/1.1 201 Created\r\nConnection: close\r\nContent-Length: 0\r\n\r\n",
                 id="connection-close"),
])
async def test_an_answer_with_a_body_is_read_past_and_the_next_push_goes_through(
        provider, answering, answer: bytes) -> None:
    subscription = await answering(answer)

    first = await provider.send(device(subscription), wakeup())
    again = await provider.send(device(subscription), wakeup())

    assert first == again == SendResult(Outcome.DELIVERED)


@pytest.mark.parametrize("status,phrase", [
    (301, b"Moved Permanently"), (302, b"Found"), (303, b"See Other"),
    (307, b"Temporary Redirect"), (308, b"Permanent Redirect"),
])
async def test_a_redirect_is_never_followed_and_the_push_is_rejected(
        provider, answering, webpush_server, status: int, phrase: bytes) -> None:
    """Where the redirect leads (the fake push service, which the provider would reach) gets
    nothing: a push service never redirects, so the answer is a refusal, not a dead token."""
    elsewhere = webpush_server.subscribe()["endpoint"].encode()
    subscription = await answering(
        b"HTTP/1.1 %d %s\r\nLocation: %s\r\nContent-Length: 0\r\n\r\n" % (status, phrase, elsewhere)
    )

    result = await provider.send(device(subscription), wakeup())

    assert result == SendResult(Outcome.REJECTED, f"http_{status}")
    assert webpush_server.pushes == []
