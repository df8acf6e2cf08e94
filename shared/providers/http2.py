"""A small HTTP/2 client for one origin: a bounded pool of connections on asyncio and h2.

It exists for providers that make many small requests to one endpoint (FCM's ``messages:send``),
where a general client costs more than the request: httpx, with httpcore and anyio under it, ran
about 4,500 Python calls per request. This is the design aioapns gives the APNs provider (an
:class:`asyncio.Protocol` per connection, h2 for the framing), with what made APNs cheap:

HPACK
    h2 Huffman-codes every header in pure Python. :class:`LiteralEncoder` keeps the encoded form
    of each header it has seen (a request's headers are the same from one request to the next,
    the bearer token changing hourly), as plain literals outside the dynamic table, so encoding a
    request is a join of cached bytes. ``authorization`` is marked never-indexed.
Validation
    h2's header validation and normalisation run a chain of generators per header; the caller
    builds its headers once and correctly, so they are off both ways.
Writes
    What h2 queues is written once per turn of the event loop, so the requests of one turn
    (an event's sends) leave in one TLS record and one system call.

Limits: at most ``max_connections`` connections and, on each, at most ``max_streams`` requests in
flight, or fewer if the server's ``SETTINGS_MAX_CONCURRENT_STREAMS`` says so; further requests
wait their turn. A connection that receives GOAWAY takes no new requests (the next one opens a
fresh connection), finishes those the server says it processed, and fails the others; one that is
lost fails every request in flight. Failures raise :class:`OSError` (:class:`Http2Unavailable`,
or the socket's or TLS's own), a request that outlives ``timeout`` raises :class:`TimeoutError`
(itself an :class:`OSError`: catch it first), and nothing waits forever.

Forward proxies: given a :class:`Proxy` (see :func:`proxy_from_environment`, which reads
``HTTPS_PROXY``/``NO_PROXY`` the way curl and httpx do), each connection is an HTTP CONNECT
tunnel through it, with TLS to the origin inside.
"""
from __future__ import annotations

import asyncio
import base64
import os
import ssl
from collections import deque
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

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
    RemoteSettingsChanged,
    ResponseReceived,
    StreamEnded,
    StreamReset,
)
from h2.exceptions import H2Error
from h2.settings import SettingCodes
from hpack import Encoder
from hpack.hpack import encode_integer
from hpack.table import HeaderTable

Header = tuple[bytes, bytes]

UNCHECKED_CLIENT_CONFIG = H2Configuration(
    client_side=True,
    validate_outbound_headers=False,
    normalize_outbound_headers=False,
    validate_inbound_headers=False,
    normalize_inbound_headers=False,
)
"""A client's h2 settings with header validation and normalisation off (module docstring,
"Validation"): for callers whose headers are built once and correctly."""
_RECEIVE_WINDOW = 16 * 1024 * 1024
"""Our flow-control window, per connection and per stream: answers are small, and a window this
large means WINDOW_UPDATE frames are rare."""
_MAX_ENCODED_HEADERS = 256
"""Encoded headers kept per connection; past it the cache starts again (old tokens go)."""
_TUNNEL_HEADER_LIMIT = 16 * 1024


class DrainingStateMachine(H2ConnectionStateMachine):
    """h2's connection state machine, except that a GOAWAY received leaves the connection open.

    h2 closes it at once and then rejects every frame as a protocol error (python-hyper/h2#1199),
    which would drop the answers RFC 9113 section 6.8 lets the server still send, to the streams
    up to the GOAWAY's last stream ID, and fail requests the server processed. h2 then still lets
    new streams start: the client using it must open none on such a connection (here
    ``_Connection.accepting``; the APNs provider's ``_EndpointProtocol`` too)."""

    _transitions = {
        **H2ConnectionStateMachine._transitions,
        (ConnectionState.CLIENT_OPEN, ConnectionInputs.RECV_GOAWAY):
            (None, ConnectionState.CLIENT_OPEN),
    }


class Http2Unavailable(ConnectionError):
    """The request could not be made or answered: the connection failed, was lost, or the
    server refused the stream (GOAWAY past it, RST_STREAM). Safe to retry later."""


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


@dataclass(frozen=True)
class Origin:
    """Where requests go: ``https`` (TLS, ALPN h2) or ``http`` (HTTP/2 in clear, prior
    knowledge), host and port."""

    scheme: str
    host: str
    port: int

    @property
    def authority(self) -> bytes:
        default = 443 if self.scheme == "https" else 80
        host = f"[{self.host}]" if ":" in self.host else self.host
        return (host if self.port == default else f"{host}:{self.port}").encode()


@dataclass(frozen=True)
class Proxy:
    """A forward proxy reached in clear that opens CONNECT tunnels, with optional Basic
    credentials (from the proxy URL's ``user:password@``)."""

    host: str
    port: int
    authorization: str | None = None


def proxy_from_environment(origin: Origin) -> Proxy | None:
    """The proxy the environment names for ``origin``, as curl, requests and httpx read it:
    ``https_proxy``/``HTTPS_PROXY`` (``http_proxy`` for an ``http`` origin), else
    ``all_proxy``/``ALL_PROXY``; none when ``no_proxy``/``NO_PROXY`` is ``*`` or lists the host
    or a domain above it (``example.org`` and ``.example.org`` both cover ``fcm.example.org``).
    Raises :class:`ValueError` naming the variable when the proxy URL is not ``http://``."""
    environ = os.environ
    names = (f"{origin.scheme}_proxy", f"{origin.scheme.upper()}_PROXY", "all_proxy", "ALL_PROXY")
    name = next((n for n in names if environ.get(n)), None)
    if name is None:
        return None
    no_proxy = environ.get("no_proxy") or environ.get("NO_PROXY") or ""
    host = origin.host.lower()
    for entry in no_proxy.replace(" ", "").lower().split(","):
        if entry.startswith("[") and "]" in entry:
            entry = entry[1:entry.index("]")]
        elif entry.count(":") == 1:  # host:port; the port is ignored, as curl does
            entry = entry.partition(":")[0]
        entry = entry.lstrip(".")
        if entry == "*" or (entry and (host == entry or host.endswith(f".{entry}"))):
            return None
    url = environ[name]
    parts = urlsplit(url if "://" in url else f"http://{url}")
    try:
        port = parts.port or 80
    except ValueError:
        port = 0
    if parts.scheme != "http" or not parts.hostname or not port:
        raise ValueError(f"{name} must look like http://[user:password@]host[:port]")
    authorization = None
    if parts.username is not None:
        credentials = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
        authorization = "Basic " + base64.b64encode(credentials.encode()).decode()
    return Proxy(parts.hostname, port, authorization)


class Http2Pool:
    """HTTP/2 connections to one origin, opened on demand, for the event loop that first uses
    it (connections belong to their loop). See the module docstring for the limits."""

    def __init__(
        self,
        origin: Origin,
        ssl_context: ssl.SSLContext | None,
        *,
        timeout: float,
        max_connections: int,
        max_streams: int = 100,
        proxy: Proxy | None = None,
    ) -> None:
        """``ssl_context`` must offer ALPN ``h2`` (``None`` for an ``http`` origin);
        ``timeout`` bounds each request from the moment it is made (waiting for a stream or a
        connection included) and each connection attempt."""
        self.origin = origin
        self._ssl = ssl_context
        self._timeout = timeout
        self._max_connections = max_connections
        self._max_streams = max_streams
        self._proxy = proxy
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
        answer. Raises :class:`TimeoutError` or another :class:`OSError` (module docstring)."""
        async with asyncio.timeout(self._timeout):
            connection = self._free_connection() or await self._wait_for_connection()
            future: asyncio.Future[Response] = asyncio.get_running_loop().create_future()
            stream_id = connection.start(headers, body, future)
            try:
                return await future
            except asyncio.CancelledError:
                connection.cancel(stream_id)
                raise

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

    # -- connections ------------------------------------------------------------------------

    def _free_connection(self) -> _Connection | None:
        for connection in self._connections:
            if len(connection.streams) < connection.capacity:
                return connection
        return None

    async def _wait_for_connection(self) -> _Connection:
        loop = asyncio.get_running_loop()
        while True:
            if self._closed:
                raise Http2Unavailable("the connection pool is closed")
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
        being opened will take (as many as ``max_streams`` each, until their SETTINGS say)."""
        loop = asyncio.get_running_loop()
        while (len(self._connections) + self._connecting < self._max_connections
               and len(self._waiters) > self._connecting * self._max_streams):
            self._connecting += 1
            task = loop.create_task(self._connect())
            self._connects.add(task)
            task.add_done_callback(self._connects.discard)

    async def _connect(self) -> None:
        connection = _Connection(self)
        try:
            async with asyncio.timeout(self._timeout):
                await self._open(connection)
        except BaseException as exc:  # whatever stops it, the waiting requests must hear of it
            connection.abort()
            self._connecting -= 1
            if not self._connections and not self._connecting:
                # Nothing else will serve the waiting requests: they fail with this attempt.
                while self._waiters:
                    waiter = self._waiters.popleft()
                    if not waiter.done():
                        waiter.set_exception(Http2Unavailable(
                            f"cannot connect to {self.origin.host}: {type(exc).__name__}"))
            if not isinstance(exc, Exception):
                raise
            return
        self._connecting -= 1
        if self._closed:
            connection.abort()
            return
        self._connections.append(connection)
        self._wake(connection.capacity)
        self._grow()  # if the server allows fewer streams than hoped, and requests still wait

    async def _open(self, connection: _Connection) -> None:
        loop = asyncio.get_running_loop()
        origin, proxy, context = self.origin, self._proxy, self._ssl
        server_hostname = origin.host if context is not None else None
        if proxy is None:
            transport, _ = await loop.create_connection(
                lambda: connection, origin.host, origin.port,
                ssl=context, server_hostname=server_hostname)
        else:
            raw, tunnel = await loop.create_connection(_Tunnel, proxy.host, proxy.port)
            try:
                await tunnel.open(origin, proxy)
                if context is None:
                    raw.set_protocol(connection)
                    raw.resume_reading()
                    transport = raw
                else:
                    tls = await loop.start_tls(
                        raw, connection, context, server_hostname=server_hostname)
                    if tls is None:
                        raise Http2Unavailable("the TLS handshake through the proxy failed")
                    transport = tls
            except BaseException:
                raw.abort()
                raise
            connection.connection_made(transport)
        if context is not None:
            ssl_object = transport.get_extra_info("ssl_object")
            if ssl_object is None or ssl_object.selected_alpn_protocol() != "h2":
                transport.abort()
                raise Http2Unavailable("the server did not agree to HTTP/2 (ALPN h2)")
        # The server's first SETTINGS (sent at once, without waiting for ours) may limit the
        # streams: no request goes out before they are known.
        await connection.settings_received

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
        self.h2 = H2Connection(UNCHECKED_CLIENT_CONFIG)
        self.h2.state_machine = DrainingStateMachine()
        self.h2.encoder = LiteralEncoder()
        self.streams: dict[int, _Stream] = {}
        self.capacity = pool._max_streams
        self.accepting = True
        self.lost: asyncio.Future[None] = self.loop.create_future()
        self.settings_received: asyncio.Future[None] = self.loop.create_future()
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
        h2 = self.h2
        h2.initiate_connection()
        h2.update_settings({SettingCodes.INITIAL_WINDOW_SIZE: _RECEIVE_WINDOW})
        h2.increment_flow_control_window(_RECEIVE_WINDOW - 65_535)
        transport.write(h2.data_to_send())

    def data_received(self, data: bytes) -> None:
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
                stream = streams.get(event.stream_id)  # type: ignore[arg-type]
                if stream is not None:
                    stream.body += event.data  # type: ignore[operator]
                self.h2.acknowledge_received_data(
                    event.flow_controlled_length, event.stream_id)  # type: ignore[arg-type]
            elif kind is ResponseReceived:
                stream = streams.get(event.stream_id)  # type: ignore[arg-type]
                if stream is not None:
                    headers: list[Header] = event.headers  # type: ignore[attr-defined]
                    status = next((int(v) for k, v in headers if k == b":status"), 0)
                    if status >= 200:  # not an informational answer: the real one
                        stream.status, stream.headers = status, headers
            elif kind is StreamEnded:
                self._stream_ended(event.stream_id)  # type: ignore[arg-type]
            elif kind is StreamReset:
                self._fail(event.stream_id, "the server reset the stream")  # type: ignore[arg-type]
            elif kind is RemoteSettingsChanged:
                self._settings_changed(event)  # type: ignore[arg-type]
            elif kind is ConnectionTerminated:
                self._goaway(event.last_stream_id or 0)  # type: ignore[attr-defined]
        if self._unsent:
            # Only now that every event is handled (a WINDOW_UPDATE or SETTINGS may have opened
            # the window): a stream the server reset in the same read is already closed in h2,
            # and is out of ``_unsent`` only after its StreamReset.
            self._resume_bodies()
        self._flush_soon()

    def connection_lost(self, exc: Exception | None) -> None:
        self.accepting = False
        self.pool._all.discard(self)
        streams, self.streams = self.streams, {}
        for stream in streams.values():
            if not stream.future.done():
                stream.future.set_exception(Http2Unavailable("the connection was lost"))
        if not self.settings_received.done():
            self.settings_received.set_exception(Http2Unavailable("the connection was lost"))
            self.settings_received.exception()  # retrieved here if nobody waits any more
        self.pool._retired(self)
        if not self.lost.done():
            self.lost.set_result(None)

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

    def _fail(self, stream_id: int, why: str) -> None:
        stream = self.streams.pop(stream_id, None)
        self._unsent.pop(stream_id, None)
        if stream is None:
            return
        if not stream.future.done():
            stream.future.set_exception(Http2Unavailable(why))
        self._stream_done()

    def _stream_done(self) -> None:
        if self.accepting:
            self.pool._released(self)
        elif not self.streams and self.transport is not None:
            self.transport.close()  # drained after GOAWAY

    def _settings_changed(self, event: RemoteSettingsChanged) -> None:
        if not self.settings_received.done():
            self.settings_received.set_result(None)
        changed = event.changed_settings.get(SettingCodes.MAX_CONCURRENT_STREAMS)
        if changed is not None:
            before = self.capacity
            self.capacity = min(self.pool._max_streams, changed.new_value)
            if self.accepting and self.capacity > before:
                self.pool._wake(self.capacity - before)

    def _goaway(self, last_stream_id: int) -> None:
        """The server takes no new streams: those after ``last_stream_id`` were not processed
        (fail them, the caller may retry); the others may still be answered."""
        self.accepting = False
        for stream_id in [s for s in self.streams if s > last_stream_id]:
            self._fail(stream_id, "the server closed the connection (GOAWAY)")
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


class _Tunnel(asyncio.Protocol):
    """The proxy side of a connection until the CONNECT tunnel is open."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self._answer = bytearray()
        self._done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's are no subclass

    async def open(self, origin: Origin, proxy: Proxy) -> None:
        """Ask the proxy for a tunnel to ``origin``; returns once it is open."""
        assert self.transport is not None
        target = origin.authority.decode()
        if origin.port == (443 if origin.scheme == "https" else 80):
            target = f"{target}:{origin.port}"
        request = f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n"
        if proxy.authorization is not None:
            request += f"Proxy-Authorization: {proxy.authorization}\r\n"
        self.transport.write(f"{request}\r\n".encode("latin-1"))
        await self._done

    def data_received(self, data: bytes) -> None:
        if self._done.done():
            return
        self._answer += data
        end = self._answer.find(b"\r\n\r\n")
        if end < 0:
            if len(self._answer) > _TUNNEL_HEADER_LIMIT:
                self._done.set_exception(Http2Unavailable("the proxy's answer is too long"))
            return
        status_line = bytes(self._answer[:self._answer.find(b"\r\n")]).split()
        if len(status_line) < 2 or not status_line[1].startswith(b"2"):
            status = status_line[1].decode("latin-1") if len(status_line) > 1 else "?"
            self._done.set_exception(Http2Unavailable(f"the proxy refused the tunnel ({status})"))
        elif end + 4 < len(self._answer):
            self._done.set_exception(Http2Unavailable("the proxy sent data before TLS"))
        else:
            self.transport.pause_reading()  # type: ignore[union-attr]
            self._done.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self._done.done():
            self._done.set_exception(Http2Unavailable("the proxy closed the connection"))
