"""What the fake providers share: a TLS server in its own thread that speaks HTTP/2 (h2) and, for
the fakes that need it, HTTP/1.1 (h11), chosen by ALPN, and behaves on the network the way the
real providers' front ends do. A fake subclasses :class:`FakeServer` and answers requests in
:meth:`FakeServer.handle`; everything about connections is here:

Latency (``rtt``)
    Every answer leaves ``rtt`` seconds after its request arrived (the request's way there and
    the answer's way back), and a new connection takes two more round trips before the server
    reads it or sends its SETTINGS (TCP's handshake and TLS 1.3's): a client that opens
    connections on the hot path pays for them as it would on the real network.
Recycling (``recycle_after``)
    After that many streams a connection is recycled as Google's and Apple's front ends do
    (about every 1,000): a graceful GOAWAY (last stream ID 2^31-1) and a PING; when the PING is
    answered (the client has read the GOAWAY: how Google's front ends time it, as gRPC
    documents), and no sooner than a round trip, the final GOAWAY naming the last stream
    received; streams after it are ignored (never answered: the client must send them again
    elsewhere), and the connection is closed once the rest are answered. ``goaway()`` sends a
    GOAWAY at once, as a server that does not wait (Hypercorn after its request limit). On HTTP/1.1, the answer to the last request says ``Connection: close``.
Stream limits (``max_concurrent_streams``, ``raised_streams``)
    The SETTINGS_MAX_CONCURRENT_STREAMS the server announces and holds clients to; a fake may
    raise it on a connection later (APNs starts token-authenticated connections at 1 and raises
    the limit after the first accepted request).
Refusals and resets
    ``refuse_every`` refuses every n-th stream with RST_STREAM REFUSED_STREAM (the server did
    not process it; a request refused once is not refused again, so a client that sends a
    refused request again once always gets it through), :meth:`FakeServer.refuse_next` the next
    few; :meth:`FakeServer.goaway` sends
    GOAWAY now, :meth:`FakeServer.drop_connections` cuts every connection without a word.
Counting
    :attr:`FakeServer.counts` counts what was answered, where the work lands: pushes accepted
    and refused (by the fake's own notion of a push), streams refused, connections made.
    Standalone fakes print the counts on SIGUSR1 (:func:`announce_and_wait`), for the benchmarks.
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import signal
import socket
import ssl
import tempfile
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h11
import trustme
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    PingAckReceived,
    RequestReceived,
    StreamEnded,
    StreamReset,
)
from h2.exceptions import H2Error
from h2.settings import SettingCodes, Settings

from fakes import DrainingServerStateMachine, LoopThread, shared_ca

Headers = list[tuple[bytes, bytes]]
HIGHEST_STREAM_ID = 2**31 - 1
HANG_LIMIT_SECONDS = 60.0
"""A hanging request is given up (reset, or its connection closed) after this long."""
_RECYCLE_PING = b"recycle!"
"""The PING a recycling connection sends after its graceful GOAWAY."""
_WINDOW = 16 * 1024 * 1024
"""The flow-control window the fakes give clients: large, so it rarely sends WINDOW_UPDATE."""
_H2_CONFIG = H2Configuration(
    client_side=False,
    validate_outbound_headers=False,
    normalize_outbound_headers=False,
    validate_inbound_headers=False,
    normalize_inbound_headers=False,
)
"""Header checks off: the fakes check what they need, and a benchmark must measure the client,
not the fake."""


@dataclass(frozen=True)
class Network:
    """How the fake behaves on the network (module docstring)."""

    rtt: float = 0.0
    recycle_after: int | None = None
    max_concurrent_streams: int = 100
    refuse_every: int | None = None

    @classmethod
    def add_arguments(cls, parser: Any, max_concurrent_streams: int) -> None:
        """The command-line options of a standalone fake."""
        parser.add_argument("--rtt-ms", type=float, default=0.0,
                            help="round trip added to every answer (and 2x to a new connection)")
        parser.add_argument("--recycle-after", type=int, default=None,
                            help="recycle a connection with GOAWAY after this many streams")
        parser.add_argument("--max-streams", type=int, default=max_concurrent_streams,
                            help="SETTINGS_MAX_CONCURRENT_STREAMS announced")
        parser.add_argument("--refuse-every", type=int, default=None,
                            help="refuse every n-th stream with RST_STREAM REFUSED_STREAM")

    @classmethod
    def from_arguments(cls, args: Any) -> Network:
        return cls(args.rtt_ms / 1000, args.recycle_after, args.max_streams, args.refuse_every)


@dataclass
class Request:
    """A complete request as a fake's :meth:`FakeServer.handle` sees it."""

    method: bytes
    path: bytes
    headers: Headers
    body: bytes
    connection: int
    """The number of the connection it came on (1, 2, ...)."""
    http_version: str
    """``"2"`` or ``"1.1"``."""
    peer_port: int | None
    stream: Any = None
    """The HTTP/2 connection protocol (for :meth:`Http2Connection.raise_stream_limit`)."""

    def header(self, name: bytes) -> bytes | None:
        return next((v for k, v in self.headers if k == name), None)


@dataclass(frozen=True)
class Reply:
    """An answer. ``push`` says whether the request was a push (what :attr:`FakeServer.counts`
    counts as accepted or refused); ``delay`` adds to the network's round trip."""

    status: int
    headers: tuple[tuple[bytes, bytes], ...] = ()
    body: bytes = b""
    push: bool = True
    delay: float = 0.0


@dataclass(frozen=True)
class Hang:
    """Do not answer: hold the request under ``key`` until :meth:`FakeServer.release` (or
    :data:`HANG_LIMIT_SECONDS`)."""

    key: str = ""
    record: int = -1
    """The fake's record index of the request, handed back to :meth:`FakeServer.released`."""


@dataclass
class Counts:
    """What a fake answered, counted as it was written (module docstring, "Counting")."""

    pushes_accepted: int = 0
    pushes_refused: int = 0
    """Push requests answered with a status outside 2xx."""
    streams_refused: int = 0
    answers_dropped: int = 0
    """Answers that came due after the client had reset their stream (not written)."""
    goaways: int = 0
    connections_made: int = 0
    http1_connections: int = 0
    """Of the connections made, those that speak HTTP/1.1."""
    peak_streams: int = 0
    by_status: dict[int, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"pushes_accepted": self.pushes_accepted, "pushes_refused": self.pushes_refused,
                "streams_refused": self.streams_refused,
                "answers_dropped": self.answers_dropped, "goaways": self.goaways,
                "connections_made": self.connections_made,
                "http1_connections": self.http1_connections, "peak_streams": self.peak_streams,
                "by_status": {str(k): v for k, v in sorted(self.by_status.items())}}


class FakeServer:
    """A fake provider on 127.0.0.1 (module docstring). Start it with :meth:`start` or ``with``.
    Scripting methods and records are safe to use from any thread."""

    name = "fake"
    http1 = False
    """Whether HTTP/1.1 is offered beside HTTP/2 (ALPN ``http/1.1``)."""
    http2 = True
    """Whether HTTP/2 is offered (ALPN ``h2``)."""

    def __init__(self, *, port: int = 0, network: Network = Network()) -> None:
        self.host = "127.0.0.1"
        self.port = port
        self.network = network
        self.lock = threading.Lock()
        self._counts = Counts()
        self._streams_seen = 0
        self._refuse_next = 0
        self._refused: dict[bytes, None] = {}
        """Digests of the requests refused lately (the oldest forgotten past 10,000)."""
        self._connections: set[Http2Connection | Http1Connection] = set()
        self._numbers = 0
        self._workdir: tempfile.TemporaryDirectory[str] | None = None
        self._server: asyncio.Server | None = None
        self._thread = LoopThread()

    # -- life cycle ------------------------------------------------------------------------------

    @property
    def ca_path(self) -> str:
        """The PEM file of the CA that issued the fake's certificate (trust it in clients)."""
        assert self._workdir is not None, "start the fake first"
        return str(Path(self._workdir.name) / "ca.pem")

    @property
    def ca(self) -> trustme.CA:
        return shared_ca()

    def start(self) -> Any:
        """Bind, serve in a background thread, and return once the server is up."""
        self._workdir = tempfile.TemporaryDirectory(prefix=f"{self.name}-")
        self.ca.cert_pem.write_to_path(self.ca_path)
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.ca.issue_cert("localhost", "127.0.0.1").configure_cert(context)
        context.set_alpn_protocols(["h2"] * self.http2 + ["http/1.1"] * self.http1)
        # Bound here, so the port is known before the server runs and no early connection is
        # refused.
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.port))
        sock.listen(1024)
        self.port = sock.getsockname()[1]
        try:
            self._thread.start(f"{self.name}-{self.port}", lambda: self._open(sock, context))
        except BaseException as exc:
            sock.close()
            self.stop()
            raise RuntimeError(f"the {self.name} server did not start") from exc
        return self

    def stop(self) -> None:
        """Stop serving (connections are dropped, hanging requests with them) and remove the
        temporary files."""
        self._thread.stop(self._shutdown)
        if self._workdir is not None:
            self._workdir.cleanup()
            self._workdir = None

    def __enter__(self) -> Any:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    async def _open(self, sock: socket.socket, context: ssl.SSLContext) -> None:
        self._server = await asyncio.get_running_loop().create_server(
            lambda: _Negotiation(self), sock=sock, ssl=context)

    async def _shutdown(self) -> None:
        assert self._server is not None
        self._server.close()
        for connection in list(self._connections):
            connection.transport.abort()
        await self._server.wait_closed()

    # -- what a fake implements ------------------------------------------------------------------

    def handle(self, request: Request) -> Reply | Hang:
        """The answer to a complete request (runs in the server's thread)."""
        raise NotImplementedError

    def released(self, record: int, status: int) -> None:
        """A hanging request (:class:`Hang` ``record``) was answered ``status`` at last."""

    # -- scripting -------------------------------------------------------------------------------

    def goaway(self, last_stream_id: int | None = None) -> None:
        """Send GOAWAY (NO_ERROR) on every HTTP/2 connection now: requests up to
        ``last_stream_id`` (default: the highest each connection received) are still answered,
        later ones were not processed and are never answered."""
        self._in_server(lambda c: c.goaway(last_stream_id))

    def drop_connections(self) -> None:
        """Cut every connection at once, without a word (a crashed front end, a lost route)."""
        self._in_server(lambda c: c.transport.abort())

    def refuse_next(self, count: int = 1) -> None:
        """Refuse the next ``count`` streams with RST_STREAM REFUSED_STREAM."""
        with self.lock:
            self._refuse_next += count

    def release(self, key: str | None, reply: Reply) -> None:
        """Answer the hanging requests held under ``key`` (``None``: all) with ``reply``, also
        on a connection that sent GOAWAY if their streams are at or below its last stream ID."""
        self._in_server(lambda c: c.release(key, reply))

    def _in_server(self, action: Callable[[Any], None]) -> None:
        async def run() -> None:
            for connection in list(self._connections):
                action(connection)

        self._thread.call(run)

    # -- records ---------------------------------------------------------------------------------

    @property
    def counts(self) -> Counts:
        """A copy of the counts so far."""
        with self.lock:
            return Counts(**{**self._counts.__dict__, "by_status": dict(self._counts.by_status)})

    @property
    def connections_made(self) -> int:
        """How many connections were accepted."""
        with self.lock:
            return self._counts.connections_made

    @property
    def peak_streams(self) -> int:
        """The most requests ever in flight (received, not yet answered) on one connection."""
        with self.lock:
            return self._counts.peak_streams

    # -- bookkeeping (server thread) -------------------------------------------------------------

    def _connection_made(self, connection: Http2Connection | Http1Connection) -> int:
        self._connections.add(connection)
        with self.lock:
            self._counts.connections_made += 1
            self._counts.http1_connections += isinstance(connection, Http1Connection)
            self._numbers += 1
            return self._numbers

    def _refuse_this_stream(self, path: bytes, body: bytes) -> bool:
        every = self.network.refuse_every
        with self.lock:
            self._streams_seen += 1
            if not self._refuse_next and (not every or self._streams_seen % every):
                return False
            digest = hashlib.sha256(path + b"\0" + body).digest()
            if digest in self._refused:
                return False
            self._refuse_next = max(self._refuse_next - 1, 0)
            self._refused[digest] = None
            if len(self._refused) > 10_000:
                del self._refused[next(iter(self._refused))]
            self._counts.streams_refused += 1
            return True

    def _answered(self, reply: Reply) -> None:
        with self.lock:
            counts = self._counts
            counts.by_status[reply.status] = counts.by_status.get(reply.status, 0) + 1
            if reply.push:
                if 200 <= reply.status < 300:
                    counts.pushes_accepted += 1
                else:
                    counts.pushes_refused += 1

    def _dropped(self) -> None:
        with self.lock:
            self._counts.answers_dropped += 1

    def _in_flight(self, count: int) -> None:
        if count > self._counts.peak_streams:
            with self.lock:
                self._counts.peak_streams = max(self._counts.peak_streams, count)

    def _goaway_sent(self) -> None:
        with self.lock:
            self._counts.goaways += 1


class _Negotiation(asyncio.Protocol):
    """A new TLS connection: handed to HTTP/2 or HTTP/1.1 by what ALPN agreed."""

    def __init__(self, fake: FakeServer) -> None:
        self.fake = fake

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        ssl_object = transport.get_extra_info("ssl_object")
        http2 = ssl_object is not None and ssl_object.selected_alpn_protocol() == "h2"
        protocol = Http2Connection(self.fake) if http2 else Http1Connection(self.fake)
        transport.set_protocol(protocol)
        protocol.connection_made(transport)


class _Delayed(asyncio.Protocol):
    """A connection's start, two round trips late (module docstring, "Latency")."""

    fake: FakeServer
    transport: asyncio.Transport
    number: int

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.number = self.fake._connection_made(self)  # type: ignore[arg-type]
        peer = transport.get_extra_info("peername")
        self.peer_port = peer[1] if peer else None
        handshake = 2 * self.fake.network.rtt
        if handshake:
            transport.pause_reading()
            asyncio.get_running_loop().call_later(handshake, self._begin)
        else:
            self._begin()

    def _begin(self) -> None:
        if not self.transport.is_closing():
            self.transport.resume_reading()
            self.begin()

    def begin(self) -> None:
        """The connection is open, handshakes done."""

    def connection_lost(self, exc: Exception | None) -> None:
        self.fake._connections.discard(self)  # type: ignore[arg-type]

    def later(self, delay: float, callback: Callable[..., None], *args: Any) -> None:
        """``callback(*args)`` after ``delay`` seconds if the connection is still open."""
        def run() -> None:
            if not self.transport.is_closing():
                callback(*args)
        if delay > 0:
            asyncio.get_running_loop().call_later(delay, run)
        else:
            run()


class Http2Connection(_Delayed):
    """One HTTP/2 connection of a fake: h2 framing, requests handed to the fake's ``handle``,
    answers written once per batch of frames."""

    def __init__(self, fake: FakeServer) -> None:
        self.fake = fake
        self.conn = H2Connection(_H2_CONFIG)
        self.conn.state_machine = DrainingServerStateMachine()
        self.conn.local_settings = Settings(client=False, initial_values={
            SettingCodes.MAX_CONCURRENT_STREAMS: fake.network.max_concurrent_streams,
            SettingCodes.INITIAL_WINDOW_SIZE: _WINDOW,
        })
        self.arriving: dict[int, tuple[Headers, bytearray]] = {}
        """Streams whose request is still arriving."""
        self.unanswered: set[int] = set()
        """Streams received and not yet answered (delayed or hanging)."""
        self.hanging: dict[int, Hang] = {}
        self.reset_by_client: set[int] = set()
        """Streams the client reset while their answer was being prepared."""
        self.last_stream_id = HIGHEST_STREAM_ID
        """The last stream this connection processes: lowered by the final GOAWAY."""
        self.streams = 0
        self.recycling = False
        self.recycle_started = 0.0
        self.stream_limit_raised = False

    def begin(self) -> None:
        self.conn.initiate_connection()
        self.conn.increment_flow_control_window(_WINDOW - 65_535)
        self.transport.write(self.conn.data_to_send())

    def data_received(self, data: bytes) -> None:
        try:
            events = self.conn.receive_data(data)
        except H2Error:
            self.transport.write(self.conn.data_to_send())
            self.transport.close()
            return
        for event in events:
            kind = type(event)
            if kind is RequestReceived:
                self._request_started(event.stream_id, event.headers)  # type: ignore[attr-defined]
            elif kind is DataReceived:
                arriving = self.arriving.get(event.stream_id)  # type: ignore[attr-defined]
                if arriving is not None:
                    arriving[1].extend(event.data)  # type: ignore[attr-defined]
                self.conn.acknowledge_received_data(
                    event.flow_controlled_length, event.stream_id)  # type: ignore[attr-defined]
            elif kind is StreamEnded:
                self._request_complete(event.stream_id)  # type: ignore[attr-defined]
            elif kind is StreamReset:
                stream_id = event.stream_id  # type: ignore[attr-defined]
                if stream_id in self.unanswered and stream_id not in self.hanging:
                    self.reset_by_client.add(stream_id)  # its answer is on its way
                else:
                    self._forget(stream_id)
            elif kind is PingAckReceived:
                if event.ping_data == _RECYCLE_PING:  # type: ignore[attr-defined]
                    elapsed = asyncio.get_running_loop().time() - self.recycle_started
                    self.later(max(self.fake.network.rtt - elapsed, 0.0), self._final_goaway)
            elif kind is ConnectionTerminated:
                self.transport.close()
        self.flush()

    def _final_goaway(self) -> None:
        self._send_goaway(self.conn.highest_inbound_stream_id)

    def flush(self) -> None:
        if not self.transport.is_closing():
            self.transport.write(self.conn.data_to_send())

    def raise_stream_limit(self, limit: int) -> None:
        """Announce a new SETTINGS_MAX_CONCURRENT_STREAMS (applied once the client acks it)."""
        if not self.stream_limit_raised:
            self.stream_limit_raised = True
            self.conn.update_settings({SettingCodes.MAX_CONCURRENT_STREAMS: limit})

    def goaway(self, last_stream_id: int | None) -> None:
        """GOAWAY now, as :meth:`FakeServer.goaway` says."""
        if last_stream_id is None:
            last_stream_id = self.conn.highest_inbound_stream_id
        self._send_goaway(last_stream_id)

    def release(self, key: str | None, reply: Reply) -> None:
        for stream_id, hang in list(self.hanging.items()):
            if key is None or hang.key == key:
                del self.hanging[stream_id]
                self._answer(stream_id, reply)
                self.fake.released(hang.record, reply.status)
        self.flush()

    def _send_goaway(self, last_stream_id: int) -> None:
        self.last_stream_id = min(self.last_stream_id, last_stream_id)
        for stream_id in [s for s in self.unanswered if s > self.last_stream_id]:
            self._forget(stream_id)
        self.conn.close_connection(ErrorCodes.NO_ERROR, self.goaway_data(),
                                   last_stream_id=last_stream_id)
        self.fake._goaway_sent()
        self.flush()
        self._close_if_done()

    def goaway_data(self) -> bytes:
        return getattr(self.fake, "goaway_debug_data", b"")

    def _request_started(self, stream_id: int, headers: Headers) -> None:
        if stream_id > self.last_stream_id:
            return  # after the final GOAWAY: not processed (RFC 9113 section 6.8)
        self.arriving[stream_id] = (headers, bytearray())
        self.unanswered.add(stream_id)
        self.fake._in_flight(len(self.unanswered))
        self.streams += 1
        recycle_after = self.fake.network.recycle_after
        if recycle_after and self.streams >= recycle_after and not self.recycling:
            self.recycling = True
            self._send_goaway(HIGHEST_STREAM_ID)
            # The final one once the client has read the first (the PING sent after it is
            # answered), and at least a round trip later, naming the last stream received then.
            self.conn.ping(_RECYCLE_PING)
            self.recycle_started = asyncio.get_running_loop().time()

    def _request_complete(self, stream_id: int) -> None:
        arriving = self.arriving.pop(stream_id, None)
        if arriving is None:
            return
        headers, body = arriving
        method = path = b""
        for name, value in headers:
            if name == b":method":
                method = value
            elif name == b":path":
                path = value
        if self.fake._refuse_this_stream(path, body):
            self.unanswered.discard(stream_id)
            self.conn.reset_stream(stream_id, ErrorCodes.REFUSED_STREAM)
            self._close_if_done()
            return
        request = Request(method, path, headers, bytes(body), self.number, "2", self.peer_port,
                          self)
        answer = self.fake.handle(request)
        if isinstance(answer, Hang):
            self.hanging[stream_id] = answer
            self.later(HANG_LIMIT_SECONDS, self._give_up, stream_id)
            return
        self.later(self.fake.network.rtt + answer.delay, self._answer_now, stream_id, answer)

    def _answer_now(self, stream_id: int, reply: Reply) -> None:
        self._answer(stream_id, reply)
        self.flush()

    def _answer(self, stream_id: int, reply: Reply) -> None:
        if stream_id not in self.unanswered or stream_id > self.last_stream_id:
            return  # past a GOAWAY
        self.unanswered.discard(stream_id)
        if stream_id in self.reset_by_client:
            self.reset_by_client.discard(stream_id)
            self.fake._dropped()
            self._close_if_done()
            return
        try:
            self.conn.send_headers(stream_id, [(b":status", str(reply.status).encode()),
                                               *reply.headers], end_stream=not reply.body)
            if reply.body:
                self.conn.send_data(stream_id, reply.body, end_stream=True)
        except H2Error:  # the client went away meanwhile
            return
        self.fake._answered(reply)
        self._close_if_done()

    def _give_up(self, stream_id: int) -> None:
        """A hanging request reached :data:`HANG_LIMIT_SECONDS`: reset it."""
        if self.hanging.pop(stream_id, None) is not None:
            self.unanswered.discard(stream_id)
            try:
                self.conn.reset_stream(stream_id, ErrorCodes.CANCEL)
            except H2Error:
                return
            self.flush()

    def _forget(self, stream_id: int) -> None:
        self.reset_by_client.discard(stream_id)
        self.arriving.pop(stream_id, None)
        self.unanswered.discard(stream_id)
        self.hanging.pop(stream_id, None)

    def _close_if_done(self) -> None:
        """After the final GOAWAY, close once every stream it took is answered."""
        if self.last_stream_id < HIGHEST_STREAM_ID and not self.unanswered:
            self.flush()
            self.transport.close()


class Http1Connection(_Delayed):
    """One HTTP/1.1 connection, parsed by h11; requests answered one at a time, in order."""

    def __init__(self, fake: FakeServer) -> None:
        self.fake = fake
        self.conn = h11.Connection(h11.SERVER)
        self.request: h11.Request | None = None
        self.body = bytearray()
        self.requests = 0
        self.hanging: Hang | None = None

    def data_received(self, data: bytes) -> None:
        self.conn.receive_data(data)
        self._next()

    def goaway(self, last_stream_id: int | None) -> None:
        """HTTP/1.1 has no GOAWAY: nothing to do."""

    def release(self, key: str | None, reply: Reply) -> None:
        hang = self.hanging
        if hang is not None and (key is None or hang.key == key):
            self.hanging = None
            self._answer(reply)
            self.fake.released(hang.record, reply.status)

    def _next(self) -> None:
        while True:
            try:
                event = self.conn.next_event()
            except h11.RemoteProtocolError:
                self.transport.close()
                return
            if event is h11.NEED_DATA or event is h11.PAUSED:
                return
            if isinstance(event, h11.Request):
                self.request, self.body = event, bytearray()
            elif isinstance(event, h11.Data):
                self.body.extend(event.data)
            elif isinstance(event, h11.EndOfMessage):
                self._request_complete()
                return
            elif isinstance(event, h11.ConnectionClosed):
                self.transport.close()
                return

    def _request_complete(self) -> None:
        assert self.request is not None
        self.requests += 1
        request = self.request
        headers = [(k.lower(), v) for k, v in request.headers]
        answer = self.fake.handle(Request(request.method, request.target, headers,
                                          bytes(self.body), self.number, "1.1", self.peer_port))
        if isinstance(answer, Hang):
            self.hanging = answer
            self.later(HANG_LIMIT_SECONDS, self.transport.close)
        else:
            self.later(self.fake.network.rtt + answer.delay, self._answer, answer)

    def _answer(self, reply: Reply) -> None:
        recycle_after = self.fake.network.recycle_after
        headers = [*reply.headers, (b"content-length", str(len(reply.body)).encode())]
        if recycle_after and self.requests >= recycle_after:
            headers.append((b"connection", b"close"))
        data = self.conn.send(h11.Response(status_code=reply.status, headers=headers))
        data += self.conn.send(h11.Data(data=reply.body)) + self.conn.send(h11.EndOfMessage())
        self.fake._answered(reply)  # counted before the client can see it
        self.transport.write(data)
        if self.conn.our_state is h11.MUST_CLOSE:
            self.transport.close()
            return
        self.conn.start_next_cycle()
        self._next()  # a request the client sent meanwhile


def announce_and_wait(info: dict[str, object], fake: FakeServer | None = None,
                      lines: Iterable[str] = ()) -> None:
    """For a standalone fake: print what a client needs to reach it as one JSON line (then
    ``lines``), then serve until SIGINT or SIGTERM, printing :attr:`FakeServer.counts` as a
    JSON line on each SIGUSR1.

    The kernel may deliver a signal to the server's thread, where Python only notes it for the
    main thread: the main thread wakes twice a second to run the handler, or it would wait on
    forever (a Ctrl-C of the local stack then ends in its SIGKILL)."""
    print(json.dumps(info), flush=True)
    for line in lines:
        print(line)
    print(end="", flush=True)
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    if fake is not None:
        signal.signal(signal.SIGUSR1,
                      lambda *_: print(json.dumps({"counts": fake.counts.as_dict()}), flush=True))
    while not stop.wait(0.5):
        pass
