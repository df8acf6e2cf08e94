"""The HTTP/2 client (shared/transport/http2.py) against servers that do what the FCM fake does
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

from shared.transport.connect import Origin, TransportError
from shared.transport.http2 import Http2Pool
from shared.transport.proxy import Proxy

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
    conn.reset_stream(stream_id, ErrorCodes.INTERNAL_ERROR)


async def test_an_answer_before_the_whole_body_was_sent_frees_the_stream(serve) -> None:
    pool = await serve(answer_at_once)

    first = await pool.request(headers(pool), BODY)
    second = await pool.request(headers(pool), BODY)

    assert (first.status, second.status) == (200, 200)
    assert ScriptedServer.connections == 1


async def test_a_stream_reset_with_its_window_update_fails_that_request_alone(serve) -> None:
    pool = await serve(grant_window_then_reset)

    with pytest.raises(TransportError, match="reset"):
        await pool.request(headers(pool), BODY)
    with pytest.raises(TransportError, match="reset"):
        await pool.request(headers(pool), BODY)

    assert ScriptedServer.connections == 1


def refuse_the_first_stream(conn: H2Connection, stream_id: int) -> None:
    """REFUSED_STREAM for stream 1 (RFC 9113 section 8.7: not processed), 200 for the others."""
    if stream_id == 1:
        conn.reset_stream(stream_id, ErrorCodes.REFUSED_STREAM)
    else:
        conn.send_headers(stream_id, [(b":status", b"200")], end_stream=True)


async def test_a_refused_stream_is_sent_again_once_and_not_a_failure(serve) -> None:
    pool = await serve(refuse_the_first_stream)

    response = await pool.request(headers(pool), b"")

    assert response.status == 200
    assert pool.stats.retried == 1


def refuse_every_stream(conn: H2Connection, stream_id: int) -> None:
    conn.reset_stream(stream_id, ErrorCodes.REFUSED_STREAM)


async def test_a_stream_refused_again_fails_after_one_retry(serve) -> None:
    pool = await serve(refuse_every_stream)

    with pytest.raises(TransportError, match="refused"):
        await pool.request(headers(pool), b"")

    assert pool.stats.retried == 1


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
        with pytest.raises(TransportError, match=r"refused the tunnel \(407\)"):
            await asyncio.wait_for(pool.request([], b""), 1)
    finally:
        await pool.aclose()
        proxy.close()
        await proxy.wait_closed()


# -- what the client announces, and what it keeps to -----------------------------------------


class RecordingServer(asyncio.Protocol):
    """An HTTP/2 server in clear that answers every request 200 after ``delay`` seconds, with
    ``body``, announcing ``max_streams``; it records the client's settings and the most streams
    it had open at once."""

    def __init__(self, max_streams: int | None = None, body: bytes = b"", delay: float = 0.0,
                 ) -> None:
        self.conn = H2Connection(H2Configuration(client_side=False))
        values = {} if max_streams is None else {SettingCodes.MAX_CONCURRENT_STREAMS: max_streams}
        self.conn.local_settings = Settings(client=False, initial_values=values)
        self.body, self.delay = body, delay
        self.open_streams: set[int] = set()
        self.peak = 0
        self.client_settings: dict[int, int] = {}
        self.transport: asyncio.Transport

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.conn.initiate_connection()
        transport.write(self.conn.data_to_send())

    def data_received(self, data: bytes) -> None:
        from h2.events import RemoteSettingsChanged, StreamEnded

        for event in self.conn.receive_data(data):
            if isinstance(event, RemoteSettingsChanged):
                for code, change in event.changed_settings.items():
                    self.client_settings[code] = change.new_value
            elif isinstance(event, RequestReceived):
                self.open_streams.add(event.stream_id)
                self.peak = max(self.peak, len(self.open_streams))
            elif isinstance(event, StreamEnded):
                asyncio.get_running_loop().call_later(self.delay, self.answer, event.stream_id)
        self.transport.write(self.conn.data_to_send())

    def answer(self, stream_id: int) -> None:
        self.open_streams.discard(stream_id)
        self.conn.send_headers(stream_id, [(b":status", b"200")], end_stream=not self.body)
        for start in range(0, len(self.body), 16_384):
            chunk = self.body[start:start + 16_384]
            self.conn.send_data(stream_id, chunk, end_stream=start + len(chunk) == len(self.body))
        self.transport.write(self.conn.data_to_send())


@pytest.fixture
async def recording() -> AsyncIterator[Callable[..., Awaitable[tuple[Http2Pool, list]]]]:
    """Start a RecordingServer; returns a pool to it and the server's connections."""
    servers: list[asyncio.Server] = []
    pools: list[Http2Pool] = []

    async def started(max_connections: int = 1, **server_options: object):
        loop = asyncio.get_running_loop()
        connections: list[RecordingServer] = []

        def accept() -> RecordingServer:
            connections.append(RecordingServer(**server_options))  # type: ignore[arg-type]
            return connections[-1]

        server = await loop.create_server(accept, "127.0.0.1", 0)
        servers.append(server)
        pool = Http2Pool(Origin("http", "127.0.0.1", server.sockets[0].getsockname()[1]), None,
                         timeout=5, max_connections=max_connections)
        pools.append(pool)
        return pool, connections

    yield started
    for pool in pools:
        await pool.aclose()
    for server in servers:
        server.close()
        await server.wait_closed()


async def test_server_push_is_disabled_in_the_clients_settings(recording) -> None:
    pool, connections = await recording()

    await pool.request(headers(pool), b"")

    assert connections[0].client_settings[SettingCodes.ENABLE_PUSH] == 0


@pytest.mark.parametrize("limit", [7, 250])
async def test_streams_in_flight_follow_the_servers_limit(recording, limit: int) -> None:
    pool, connections = await recording(max_streams=limit, delay=0.05)

    await asyncio.gather(*(pool.request(headers(pool), b"") for _ in range(3 * limit)))

    assert [c.peak for c in connections] == [limit]


async def test_the_pool_opens_more_connections_while_requests_wait_for_streams(recording) -> None:
    pool, connections = await recording(max_connections=4, max_streams=10, delay=0.1)

    await asyncio.gather(*(pool.request(headers(pool), b"") for _ in range(40)))

    assert len(connections) == 4
    assert pool.stats.connections_opened == 4


async def test_an_answer_body_over_the_limit_fails_the_request(recording) -> None:
    pool, _ = await recording(body=b"x" * 100_000)

    with pytest.raises(TransportError, match="over 65536 bytes"):
        await pool.request(headers(pool), b"")


async def test_a_quiet_connection_is_pinged_before_it_is_used_again(recording) -> None:
    pool, connections = await recording()
    pool.idle_ping_after = 0.05
    await pool.request(headers(pool), b"")
    await asyncio.sleep(0.1)

    response = await pool.request(headers(pool), b"")

    assert response.status == 200
    assert pool.stats.pings == 1
    assert len(connections) == 1


async def test_a_half_open_connection_costs_a_ping_not_the_requests_timeout(recording) -> None:
    """The server stops reading (a NAT that forgot the connection): the PING goes unanswered,
    and the request goes on a new connection, well within its own timeout (5 s)."""
    pool, connections = await recording()
    pool.idle_ping_after, pool.ping_timeout = 0.05, 0.2
    loop = asyncio.get_running_loop()
    await pool.request(headers(pool), b"")
    connections[0].data_received = lambda data: None  # type: ignore[method-assign]
    await asyncio.sleep(0.1)
    started = loop.time()

    response = await pool.request(headers(pool), b"")

    assert response.status == 200
    assert loop.time() - started < 1.0
    assert len(connections) == 2


# -- GOAWAY --------------------------------------------------------------------------------------


class GoawayServer(asyncio.Protocol):
    """Answers requests after ``delay``; ``goaway(last)`` sends GOAWAY (h2 would close the
    connection: the frames are written by hand so the server can still answer), and streams
    above the last stream ID are never answered, as RFC 9113 section 6.8 has it."""

    instances: list[GoawayServer] = []

    def __init__(self, delay: float) -> None:
        from fakes import DrainingServerStateMachine

        self.conn = H2Connection(H2Configuration(client_side=False))
        self.conn.state_machine = DrainingServerStateMachine()
        self.delay = delay
        self.last_stream_id = 2**31 - 1
        self.received: list[int] = []
        self.answered: list[int] = []
        self.transport: asyncio.Transport
        GoawayServer.instances.append(self)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.conn.initiate_connection()
        transport.write(self.conn.data_to_send())

    def data_received(self, data: bytes) -> None:
        from h2.events import StreamEnded

        for event in self.conn.receive_data(data):
            if isinstance(event, StreamEnded):
                self.received.append(event.stream_id)
                if event.stream_id <= self.last_stream_id:
                    asyncio.get_running_loop().call_later(self.delay, self.answer, event.stream_id)
        self.transport.write(self.conn.data_to_send())

    def goaway(self, last_stream_id: int) -> None:
        self.last_stream_id = last_stream_id
        self.conn.close_connection(last_stream_id=last_stream_id)
        self.transport.write(self.conn.data_to_send())

    def answer(self, stream_id: int) -> None:
        if stream_id <= self.last_stream_id and not self.transport.is_closing():
            self.answered.append(stream_id)
            self.conn.send_headers(stream_id, [(b":status", b"200")], end_stream=True)
            self.transport.write(self.conn.data_to_send())


@pytest.fixture
async def goaway_pool() -> AsyncIterator[Http2Pool]:
    GoawayServer.instances = []
    server = await asyncio.get_running_loop().create_server(
        lambda: GoawayServer(delay=0.05), "127.0.0.1", 0)
    pool = Http2Pool(Origin("http", "127.0.0.1", server.sockets[0].getsockname()[1]), None,
                     timeout=5, max_connections=2)
    yield pool
    await pool.aclose()
    server.close()
    await server.wait_closed()


async def test_a_graceful_goaway_finishes_what_was_sent_before_the_final_one(goaway_pool) -> None:
    pool = goaway_pool
    first = [asyncio.ensure_future(pool.request(headers(pool), b"")) for _ in range(3)]
    while len(GoawayServer.instances) < 1 or len(GoawayServer.instances[0].received) < 3:
        await asyncio.sleep(0.005)
    old = GoawayServer.instances[0]

    old.goaway(2**31 - 1)  # "going away soon": everything so far may still be processed
    await asyncio.sleep(0.01)
    later = [asyncio.ensure_future(pool.request(headers(pool), b"")) for _ in range(3)]
    old.goaway(max(old.received))  # the final one
    results = await asyncio.gather(*first, *later)

    assert [r.status for r in results] == [200] * 6
    assert old.answered == [1, 3, 5]  # the later requests never reached the old connection
    assert pool.stats.retried == 0
    assert len(GoawayServer.instances) == 2


async def test_requests_past_the_last_stream_id_are_sent_again_once_elsewhere(goaway_pool) -> None:
    pool = goaway_pool
    sending = [asyncio.ensure_future(pool.request(headers(pool), b"")) for _ in range(4)]
    while len(GoawayServer.instances) < 1 or len(GoawayServer.instances[0].received) < 4:
        await asyncio.sleep(0.005)

    GoawayServer.instances[0].goaway(3)  # streams 1 and 3 processed, 5 and 7 not
    results = await asyncio.gather(*sending)

    assert [r.status for r in results] == [200] * 4
    assert GoawayServer.instances[0].answered == [1, 3]
    assert sorted(GoawayServer.instances[1].answered) == [1, 3]
    assert pool.stats.retried == 2


async def test_headers_queued_in_the_loop_turn_a_goaway_arrives_in_are_not_lost(goaway_pool) -> None:
    """h2 clears its outbound buffer on reading a GOAWAY: a request started in the same loop
    turn as that read, before the turn's write, must still go out and be answered."""
    from hyperframe.frame import GoAwayFrame

    pool = goaway_pool
    await pool.request(headers(pool), b"")
    [connection] = list(pool._all)
    graceful = GoAwayFrame(0, last_stream_id=2**31 - 1, error_code=0).serialize()
    answer: asyncio.Future = asyncio.get_running_loop().create_future()

    connection.start(headers(pool), b"", answer)  # queued in h2, written at the turn's end...
    connection.data_received(graceful)  # ...but the GOAWAY is read first, in the same turn

    response = await asyncio.wait_for(answer, 2)
    assert response.status == 200
    assert GoawayServer.instances[0].answered == [1, 3]


async def test_h2_forgets_closed_streams_while_the_client_counts_open_ones(recording) -> None:
    """The client counts its open streams itself (h2 walks all of them per request); h2's own
    walk, which forgets closed streams, still runs often enough to bound its memory."""
    pool, _ = await recording(max_streams=100, delay=0.01)

    for _ in range(10):
        await asyncio.gather(*(pool.request(headers(pool), b"") for _ in range(100)))

    [connection] = list(pool._all)
    assert len(connection.h2.streams) <= 64 + 2 * 100


# -- the connect step's resolver (Web Push's guard against inward endpoints) ---------------------


class Refused(Exception):
    pass


async def test_a_resolver_chooses_the_addresses_a_connection_goes_to_in_order() -> None:
    """The name is never looked up by the client itself: an address that does not answer is
    passed over for the next one the resolver gave."""
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: RecordingServer(), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    dead = "127.0.0.2"  # the server listens on 127.0.0.1 only: refused here
    asked: list[tuple[str, int]] = []

    async def resolve(host: str, port: int) -> list[str]:
        asked.append((host, port))
        return [dead, "127.0.0.1"]

    pool = Http2Pool(Origin("http", "push.invalid", port), None, timeout=5, max_connections=1,
                     resolve=resolve)
    try:
        response = await pool.request(headers(pool), b"")
    finally:
        await pool.aclose()
        server.close()
        await server.wait_closed()

    assert response.status == 200
    assert asked == [("push.invalid", port)]


async def test_what_the_resolver_refuses_fails_the_request_as_itself() -> None:
    async def refuse(host: str, port: int) -> list[str]:
        raise Refused(host)

    pool = Http2Pool(Origin("http", "inward.invalid", 80), None, timeout=5, max_connections=1,
                     resolve=refuse)
    try:
        with pytest.raises(Refused):
            await pool.request(headers(pool), b"")
    finally:
        await pool.aclose()
