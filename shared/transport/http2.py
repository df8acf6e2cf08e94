"""The HTTP/2 client of every provider: a pool of connections to one origin on asyncio and h2.

APNs and FCM send through it, and Web Push to push services that agree to HTTP/2. It costs a
fraction of a general client per request (httpx, with httpcore and anyio under it, ran about
4,500 Python calls per request), and it does what the providers' networks require:

Concurrency
    Each connection carries as many requests as the server's SETTINGS_MAX_CONCURRENT_STREAMS
    allows, as the server changes it (APNs starts a connection at 1 and raises it after the first
    authenticated request; Google's front ends allow 100); a connection is used once its SETTINGS
    arrived. When every stream is taken and requests wait, the pool opens another connection, up
    to ``max_connections``: at a 50 ms round trip one connection of 100 streams carries at most
    2,000 requests/s, so the pool grows with latency and load. A busy pool keeps a second
    connection open, so a recycled one does not stall requests behind a handshake.
GOAWAY (RFC 9113 section 6.8)
    A connection that receives GOAWAY takes no new request and finishes those the server says it
    processed; a graceful GOAWAY (last stream ID 2^31-1, then the final one) lets everything sent
    until the final one finish. A request the server did not process (a stream above the last
    stream ID, one refused with REFUSED_STREAM, or one never written because the connection went
    first) is sent again inside :meth:`Http2Pool.request`, on a connection that takes requests
    (after a GOAWAY, another one): it is not a failure. A request is sent again once for a
    connection going away and once for REFUSED_STREAM, so at most three times, and only ever
    processed once. h2 throws away what it has queued to send when it reads a GOAWAY, so what the
    loop turn queued is written before any frame received is read: no request is lost unsent.
Quiet connections
    A connection that has been quiet for ``idle_ping_after`` seconds is checked with a PING
    before it takes a request; one that does not answer within ``ping_timeout`` is dropped, so a
    half-open connection (a NAT or a load balancer that forgot it) costs a ping, not a request's
    timeout.
Limits on what a server sends
    Server push is off (SETTINGS_ENABLE_PUSH 0); response headers are validated by h2 (a few per
    answer, so it is cheap) and bounded by SETTINGS_MAX_HEADER_LIST_SIZE; a response body is kept
    up to ``max_body`` bytes, past which the stream is reset and the request fails: a hostile or
    broken endpoint (or proxy) cannot grow our memory.
HPACK
    h2 Huffman-codes every header in pure Python. :class:`LiteralEncoder` keeps the encoded form
    of each header it has seen, as plain literals outside the dynamic table, so encoding a
    request is a join of cached bytes. ``authorization`` is marked never-indexed.
Writes
    What h2 queues is written once per turn of the event loop, so the requests of one turn
    (an event's sends) leave in one TLS record and one system call.

Failures raise :class:`TransportError` (an :class:`OSError`), or the socket's or TLS's own
:class:`OSError`; a request that outlives ``timeout`` raises :class:`TimeoutError` (itself an
:class:`OSError`: catch it first), and nothing waits forever.
"""
from __future__ import annotations

import asyncio
import json
import logging
import re
import ssl
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

from h2.config import H2Configuration
from h2.connection import (
    ConnectionInputs,
    ConnectionState,
    H2Connection,
    H2ConnectionStateMachine,
)
from h2.errors import ErrorCodes
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    PingAckReceived,
    RemoteSettingsChanged,
    ResponseReceived,
    StreamEnded,
    StreamReset,
)
from h2.exceptions import H2Error
from h2.settings import SettingCodes, Settings
from hpack import Encoder
from hpack.hpack import encode_integer
from hpack.table import HeaderTable

from shared.transport.connect import Origin, Resolver, TransportError, open_connection
from shared.transport.proxy import Proxy

Header = tuple[bytes, bytes]

log = logging.getLogger(__name__)
# hpack's debug log prints every header, device tokens in APNs paths and bearer tokens included.
logging.getLogger("hpack").setLevel(logging.CRITICAL)

CLIENT_CONFIG = H2Configuration(
    client_side=True,
    validate_outbound_headers=False,
    normalize_outbound_headers=False,
    validate_inbound_headers=True,
    normalize_inbound_headers=False,
)
"""Outbound headers are built once and correctly by the providers (tests pin their form), so
h2's per-header generator chain is skipped for them; inbound ones are few and are checked."""
_RECEIVE_WINDOW = 16 * 1024 * 1024
"""Our flow-control window, per connection and per stream: answers are small, and a window this
large means WINDOW_UPDATE frames are rare. A body past ``max_body`` is refused long before."""
_MAX_HEADER_LIST_SIZE = 16 * 1024
"""SETTINGS_MAX_HEADER_LIST_SIZE we announce and h2's decoder enforces on answers."""
_MAX_ENCODED_HEADERS = 256
"""Encoded headers kept per connection; past it the cache starts again (old tokens go)."""
_MAX_STREAMS_PER_CONNECTION = 10_000
"""Streams used at once on a connection whose server sets no limit, or a very high one."""
DEFAULT_MAX_BODY = 64 * 1024
"""The most of a response body kept: every provider's answers are well under a kilobyte."""
SPARE_AFTER = 32
"""Requests in flight on a pool's only connection that make it open a second (a spare)."""
DEFAULT_IDLE_PING_AFTER = 10.0
DEFAULT_PING_TIMEOUT = 2.0


class DrainingStateMachine(H2ConnectionStateMachine):
    """h2's connection state machine, except that a GOAWAY received leaves the connection open.

    h2 closes it at once and then rejects every frame as a protocol error (python-hyper/h2#1199),
    which would drop the answers RFC 9113 section 6.8 lets the server still send, to the streams
    up to the GOAWAY's last stream ID. h2 then still lets new streams start: :class:`_Connection`
    opens none on such a connection (``accepting``)."""

    _transitions = {
        **H2ConnectionStateMachine._transitions,
        (ConnectionState.CLIENT_OPEN, ConnectionInputs.RECV_GOAWAY):
            (None, ConnectionState.CLIENT_OPEN),
    }


class _CountingH2Connection(H2Connection):
    """h2's connection, counting its open outbound streams from the client's own bookkeeping.

    h2 counts them for every new stream by walking all its streams (``_open_streams``), which at
    hundreds of streams in flight per connection (APNs allows 1,000) was a third of a request's
    CPU. The client knows the count (its requests in flight, ``streams``); h2's walk, which also
    forgets closed streams, runs only when closed ones have piled up."""

    client_streams: dict[int, Any] = {}

    @property
    def open_outbound_streams(self) -> int:
        in_flight = len(self.client_streams)
        if len(self.streams) > 2 * in_flight + 64:
            return self._open_streams(1)
        return in_flight


class NotProcessed(TransportError):
    """The server did not process the request: sending it again cannot deliver it twice.
    ``refused`` tells a REFUSED_STREAM from a connection going away (GOAWAY past its stream, or
    lost before the request was written)."""

    def __init__(self, message: str, *, refused: bool = False) -> None:
        super().__init__(message)
        self.refused = refused


@dataclass(frozen=True, slots=True)
class Response:
    """One answer: the status, the response headers (names lower-case, as HTTP/2 has them) and
    the whole body."""

    status: int
    headers: list[Header]
    body: bytes

    def header(self, name: bytes) -> bytes | None:
        """The first value of header ``name`` (lower-case), or ``None``."""
        return next((v for k, v in self.headers if k == name), None)


@dataclass
class PoolStats:
    """What the pool did, for tests and benchmarks."""

    connections_opened: int = 0
    retried: int = 0
    """Requests sent again because the server had not processed them."""
    pings: int = 0


class Http2Pool:
    """HTTP/2 connections to one origin, opened on demand, for the event loop that first uses
    it (connections belong to their loop). See the module docstring."""

    def __init__(
        self,
        origin: Origin,
        tls: ssl.SSLContext | None,
        *,
        timeout: float,
        max_connections: int,
        proxy: Proxy | None = None,
        encoder_per_request: frozenset[bytes] = frozenset(),
        max_body: int = DEFAULT_MAX_BODY,
        idle_ping_after: float = DEFAULT_IDLE_PING_AFTER,
        ping_timeout: float = DEFAULT_PING_TIMEOUT,
        resolve: Resolver | None = None,
    ) -> None:
        """``tls`` must offer ALPN ``h2`` (``None`` for an ``http`` origin, HTTP/2 with prior
        knowledge); ``timeout`` bounds each request from the moment it is made (waiting for a
        stream, a connection, a PING, a retry included) and each connection attempt.
        ``encoder_per_request`` names headers whose values change with every request (APNs'
        device path): they are encoded each time, never cached. ``resolve`` gives the checked
        addresses to connect to (:data:`shared.transport.connect.Resolver`)."""
        self.origin = origin
        self._resolve = resolve
        self._tls = tls
        self._timeout = timeout
        self._max_connections = max_connections
        self._proxy = proxy
        self._per_request = encoder_per_request
        self.max_body = max_body
        self.idle_ping_after = idle_ping_after
        self.ping_timeout = ping_timeout
        self.stats = PoolStats()
        self._connections: list[_Connection] = []
        """Connections that take new requests (not those draining after GOAWAY)."""
        self._all: set[_Connection] = set()
        self._connecting = 0
        self._connects: set[asyncio.Task[None]] = set()
        """Connection attempts under way (held: the loop keeps only weak references)."""
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._closed = False

    async def request(self, headers: list[Header], body: bytes) -> Response:
        """Send one request (``headers`` in HTTP/2 form, pseudo-headers first) and return its
        answer; a request the server did not process is sent again (module docstring, GOAWAY).
        Raises :class:`TimeoutError` or another :class:`OSError`."""
        retried: set[bool] = set()
        async with asyncio.timeout(self._timeout):
            while True:
                try:
                    return await self._attempt(headers, body)
                except NotProcessed as exc:
                    if exc.refused in retried:
                        raise
                    retried.add(exc.refused)
                    self.stats.retried += 1

    async def aclose(self) -> None:
        """Drop every connection (aborted: a TLS close_notify could wait on a peer that is
        gone, and nothing is lost) and wait until they are closed; fail waiting requests."""
        self._closed = True
        self._wake(len(self._waiters))
        for task in self._connects:
            task.cancel()
        connections = list(self._all)
        for connection in connections:
            connection.abort()
        await asyncio.gather(*(c.lost for c in connections))

    async def _attempt(self, headers: list[Header], body: bytes) -> Response:
        connection = await self._acquire()
        future: asyncio.Future[Response] = asyncio.get_running_loop().create_future()
        stream_id = connection.start(headers, body, future)
        self._keep_a_spare(connection)
        try:
            return await future
        except asyncio.CancelledError:
            connection.cancel(stream_id)
            raise

    # -- connections ------------------------------------------------------------------------

    async def _acquire(self) -> _Connection:
        """A connection with a free stream, checked with a PING first if it was quiet."""
        while True:
            connection = self._free_connection() or await self._wait_for_connection()
            if not connection.quiet_for(self.idle_ping_after):
                return connection
            await connection.check(self.ping_timeout)  # then look again: it may be gone

    def _free_connection(self) -> _Connection | None:
        for connection in self._connections:
            if len(connection.streams) < connection.capacity:
                return connection
        return None

    async def _wait_for_connection(self) -> _Connection:
        loop = asyncio.get_running_loop()
        while True:
            if self._closed:
                raise TransportError("the connection pool is closed")
            connection = self._free_connection()
            if connection is not None:
                return connection
            waiter: asyncio.Future[None] = loop.create_future()
            self._waiters.append(waiter)
            self._grow()
            try:
                await waiter
            except asyncio.CancelledError:
                if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                    self._wake(1)  # woken and cancelled at once: pass the turn on
                else:
                    waiter.cancel()
                raise

    def _grow(self) -> None:
        """Open connections, within the limit, for the requests waiting beyond what those
        being opened will take. With none open, one per 100 waiting requests (the common
        limit), so a burst does not wait for handshakes one after the other; with one open,
        one at a time, since an open connection's limit may still rise (APNs raises it from 1
        after the first request)."""
        opened = len(self._connections)
        if opened and self._connecting:
            return
        per_connection = max((c.capacity for c in self._connections), default=100)
        while (opened + self._connecting < self._max_connections
               and len(self._waiters) > self._connecting * per_connection):
            self._open_one()
            if opened:
                return

    def _keep_a_spare(self, busy: _Connection) -> None:
        """A busy pool with one connection opens a second before it needs it: when the first
        is recycled (GOAWAY, every ~1,000 streams on Google's and Apple's front ends), requests
        go on at once on the other instead of waiting for a handshake."""
        if (len(busy.streams) >= SPARE_AFTER and len(self._connections) < 2
                and not self._connecting and self._max_connections > 1):
            self._open_one()

    def _open_one(self) -> None:
        self._connecting += 1
        task = asyncio.get_running_loop().create_task(self._connect())
        self._connects.add(task)
        task.add_done_callback(self._connects.discard)

    async def _connect(self) -> None:
        connection = _Connection(self)
        try:
            async with asyncio.timeout(self._timeout):
                await open_connection(lambda: connection, self.origin, self._tls, self._proxy,
                                      self._resolve)
                if not connection.speaks_h2:
                    raise NoHttp2("the server did not agree to HTTP/2 (ALPN h2)",
                                  connection.detach())
                await connection.settings_received
        except BaseException as exc:  # whatever stops it, the waiting requests must hear of it
            connection.abort()
            self._connecting -= 1
            if isinstance(exc, NoHttp2) and (self._connections or self._connecting):
                exc.close()  # another attempt will tell the waiting requests
            if not self._connections and not self._connecting:
                # Nothing else will serve the waiting requests: they fail with this attempt.
                # The socket's or TLS's own error says most (a refused port, an untrusted
                # certificate), and one that is no OSError (a host name IDNA cannot encode) is
                # no transport failure; a timeout is the request's own when nothing answers.
                failure = exc if isinstance(exc, Exception) and not isinstance(
                    exc, TimeoutError) else TransportError(
                    f"cannot connect to {self.origin.host}: {type(exc).__name__}")
                while self._waiters:
                    waiter = self._waiters.popleft()
                    if not waiter.done():
                        waiter.set_exception(failure)
            if not isinstance(exc, Exception):
                raise
            return
        self._connecting -= 1
        if self._closed:
            connection.abort()
            return
        self.stats.connections_opened += 1
        self._connections.append(connection)
        self._wake(connection.capacity)
        self._grow()  # if the server allows fewer streams than hoped, and requests still wait

    def _wake(self, count: int) -> None:
        """Let up to ``count`` waiting requests look for a stream again."""
        waiters = self._waiters
        while count > 0 and waiters:
            waiter = waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                count -= 1

    def _released(self, connection: _Connection) -> None:
        if self._waiters and connection.accepting:
            self._wake(1)

    def _retired(self, connection: _Connection) -> None:
        """``connection`` takes no more requests (GOAWAY or lost): waiting requests may need a
        new one."""
        if connection in self._connections:
            self._connections.remove(connection)
        self._wake(len(self._waiters))


class NoHttp2(TransportError):
    """The server chose another protocol than HTTP/2 in ALPN (a Web Push service on HTTP/1.1).
    The connection is open, TLS done: :meth:`take` hands it to an HTTP/1.1 client (once), so
    the push goes on it rather than on a new connection to an address looked up again."""

    def __init__(self, message: str, transport: asyncio.Transport | None) -> None:
        super().__init__(message)
        self._transport = transport

    def take(self) -> asyncio.Transport | None:
        """The open connection, reading paused, or ``None`` when already taken or closed."""
        transport, self._transport = self._transport, None
        return transport

    def close(self) -> None:
        transport = self.take()
        if transport is not None:
            transport.abort()


class _Stream:
    """One request in flight: its future and what has arrived of the answer."""

    __slots__ = ("future", "status", "headers", "body")

    def __init__(self, future: asyncio.Future[Response]) -> None:
        self.future = future
        self.status = 0
        self.headers: list[Header] = []
        self.body = b""


class _Connection(asyncio.Protocol):
    """One HTTP/2 connection of a :class:`Http2Pool`."""

    def __init__(self, pool: Http2Pool) -> None:
        self.pool = pool
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.streams: dict[int, _Stream] = {}
        h2 = self.h2 = _CountingH2Connection(CLIENT_CONFIG)
        h2.client_streams = self.streams
        h2.state_machine = DrainingStateMachine()
        h2.encoder = LiteralEncoder(pool._per_request)
        # Initial values, sent by initiate_connection in its SETTINGS.
        h2.local_settings = Settings(client=True, initial_values={
            **h2.local_settings,
            SettingCodes.ENABLE_PUSH: 0,
            SettingCodes.INITIAL_WINDOW_SIZE: _RECEIVE_WINDOW,
            SettingCodes.MAX_HEADER_LIST_SIZE: _MAX_HEADER_LIST_SIZE,
        })
        h2.decoder.max_header_list_size = _MAX_HEADER_LIST_SIZE
        self.capacity = 1
        """Requests this connection may carry at once: 1 until the server's SETTINGS say."""
        self.accepting = True
        self.speaks_h2 = True
        """False when TLS's ALPN chose another protocol than h2."""
        self.lost: asyncio.Future[None] = self.loop.create_future()
        self.settings_received: asyncio.Future[None] = self.loop.create_future()
        self.last_received = time.monotonic()
        self.written_stream_id = 0
        """The highest stream whose HEADERS were handed to the transport."""
        self._ping: asyncio.Future[None] | None = None
        self._unsent: dict[int, memoryview] = {}
        """Request bodies (the rest of them) waiting for the server's flow-control window."""
        self._flush_scheduled = False

    # -- requests ---------------------------------------------------------------------------

    def start(self, headers: list[Header], body: bytes, future: asyncio.Future[Response]) -> int:
        h2 = self.h2
        stream_id = h2.get_next_available_stream_id()
        h2.send_headers(stream_id, headers, end_stream=not body)
        self.streams[stream_id] = _Stream(future)
        if body:
            self._send_body(stream_id, memoryview(body))
        self._flush_soon()
        return stream_id

    def cancel(self, stream_id: int) -> None:
        """The caller gave up on ``stream_id`` (timeout): tell the server and free the slot."""
        if self.streams.pop(stream_id, None) is None:
            return
        self._unsent.pop(stream_id, None)
        if self.transport is not None and not self.transport.is_closing():
            try:
                self.h2.reset_stream(stream_id, ErrorCodes.CANCEL)
            except H2Error:
                pass
            self._flush_soon()
        self._stream_done()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()
        elif not self.lost.done():
            self.lost.set_result(None)

    def detach(self) -> asyncio.Transport | None:
        """Give up the transport (to another protocol): this connection is done with it."""
        transport, self.transport = self.transport, None
        self.pool._all.discard(self)
        if not self.lost.done():
            self.lost.set_result(None)
        return transport

    def quiet_for(self, seconds: float) -> bool:
        """Nothing in flight and nothing heard for ``seconds``: worth a PING before use."""
        return not self.streams and time.monotonic() - self.last_received > seconds

    async def check(self, timeout: float) -> None:
        """PING the server (one PING shared by every request that asks meanwhile); drop the
        connection when no answer comes within ``timeout``."""
        if self._ping is None or self._ping.done():
            self._ping = self.loop.create_future()
            self.pool.stats.pings += 1
            self.h2.ping(b"\0" * 8)
            self._flush_soon()
        try:
            async with asyncio.timeout(timeout):
                await asyncio.shield(self._ping)
        except (TimeoutError, OSError):
            self.accepting = False
            self.pool._retired(self)
            self.abort()

    def _send_body(self, stream_id: int, body: memoryview) -> None:
        h2 = self.h2
        while body:
            size = min(len(body), h2.local_flow_control_window(stream_id),
                       h2.max_outbound_frame_size)
            if size <= 0:
                self._unsent[stream_id] = body
                return
            h2.send_data(stream_id, body[:size].tobytes(), end_stream=size == len(body))
            body = body[size:]

    def _resume_bodies(self) -> None:
        unsent, self._unsent = self._unsent, {}
        for stream_id, body in unsent.items():
            self._send_body(stream_id, body)

    # -- protocol ---------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's are no subclass
        self.pool._all.add(self)
        ssl_object = transport.get_extra_info("ssl_object")
        if ssl_object is not None and ssl_object.selected_alpn_protocol() != "h2":
            self.speaks_h2 = False  # not a byte of HTTP/2 to a server that chose another
            transport.pause_reading()  # type: ignore[attr-defined]
            return
        h2 = self.h2
        h2.initiate_connection()
        h2.increment_flow_control_window(_RECEIVE_WINDOW - 65_535)
        transport.write(h2.data_to_send())  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        # h2 discards what it has queued when it reads a GOAWAY: what this turn queued (new
        # requests' HEADERS) goes out first, so it is either processed or refused in the open.
        self._flush_now()
        self.last_received = time.monotonic()
        try:
            events = self.h2.receive_data(data)
        except H2Error:
            # A protocol error ends the connection: no request may start on it meanwhile.
            self.accepting = False
            self.pool._retired(self)
            self._flush_now()
            self.abort()
            return
        streams = self.streams
        for event in events:
            kind = type(event)
            if kind is DataReceived:
                stream_id: int = event.stream_id  # type: ignore[attr-defined]
                stream = streams.get(stream_id)
                self.h2.acknowledge_received_data(
                    event.flow_controlled_length, stream_id)  # type: ignore[attr-defined]
                if stream is not None:
                    stream.body += event.data  # type: ignore[attr-defined]
                    if len(stream.body) > self.pool.max_body:
                        self._refuse_answer(stream_id)
            elif kind is ResponseReceived:
                stream = streams.get(event.stream_id)  # type: ignore[attr-defined]
                if stream is not None:
                    headers: list[Header] = event.headers  # type: ignore[attr-defined]
                    status = next((int(v) for k, v in headers if k == b":status"), 0)
                    if status >= 200:  # not an informational answer: the real one
                        stream.status, stream.headers = status, headers
            elif kind is StreamEnded:
                self._stream_ended(event.stream_id)  # type: ignore[attr-defined]
            elif kind is StreamReset:
                code = event.error_code  # type: ignore[attr-defined]
                if code == ErrorCodes.REFUSED_STREAM:
                    self._fail(event.stream_id,  # type: ignore[attr-defined]
                               NotProcessed("the server refused the stream", refused=True))
                else:
                    self._fail(event.stream_id, TransportError(  # type: ignore[attr-defined]
                        f"the server reset the stream ({_code_name(code)})"))
            elif kind is RemoteSettingsChanged:
                self._settings_changed(event)  # type: ignore[arg-type]
            elif kind is PingAckReceived:
                if self._ping is not None and not self._ping.done():
                    self._ping.set_result(None)
            elif kind is ConnectionTerminated:
                self._goaway(event)  # type: ignore[arg-type]
        if self._unsent:
            # Only now that every event is handled (a WINDOW_UPDATE or SETTINGS may have opened
            # the window): a stream the server reset in the same read is already closed in h2,
            # and is out of ``_unsent`` only after its StreamReset.
            self._resume_bodies()
        self._flush_soon()

    def connection_lost(self, exc: Exception | None) -> None:
        self.accepting = False
        self.pool._all.discard(self)
        streams = dict(self.streams)
        self.streams.clear()  # in place: h2 counts from it
        for stream_id, stream in streams.items():
            if not stream.future.done():
                failure = (TransportError("the connection was lost") if
                           stream_id <= self.written_stream_id else
                           NotProcessed("the connection was lost before the request was sent"))
                stream.future.set_exception(failure)
        for waiting in (self.settings_received, self._ping):
            if waiting is not None and not waiting.done():
                waiting.set_exception(TransportError("the connection was lost"))
                waiting.exception()  # retrieved here if nobody waits any more
        self.pool._retired(self)
        if not self.lost.done():
            self.lost.set_result(None)

    def _refuse_answer(self, stream_id: int) -> None:
        """A body past the pool's limit: stop the stream and fail its request."""
        try:
            self.h2.reset_stream(stream_id, ErrorCodes.CANCEL)
        except H2Error:
            pass
        self._fail(stream_id, TransportError(
            f"the answer's body is over {self.pool.max_body} bytes"))

    def _stream_ended(self, stream_id: int) -> None:
        stream = self.streams.pop(stream_id, None)
        if stream is None:
            return
        if self._unsent.pop(stream_id, None) is not None:
            # Answered before the whole body went (RFC 9113 section 8.1): the rest is not
            # needed, and the stream, open in h2 until it is sent, would hold a server stream.
            self.h2.reset_stream(stream_id, ErrorCodes.CANCEL)
        if not stream.future.done():
            stream.future.set_result(Response(stream.status, stream.headers, stream.body))
        self._stream_done()

    def _fail(self, stream_id: int, failure: TransportError) -> None:
        stream = self.streams.pop(stream_id, None)
        self._unsent.pop(stream_id, None)
        if stream is None:
            return
        if not stream.future.done():
            stream.future.set_exception(failure)
        self._stream_done()

    def _stream_done(self) -> None:
        if self.accepting:
            self.pool._released(self)
        elif not self.streams and self.transport is not None:
            self.transport.close()  # drained after GOAWAY

    def _settings_changed(self, event: RemoteSettingsChanged) -> None:
        changed = event.changed_settings.get(SettingCodes.MAX_CONCURRENT_STREAMS)
        if changed is not None or not self.settings_received.done():
            before = self.capacity
            # A server that sets no limit allows any number (RFC 9113 section 6.5.2).
            self.capacity = min(self.h2.remote_settings.max_concurrent_streams,
                                _MAX_STREAMS_PER_CONNECTION)
            if self.accepting and self.capacity > before:
                self.pool._wake(self.capacity - before)
        if not self.settings_received.done():
            self.settings_received.set_result(None)

    def _goaway(self, event: ConnectionTerminated) -> None:
        """The server takes no new streams: those after the last stream ID were not processed
        (sent again elsewhere); the others may still be answered. A graceful GOAWAY
        (2^31-1) fails nothing; its final one then does."""
        last_stream_id = event.last_stream_id or 0
        code = event.error_code
        # A recycled connection (NO_ERROR) is routine: front ends do it every ~1,000 streams.
        log.log(logging.INFO if code == ErrorCodes.NO_ERROR else logging.WARNING,
                "HTTP/2 connection to %s going away: code=%s, reason=%s, last_stream_id=%s",
                self.pool.origin.host, _code_name(code), _goaway_reason(event.additional_data),
                last_stream_id)
        self.accepting = False
        for stream_id in [s for s in self.streams
                          if s > last_stream_id or s > self.written_stream_id]:
            self._fail(stream_id, NotProcessed("the server did not process the request (GOAWAY)"))
        self.pool._retired(self)
        if not self.streams and self.transport is not None:
            self.transport.close()

    # -- writing ----------------------------------------------------------------------------

    def _flush_soon(self) -> None:
        """Write what h2 has queued at the end of this loop turn, once for all requests."""
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self.loop.call_soon(self._flush_now)

    def _flush_now(self) -> None:
        self._flush_scheduled = False
        data = self.h2.data_to_send()
        if data and self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)
            self.written_stream_id = self.h2.highest_outbound_stream_id or 0


def _code_name(code: Any) -> str:
    return code.name if isinstance(code, ErrorCodes) else str(code)


_GOAWAY_REASON = re.compile(r"[A-Za-z]{1,64}")


def _goaway_reason(debug_data: bytes | None) -> str:
    """The reason in a GOAWAY's debug data when it is a word in Apple's form
    (``{"reason": "Shutdown"}``), else ``unknown``: never the raw data, which is not known to be
    free of tokens."""
    try:
        reason = json.loads(debug_data or b"").get("reason")
    except (ValueError, AttributeError):
        return "unknown"
    return reason if isinstance(reason, str) and _GOAWAY_REASON.fullmatch(reason) else "unknown"


class LiteralEncoder(Encoder):
    """HPACK encoding from a cache of each header's encoded form (module docstring, "HPACK").

    Every header is a static-table index when the static table has the pair, else a literal
    (with the static table's index for the name when it has one) that stays out of the dynamic
    table, never-indexed for ``authorization``. Nothing enters the dynamic table, so a cached
    form stays right for the connection's life; table size updates the server asks for are
    still signalled, as HPACK requires. Headers named in ``per_request`` (values that change
    with every request, like APNs' device path) are encoded each time and never cached."""

    def __init__(self, per_request: frozenset[bytes] = frozenset()) -> None:
        super().__init__()
        self._encoded: dict[Any, bytes] = {}
        self._per_request = per_request

    def encode(self, headers: Any, huffman: bool = True) -> bytes:
        encoded, per_request = self._encoded, self._per_request
        parts = []
        for header in headers:
            if header[0] in per_request:
                parts.append(_encode_header(*header))
                continue
            form = encoded.get(header)
            if form is None:
                if len(encoded) >= _MAX_ENCODED_HEADERS:
                    encoded.clear()
                form = encoded[header] = _encode_header(*header)
            parts.append(form)
        block = b"".join(parts)
        if self.header_table.resized:
            block = self._encode_table_size_change() + block
            self.header_table.resized = False
        return block


_STATIC_PAIRS = {pair: index for index, pair in
                 reversed(list(enumerate(HeaderTable.STATIC_TABLE, start=1)))}
_STATIC_NAMES = {name: index for index, (name, _) in
                 reversed(list(enumerate(HeaderTable.STATIC_TABLE, start=1)))}
_NEVER_INDEXED = frozenset({b"authorization", b"proxy-authorization", b"cookie"})


def _encode_header(name: bytes, value: bytes) -> bytes:
    """One header as HPACK (RFC 7541 section 6), without Huffman coding."""
    index = _STATIC_PAIRS.get((name, value))
    if index is not None:
        prefix = encode_integer(index, 7)
        prefix[0] |= 0x80
        return bytes(prefix)
    flag = 0x10 if name in _NEVER_INDEXED else 0x00
    name_index = _STATIC_NAMES.get(name)
    if name_index is not None:
        prefix = encode_integer(name_index, 4)
        prefix[0] |= flag
        return bytes(prefix) + _string(value)
    return bytes((flag,)) + _string(name) + _string(value)


def _string(data: bytes) -> bytes:
    return bytes(encode_integer(len(data), 7)) + data
