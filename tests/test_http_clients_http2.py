"""The HTTP/2 client (shared/providers/http2.py) against servers that do what the FCM fake does
not: a small flow-control window, an answer before the request's body is all sent, frames that
arrive together. Each server here is a real HTTP/2 server (h2, in clear with prior knowledge),
scripted by what it does when a request's headers arrive."""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.events import DataReceived, RequestReceived
from h2.settings import SettingCodes, Settings

from shared.providers.http2 import Http2Pool, Http2Unavailable, Origin, Proxy

OnRequest = Callable[[H2Connection, int], None]
"""What the server does when a request's headers arrive on stream ``int``."""

BODY = b"x" * 100
"""A request body larger than the servers' window below."""
SMALL_WINDOW = 10


class ScriptedServer(asyncio.Protocol):
    """One connection of a scripted HTTP/2 server, announcing ``SMALL_WINDOW`` as its initial
    stream window and at most one stream at a time."""

    connections = 0

    def __init__(self, on_request: OnRequest) -> None:
        self.on_request = on_request
        self.conn = H2Connection(H2Configuration(client_side=False))
        self.transport: asyncio.Transport

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        ScriptedServer.connections += 1
        self.transport = transport
        self.conn.local_settings = Settings(client=False, initial_values={
            SettingCodes.INITIAL_WINDOW_SIZE: SMALL_WINDOW,
            SettingCodes.MAX_CONCURRENT_STREAMS: 1,
        })
        self.conn.initiate_connection()
        transport.write(self.conn.data_to_send())

    def data_received(self, data: bytes) -> None:
        for event in self.conn.receive_data(data):
            if isinstance(event, RequestReceived):
                self.on_request(self.conn, event.stream_id)  # type: ignore[arg-type]
            elif isinstance(event, DataReceived):
                self.conn.acknowledge_received_data(
                    event.flow_controlled_length, event.stream_id)  # type: ignore[arg-type]
        self.transport.write(self.conn.data_to_send())


@pytest.fixture
async def serve() -> AsyncIterator[Callable[[OnRequest], Awaitable[Http2Pool]]]:
    """Start a scripted server; returns a pool of one connection to it."""
    servers: list[asyncio.Server] = []
    pools: list[Http2Pool] = []

    async def started(on_request: OnRequest) -> Http2Pool:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(lambda: ScriptedServer(on_request), "127.0.0.1", 0)
        servers.append(server)
        port = server.sockets[0].getsockname()[1]
        pool = Http2Pool(Origin("http", "127.0.0.1", port), None, timeout=2, max_connections=1)
        pools.append(pool)
        return pool

    ScriptedServer.connections = 0
    yield started
    for pool in pools:
        await pool.aclose()
    for server in servers:
        server.close()
        await server.wait_closed()


def headers(pool: Http2Pool) -> list[tuple[bytes, bytes]]:
    return [(b":method", b"POST"), (b":scheme", b"http"),
            (b":authority", pool.origin.authority), (b":path", b"/send")]


def answer_at_once(conn: H2Connection, stream_id: int) -> None:
    """Answer 200 as soon as the headers arrive, without waiting for (or reading) the body."""
    conn.send_headers(stream_id, [(b":status", b"200")], end_stream=True)


def grant_window_then_reset(conn: H2Connection, stream_id: int) -> None:
    """Open the stream's window and reset the stream, in one write."""
    conn.increment_flow_control_window(SMALL_WINDOW, stream_id)
    conn.reset_stream(stream_id, ErrorCodes.REFUSED_STREAM)


async def test_an_answer_before_the_whole_body_was_sent_frees_the_stream(serve) -> None:
    pool = await serve(answer_at_once)

    first = await pool.request(headers(pool), BODY)
    second = await pool.request(headers(pool), BODY)

    assert (first.status, second.status) == (200, 200)
    assert ScriptedServer.connections == 1


async def test_a_stream_reset_with_its_window_update_fails_that_request_alone(serve) -> None:
    pool = await serve(grant_window_then_reset)

    with pytest.raises(Http2Unavailable, match="reset"):
        await pool.request(headers(pool), BODY)
    with pytest.raises(Http2Unavailable, match="reset"):
        await pool.request(headers(pool), BODY)

    assert ScriptedServer.connections == 1


def answer_after_an_interim_answer(conn: H2Connection, stream_id: int) -> None:
    """103 Early Hints, then the answer (with a body), without waiting for the request body."""
    conn.send_headers(stream_id, [(b":status", b"103"), (b"link", b"</a>; rel=preload")])
    conn.send_headers(stream_id, [(b":status", b"200")])
    conn.send_data(stream_id, b"{}", end_stream=True)


async def test_an_interim_answer_is_passed_over_for_the_final_one(serve) -> None:
    pool = await serve(answer_after_an_interim_answer)

    response = await pool.request(headers(pool), b"")

    assert (response.status, response.body) == (200, b"{}")


async def test_a_proxy_refusing_the_tunnel_fails_the_request_at_once() -> None:
    """A 407 that arrives in pieces (the status line split across reads)."""
    async def refuse(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        for piece in (b"HTTP/1.1 40", b"7 Proxy Authentication Required\r\n",
                      b"Proxy-Authenticate: Basic\r\nContent-Length: 0\r\n", b"\r\n"):
            writer.write(piece)
            await writer.drain()
            await asyncio.sleep(0.01)
        await reader.read()

    proxy = await asyncio.start_server(refuse, "127.0.0.1", 0)
    pool = Http2Pool(Origin("http", "fcm.invalid", 80), None, timeout=5, max_connections=1,
                     proxy=Proxy("127.0.0.1", proxy.sockets[0].getsockname()[1]))
    try:
        with pytest.raises(Http2Unavailable, match="cannot connect"):
            await asyncio.wait_for(pool.request([], b""), 1)
    finally:
        await pool.aclose()
        proxy.close()
        await proxy.wait_closed()
