"""The HTTP/1.1 client Web Push uses for push services that do not speak HTTP/2: kept-alive
connections per origin, one request at a time on each, the answer read with httptools (the C
parser uvicorn already loads).

A push is one small POST whose answer matters only by its status and ``Retry-After``: the
request is written in one piece, the answer's body is parsed past and dropped, and its headers
are bounded (:data:`MAX_HEADER_BYTES`), so a hostile push service cannot grow our memory.
Connections are opened by :func:`shared.transport.connect.open_connection` (a forward proxy's
CONNECT tunnel when the environment names one), with the TLS every provider uses."""
from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable
from typing import cast

import httptools

from shared.transport.connect import Origin, Resolver, TransportError, open_connection
from shared.transport.proxy import Proxy

MAX_HEADER_BYTES = 16 * 1024
"""The most of an answer's status line and headers read; past it the connection is dropped."""


class _Connection(asyncio.Protocol):
    """One kept-alive HTTP/1.1 connection, one request at a time."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._parser = httptools.HttpResponseParser(self)
        self._transport: asyncio.Transport | None = None
        self._answer: asyncio.Future[tuple[int, str | None]] | None = None
        self._status = 0
        self._retry_after: str | None = None
        self._header_bytes = 0
        self.open = True
        """False once the connection is closed or cannot carry another request."""
        self.answered = False
        """Whether any byte of an answer to the current request arrived."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's TLS transport has the methods of asyncio.Transport, not the class.
        self._transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.open = False
        if self._answer is not None and not self._answer.done():
            if self._status:  # an answer without a length ends with the connection
                self._answer.set_result((self._status, self._retry_after))
            else:
                self._answer.set_exception(
                    exc if isinstance(exc, OSError) else ConnectionResetError()
                )

    def data_received(self, data: bytes) -> None:
        self.answered = True
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._give_up(exc)

    def on_header(self, name: bytes, value: bytes) -> None:
        """httptools' callback, once per header of the answer."""
        self._header_bytes += len(name) + len(value)
        if self._header_bytes > MAX_HEADER_BYTES:
            self._give_up(TransportError(f"the answer's headers are over {MAX_HEADER_BYTES} bytes"))
        elif name.lower() == b"retry-after":
            self._retry_after = value[:64].decode("latin-1")

    def on_headers_complete(self) -> None:
        """httptools' callback: the status is known. An interim (1xx) answer, which a server
        may send before any final one (RFC 9110 section 15.2), is not the answer."""
        status = self._parser.get_status_code()
        if status >= 200:
            self._status = status

    def on_message_complete(self) -> None:
        """httptools' callback: the answer is complete, the connection free again."""
        if not self._status:  # an interim answer ended: the final one follows
            self._header_bytes = 0
            return
        if not self._parser.should_keep_alive():
            self.close()
        if self._answer is not None and not self._answer.done():
            self._answer.set_result((self._status, self._retry_after))

    async def request(self, request: bytes) -> tuple[int, str | None]:
        """Write ``request`` and wait for the answer's status and ``Retry-After``."""
        assert self._transport is not None
        self._status, self._retry_after, self.answered = 0, None, False
        self._header_bytes = 0
        self._answer = self._loop.create_future()
        self._transport.write(request)
        try:
            return await self._answer
        finally:
            self._answer = None

    def close(self) -> None:
        """Drop the connection at once: no push service waits for a TLS close_notify."""
        self.open = False
        if self._transport is not None:
            self._transport.abort()

    def _give_up(self, exc: Exception) -> None:
        self.close()
        if self._answer is not None and not self._answer.done():
            self._answer.set_exception(exc)


class Http1Pool:
    """Kept-alive connections per origin, and a bound on the requests in flight (over all
    origins), for the event loop that made it."""

    def __init__(
        self,
        tls: ssl.SSLContext,
        max_connections: int,
        proxy_for: Callable[[Origin], Proxy | None],
        resolve: Resolver | None = None,
    ) -> None:
        """``resolve`` gives the checked addresses to connect to
        (:data:`shared.transport.connect.Resolver`)."""
        self.loop = asyncio.get_running_loop()
        self._resolve = resolve
        self._tls = tls
        self._proxy_for = proxy_for
        self._slots = asyncio.Semaphore(max_connections)
        self._idle: dict[Origin, list[_Connection]] = {}
        self._closed = False

    async def request(self, origin: Origin, request: bytes) -> tuple[int, str | None]:
        """Send ``request`` (a whole HTTP/1.1 request) on an idle connection to ``origin``, or
        a new one; the answer's status and ``Retry-After``.

        A kept-alive connection the service closed just before it got the request fails with no
        answer: the request is sent again once on a new connection (a wake-up twice is harmless).
        """
        async with self._slots:
            idle = self._idle.setdefault(origin, [])
            while idle:
                connection = idle.pop()
                if connection.open:
                    try:
                        return await self._exchange(idle, connection, request)
                    except OSError:
                        if connection.answered:
                            raise
                    break
            return await self._exchange(idle, await self._connect(origin), request)

    def adopt(self, origin: Origin, transport: asyncio.Transport) -> None:
        """Take ``transport``, an open connection to ``origin`` whose reading is paused (one
        the HTTP/2 client found to speak HTTP/1.1), as an idle connection."""
        connection = _Connection(self.loop)
        transport.set_protocol(connection)
        connection.connection_made(transport)
        transport.resume_reading()
        self._idle.setdefault(origin, []).append(connection)

    async def _connect(self, origin: Origin) -> _Connection:
        _, connection = await open_connection(
            lambda: _Connection(self.loop), origin, self._tls, self._proxy_for(origin),
            self._resolve)
        return connection

    async def _exchange(
        self, idle: list[_Connection], connection: _Connection, request: bytes
    ) -> tuple[int, str | None]:
        """One request on ``connection``, which goes back to ``idle`` if it can carry more."""
        try:
            answer = await connection.request(request)
        except BaseException:  # a cancelled request leaves the answer unread: drop it
            connection.close()
            raise
        if self._closed:
            connection.close()
        elif connection.open:
            idle.append(connection)
        return answer

    def close(self) -> None:
        """Close every idle connection; those in use close when their request ends."""
        self._closed = True
        for connections in self._idle.values():
            for connection in connections:
                connection.close()
        self._idle.clear()
