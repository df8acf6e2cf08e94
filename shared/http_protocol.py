"""The HTTP/1.1 server protocol the image's worker speaks: uvicorn's httptools protocol, with a
bound on what one request may cost before the function sees it.

uvicorn's httptools protocol has no limit of its own on a request's head: it keeps every header
line the client sends, and httptools concatenates a long header value piece by piece, so 300 MB
of header lines grew a worker from 58 to 360 MB (kept after the answer), and one 300 MB header
value also took two minutes of CPU. gunicorn's ``--limit-request-*`` options bound only
gunicorn's own parser, which uvicorn's worker does not use. Nor does uvicorn time out a request
that arrives slowly: a body trickling one byte every 2 s held its request open indefinitely.

So, per connection:

- a request's head (request line and header lines) may be at most :data:`MAX_HEAD_BYTES`; the
  bytes past that are never parsed: the answer is 431 and the connection closes;
- a request's head must be whole within :data:`HEAD_TIMEOUT_SECONDS` of its first byte (or of the
  connection opening, for its first request), and its body within :data:`BODY_TIMEOUT_SECONDS` of
  the head's end: past either, the answer is 408 (when no answer has started) and the connection
  closes. Idle kept-alive connections are still closed by uvicorn (gunicorn's ``--keep-alive``).

Both answers have the functions' JSON error body. ``shared.http`` still counts header fields and
their bytes once the head is read (431), for callers that reach the app another way.
"""
from __future__ import annotations

import asyncio
import json

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from shared.http import MAX_HEADER_BYTES, MAX_HEADERS

MAX_REQUEST_LINE_BYTES = 8192
"""RFC 9112 section 3 recommends accepting request lines of at least 8000 octets."""

MAX_HEAD_BYTES = MAX_REQUEST_LINE_BYTES + MAX_HEADER_BYTES + MAX_HEADERS * len(": \r\n") + len("\r\n")
"""The request line, then up to ``MAX_HEADERS`` fields of ``MAX_HEADER_BYTES`` in all, as raw
bytes: anything longer would be refused by ``shared.http`` anyway."""

HEAD_TIMEOUT_SECONDS = 10.0
BODY_TIMEOUT_SECONDS = 10.0
"""A subscribe body is at most 16 KiB, an event at most 256 KiB from inside the cluster: 10 s is
seconds of slack even for a phone on a poor link, and bounds what a trickling client holds."""

LINGER_SECONDS = 2.0
"""After a refusal, how long what the client still sends is read and dropped before the
connection closes. Closing with unread bytes makes the kernel reset the connection, and a reset
can destroy the answer before the client has read it."""


def error_answer(status: int, reason: str, code: str, message: str) -> bytes:
    """A complete HTTP/1.1 answer with the functions' JSON error body, closing the connection."""
    body = json.dumps({"error": {"code": code, "message": message}}, separators=(",", ":")).encode()
    return (
        f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    ).encode() + body


HEAD_TOO_LARGE = error_answer(
    431, "Request Header Fields Too Large", "headers_too_large",
    f"the request line and header fields must total at most {MAX_HEAD_BYTES} bytes",
)
HEAD_TIMED_OUT = error_answer(
    408, "Request Timeout", "request_timeout",
    f"the request's header fields did not arrive within {HEAD_TIMEOUT_SECONDS:g} s",
)
BODY_TIMED_OUT = error_answer(
    408, "Request Timeout", "request_timeout",
    f"the request body did not arrive within {BODY_TIMEOUT_SECONDS:g} s",
)


class BoundedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with the bounds of the module doc: the head is fed to the
    parser only up to :data:`MAX_HEAD_BYTES`, and one timer per connection bounds the time to
    the end of the head, then to the end of the body."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._reading_head = True
        self._head_bytes = 0
        self._deadline: asyncio.TimerHandle | None = None
        self._refused = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm(HEAD_TIMEOUT_SECONDS, HEAD_TIMED_OUT)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return  # read and dropped until the linger ends
        while data and self._reading_head:
            room = MAX_HEAD_BYTES - self._head_bytes
            if room <= 0:
                self._refuse(HEAD_TOO_LARGE)
                return
            piece, data = (data, b"") if len(data) <= room else (data[:room], data[room:])
            self._head_bytes += len(piece)
            super().data_received(piece)  # may end the head: the rest is body or a next request
            if self._refused or self.transport.is_closing():
                return
        if data:
            super().data_received(data)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._deadline is None:  # a kept-alive connection's next request
            self._arm(HEAD_TIMEOUT_SECONDS, HEAD_TIMED_OUT)

    def on_headers_complete(self) -> None:
        self._reading_head = False
        self._head_bytes = 0
        self._arm(BODY_TIMEOUT_SECONDS, BODY_TIMED_OUT)
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._disarm()
        self._reading_head = True  # what follows on this connection is the next request's head
        super().on_message_complete()

    def _arm(self, seconds: float, answer: bytes) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(seconds, self._refuse, answer)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _refuse(self, answer: bytes) -> None:
        """Answer ``answer`` unless another answer is on its way on this connection, and close
        after :data:`LINGER_SECONDS` (or once the client has closed its side). A request in
        progress sees its client gone: its reads end, its answer goes nowhere."""
        self._disarm()
        if self._refused or self.transport.is_closing():
            return
        self._refused = True
        cycle = self.cycle  # the request whose head was read last, if any
        if self._reading_head:
            answer_now = cycle is None or cycle.response_complete
        else:
            answer_now = not cycle.response_started
        if answer_now:
            self.transport.write(answer)
        if cycle is not None and not cycle.response_complete:
            cycle.disconnected = True
            cycle.message_event.set()
        if self.transport.can_write_eof():
            self.transport.write_eof()  # the answer, then the end of ours: the client stops
        self._deadline = self.loop.call_later(LINGER_SECONDS, self.transport.close)
