"""A fake APNs server speaking the real wire protocol: HTTP/2 over TLS, token (JWT) auth.

It exists so the APNs provider can be tested, and benchmarked, over a real connection with the
real client library (aioapns), never a mock. It checks requests the way Apple documents it
(method and path, headers, the ES256 provider token, the JSON body) and answers like Apple: 200
with an ``apns-id`` header and END_STREAM on the HEADERS frame, errors as a status with a JSON
``{"reason": ...}`` body (410 adds ``timestamp``).

The server runs in its own thread with its own event loop (``tests.fakes.LoopThread`` says why).

In a test, use the function-scoped ``apns_server`` fixture (a fresh server per test, so scripted
answers and records never leak between tests)::

    apns_server.respond(token, 410, "Unregistered")       # every request for token
    apns_server.respond(token, 429, "TooManyRequests", once=True)  # next request only
    apns_server.hang(token)                                # never answer...
    apns_server.release(token)                             # ...until released (200)
    apns_server.goaway()                                   # GOAWAY on every connection
    apns_server.requests                                   # what was received, in order
    apns_server.connections_made                           # TLS connections accepted
    apns_server.provider_tokens                            # distinct well-signed JWTs seen

``FakeApns(max_concurrent_streams=1)`` announces that SETTINGS_MAX_CONCURRENT_STREAMS on every
connection (aioapns sizes its per-connection stream semaphore from it).

Standalone (for benchmarks), it answers 200 to every valid request until stopped and records
nothing::

    python -m tests.fakes.apns --port 8443 --ca-out /tmp/apns-ca.pem --key-out /tmp/apns.p8

It prints one JSON line with ``base_url``, ``ca_path``, ``key_path``, ``key_id`` and
``team_id``. The hot path has no sleeps and no logging; a provider token is verified once and
then remembered.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import re
import ssl
import tempfile
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import jwt
import pytest
import trustme
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    RequestReceived,
    StreamEnded,
    StreamReset,
)
from h2.exceptions import H2Error
from h2.settings import SettingCodes, Settings

from tests.fakes import DrainingServerStateMachine, LoopThread, announce_and_wait, close_server

DEFAULT_KEY_ID = "FAKEKEY123"
DEFAULT_TEAM_ID = "FAKETEAM45"
TOKEN_MAX_AGE_SECONDS = 3600
"""Apple refuses a provider token whose ``iat`` is more than an hour old."""
MAX_PAYLOAD_BYTES = 4096
PUSH_TYPES = frozenset(
    {"alert", "background", "location", "voip", "complication", "fileprovider", "mdm",
     "liveactivity", "pushtotalk", "widgets"}
)
_TOKEN = re.compile(r"[0-9a-fA-F]+")
_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
_JWT_CACHE_LIMIT = 1024
_HIGHEST_STREAM_ID = 2**31 - 1
_GOAWAY_DEBUG_DATA = b'{"reason":"Shutdown"}'
"""What Apple's GOAWAY carries when a server shuts down."""

_shared_ca: trustme.CA | None = None
_shared_ca_lock = threading.Lock()


def make_p8_key() -> str:
    """A new APNs-style signing key: EC P-256, PKCS#8 PEM (what Apple's ``.p8`` files hold)."""
    key = ec.generate_private_key(ec.SECP256R1())
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()


def shared_ca() -> trustme.CA:
    """The process-wide test CA every fake's certificate is issued by, so one CA file trusts
    all fakes running in the process (e.g. a production and a sandbox fake)."""
    global _shared_ca
    with _shared_ca_lock:
        if _shared_ca is None:
            _shared_ca = trustme.CA()
        return _shared_ca


@dataclass(frozen=True)
class Answer:
    """How the fake answers one request. ``reason=None`` on an error status sends no body (as a
    proxy might); ``delay`` answers that many seconds later; ``hang`` never answers."""

    status: int = 200
    reason: str | None = None
    retry_after: int | None = None
    delay: float = 0.0
    hang: bool = False


@dataclass(frozen=True)
class ReceivedRequest:
    """One request as the fake saw it. ``headers`` are decoded, pseudo-headers included;
    ``body`` is the decoded JSON (``None`` when it was not JSON); ``connection`` numbers the TLS
    connection it came on (1, 2, ...); ``status`` is what the fake answered (``None``: hung)."""

    token: str
    headers: dict[str, str]
    body: Any
    connection: int
    status: int | None


class FakeApns:
    """A fake APNs endpoint on 127.0.0.1. Start it with :meth:`start` or ``with FakeApns() as
    fake:``. Scripting methods and the records are safe to use from any thread."""

    def __init__(
        self,
        *,
        port: int = 0,
        key_pem: str | None = None,
        key_id: str = DEFAULT_KEY_ID,
        team_id: str = DEFAULT_TEAM_ID,
        record: bool = True,
        max_concurrent_streams: int | None = None,
    ) -> None:
        """``max_concurrent_streams`` is the SETTINGS_MAX_CONCURRENT_STREAMS every connection
        announces (``None``: h2's default, 100), for the client's waits for a free stream."""
        self.host = "127.0.0.1"
        self.port = port
        self.key_pem = key_pem or make_p8_key()
        """The private key (PKCS#8 PEM) whose signatures the fake accepts: give it to the client."""
        self.key_id = key_id
        self.team_id = team_id
        self.record = record
        self.max_concurrent_streams = max_concurrent_streams
        self.clock_offset = 0.0
        """Seconds added to the fake's clock when it checks a token's age: set it above
        3600 to make every provider token look expired."""
        private = serialization.load_pem_private_key(self.key_pem.encode(), password=None)
        if not isinstance(private, ec.EllipticCurvePrivateKey):
            raise ValueError("an APNs signing key is an EC P-256 key")
        self._public_key = private.public_key()
        self._ca = shared_ca()
        self._tmpdir = tempfile.TemporaryDirectory(prefix="fake-apns-")
        self.ca_path = str(Path(self._tmpdir.name) / "ca.pem")
        """PEM file of the CA that issued the server certificate: the client must trust it."""
        self._ca.cert_pem.write_to_path(self.ca_path)
        self._lock = threading.Lock()
        self._default = Answer()
        self._standing: dict[str, Answer] = {}
        self._queued: dict[str, deque[Answer]] = {}
        self._requests: list[ReceivedRequest] = []
        self._request_count = 0
        self._connections_made = 0
        self._answers_sent = 0
        self._verified_tokens: dict[str, int] = {}
        self._distinct_tokens: dict[str, None] = {}
        self._protocols: set[_Http2Server] = set()
        self._server: asyncio.Server | None = None
        self._server_thread = LoopThread()

    # -- life cycle ------------------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        """``https://localhost:PORT``: the certificate is valid for localhost and 127.0.0.1."""
        return f"https://localhost:{self.port}"

    def start(self) -> FakeApns:
        """Start serving in a background thread; returns once the port is listening."""
        self.port = self._server_thread.start(f"fake-apns-{self.port}", self._open)
        return self

    def stop(self) -> None:
        """Close every connection, stop the thread and remove the CA file."""
        self._server_thread.stop(self._shutdown)
        self._tmpdir.cleanup()

    def __enter__(self) -> FakeApns:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    async def _open(self) -> int:
        """Listen (in the server thread): HTTP/2 over TLS, the port bound."""
        server_cert = self._ca.issue_cert("localhost", "127.0.0.1")
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        server_cert.configure_cert(context)
        context.set_alpn_protocols(["h2"])
        self._server = await asyncio.get_running_loop().create_server(
            lambda: _Http2Server(self), self.host, self.port, ssl=context
        )
        return int(self._server.sockets[0].getsockname()[1])

    async def _shutdown(self) -> None:
        assert self._server is not None
        await close_server(self._server, [protocol.transport for protocol in self._protocols])

    # -- scripting -------------------------------------------------------------------------------

    def respond(
        self,
        token: str | None,
        status: int = 200,
        reason: str | None = None,
        *,
        retry_after: int | None = None,
        delay: float = 0.0,
        once: bool = False,
    ) -> None:
        """Script the answer to valid requests for ``token`` (``None``: every token without a
        script of its own). With ``once=True`` the answer is queued for the next request only;
        queued answers are used in order before the standing one."""
        self._script(token, Answer(status, reason, retry_after, delay), once)

    def hang(self, token: str | None = None, *, once: bool = False) -> None:
        """Never answer valid requests for ``token`` (``None``: every token without a script),
        until :meth:`release` answers them."""
        self._script(token, Answer(hang=True), once)

    def release(
        self, token: str | None = None, status: int = 200, reason: str | None = None
    ) -> None:
        """Answer the requests hanging so far for ``token`` (``None``: every hanging request)
        with ``status`` and ``reason``, also on a connection that sent GOAWAY if their streams
        are at or below its last stream ID; their records then carry that status."""
        self._in_server(lambda connection: connection.release(token, Answer(status, reason)))

    def goaway(self, last_stream_id: int | None = None) -> None:
        """Send GOAWAY (NO_ERROR, reason ``Shutdown``) on every connection, as Apple does before
        it closes one: requests on streams up to ``last_stream_id`` (default: the highest each
        connection received) may still be answered; later ones were not processed (they are
        never answered, not even by :meth:`release`) and new streams are ignored."""
        self._in_server(lambda connection: connection.goaway(last_stream_id))

    def drop_connections(self) -> None:
        """Cut every connection at once, without a word (a crashed front end, a lost route)."""
        self._in_server(lambda connection: connection.transport.abort())

    def _in_server(self, action: Callable[[_Http2Server], None]) -> None:
        async def run() -> None:
            for connection in list(self._protocols):
                action(connection)

        self._server_thread.call(run)

    def _script(self, token: str | None, answer: Answer, once: bool) -> None:
        with self._lock:
            if token is None:
                self._default = answer
            elif once:
                self._queued.setdefault(token, deque()).append(answer)
            else:
                self._standing[token] = answer

    # -- records ---------------------------------------------------------------------------------

    @property
    def requests(self) -> list[ReceivedRequest]:
        """Every request received (valid or not, answered or hung), oldest first."""
        with self._lock:
            return list(self._requests)

    @property
    def request_count(self) -> int:
        """How many requests were received, also when not recording."""
        with self._lock:
            return self._request_count

    @property
    def connections_made(self) -> int:
        """How many TLS connections were accepted."""
        with self._lock:
            return self._connections_made

    @property
    def provider_tokens(self) -> list[str]:
        """The distinct provider tokens (JWTs) seen with a valid signature (expired or not),
        first seen first; only when recording."""
        with self._lock:
            return list(self._distinct_tokens)

    @property
    def answers_sent(self) -> int:
        """How many answers were written, delayed ones included once they are out."""
        with self._lock:
            return self._answers_sent

    # -- request handling (server thread) --------------------------------------------------------

    def _connection_made(self, protocol: _Http2Server) -> int:
        self._protocols.add(protocol)
        with self._lock:
            self._connections_made += 1
            return self._connections_made

    def _handle(
        self, connection: int, headers: dict[str, str], duplicated: bool, body: bytes
    ) -> tuple[Answer, int]:
        """The answer to a complete request, and the index of its record (-1: not recording)."""
        path = headers.get(":path", "")
        token = path.removeprefix("/3/device/") if path.startswith("/3/device/") else ""
        answer: Answer | None = Answer(400, "DuplicateHeaders")
        if not duplicated:
            answer = self._check(headers, token, body)
        decoded: Any = None
        if answer is None:
            try:
                decoded = json.loads(body)
            except ValueError:
                pass
            if not isinstance(decoded, dict):
                answer = Answer(400, "BadPayload")  # Apple documents no reason for this one
        with self._lock:
            if answer is None:
                queued = self._queued.get(token)
                if queued:
                    answer = queued.popleft()
                else:
                    answer = self._standing.get(token, self._default)
            self._request_count += 1
            if not self.record:
                return answer, -1
            status = None if answer.hang else answer.status
            self._requests.append(ReceivedRequest(token, headers, decoded, connection, status))
            return answer, len(self._requests) - 1

    def _released(self, index: int, status: int) -> None:
        """A hanging request was answered ``status`` at last: its record says so."""
        if index >= 0:
            with self._lock:
                self._requests[index] = replace(self._requests[index], status=status)

    def _check(self, headers: dict[str, str], token: str, body: bytes) -> Answer | None:
        """Apple's checks, roughly in Apple's order; ``None`` when the request is valid."""
        if headers.get(":method") != "POST":
            return Answer(405, "MethodNotAllowed")
        if not headers.get(":path", "").startswith("/3/device/"):
            return Answer(404, "BadPath")
        if not token:
            return Answer(400, "MissingDeviceToken")
        if not _TOKEN.fullmatch(token):
            return Answer(400, "BadDeviceToken")
        auth_error = self._check_provider_token(headers.get("authorization"))
        if auth_error is not None:
            return Answer(403, auth_error)
        if not headers.get("apns-topic"):
            return Answer(400, "MissingTopic")
        if "apns-push-type" in headers and headers["apns-push-type"] not in PUSH_TYPES:
            return Answer(400, "InvalidPushType")
        if headers.get("apns-priority", "10") not in ("1", "5", "10"):
            return Answer(400, "BadPriority")
        if not headers.get("apns-expiration", "0").isdigit():
            return Answer(400, "BadExpirationDate")
        if len(headers.get("apns-collapse-id", "").encode()) > 64:
            return Answer(400, "BadCollapseId")
        if "apns-id" in headers and not _UUID.fullmatch(headers["apns-id"]):
            return Answer(400, "BadMessageId")
        if not body:
            return Answer(400, "PayloadEmpty")
        if len(body) > MAX_PAYLOAD_BYTES:
            return Answer(413, "PayloadTooLarge")
        return None

    def _check_provider_token(self, authorization: str | None) -> str | None:
        """The 403 reason for the ``authorization`` header, ``None`` when it is acceptable."""
        scheme, _, token = (authorization or "").partition(" ")
        if not token:
            return "MissingProviderToken"
        if scheme.lower() != "bearer":
            return "InvalidProviderToken"
        issued_at = self._verified_tokens.get(token)
        if issued_at is None:
            try:
                if jwt.get_unverified_header(token).get("kid") != self.key_id:
                    return "InvalidProviderToken"
                claims = jwt.decode(
                    token,
                    self._public_key,
                    algorithms=["ES256"],
                    issuer=self.team_id,
                    options={"require": ["iss", "iat"], "verify_iat": False},
                )
            except jwt.PyJWTError:
                return "InvalidProviderToken"
            if not isinstance(claims["iat"], int):
                return "InvalidProviderToken"
            issued_at = claims["iat"]
            if len(self._verified_tokens) >= _JWT_CACHE_LIMIT:
                self._verified_tokens.clear()
            self._verified_tokens[token] = issued_at
            if self.record:
                with self._lock:
                    self._distinct_tokens[token] = None
        if time.time() + self.clock_offset - issued_at > TOKEN_MAX_AGE_SECONDS:
            return "ExpiredProviderToken"
        return None


class _Http2Server(asyncio.Protocol):
    """One TLS connection: HTTP/2 framing with h2, requests handed to :class:`FakeApns`."""

    def __init__(self, fake: FakeApns) -> None:
        self.fake = fake
        self.transport: asyncio.Transport
        self.conn = H2Connection(H2Configuration(client_side=False, header_encoding="utf-8"))
        self.conn.state_machine = DrainingServerStateMachine()
        if fake.max_concurrent_streams is not None:
            limit = {SettingCodes.MAX_CONCURRENT_STREAMS: fake.max_concurrent_streams}
            # Initial values, sent by initiate_connection; setting one would await an ACK.
            self.conn.local_settings = Settings(
                client=False, initial_values={**self.conn.local_settings, **limit}
            )
        self.streams: dict[int, tuple[dict[str, str], bool, bytearray]] = {}
        self.hanging: dict[int, tuple[str, str, int]] = {}
        """Streams left unanswered: their token, ``apns-id`` and record index."""
        self.last_stream_id = _HIGHEST_STREAM_ID
        """The last stream this connection takes: lowered by a GOAWAY."""
        self.number = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.number = self.fake._connection_made(self)
        self.conn.initiate_connection()
        self.transport.write(self.conn.data_to_send())

    def connection_lost(self, exc: Exception | None) -> None:
        self.fake._protocols.discard(self)

    def data_received(self, data: bytes) -> None:
        try:
            events = self.conn.receive_data(data)
        except H2Error:
            self.transport.write(self.conn.data_to_send())
            self.transport.close()
            return
        for event in events:
            if isinstance(event, RequestReceived):
                self._request(event.stream_id, event.headers)
            elif isinstance(event, DataReceived):
                if event.stream_id in self.streams:
                    self.streams[event.stream_id][2].extend(event.data)
                self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif isinstance(event, StreamEnded):
                self._stream_ended(event.stream_id)
            elif isinstance(event, StreamReset):
                self.streams.pop(event.stream_id, None)
                self.hanging.pop(event.stream_id, None)
            elif isinstance(event, ConnectionTerminated):
                self.transport.close()
        self.transport.write(self.conn.data_to_send())

    def goaway(self, last_stream_id: int | None) -> None:
        if last_stream_id is None:
            last_stream_id = self.conn.highest_inbound_stream_id
        self.last_stream_id = last_stream_id
        for stream_id in [s for s in (*self.streams, *self.hanging) if s > last_stream_id]:
            self.streams.pop(stream_id, None)
            self.hanging.pop(stream_id, None)
        self.conn.close_connection(
            ErrorCodes.NO_ERROR, _GOAWAY_DEBUG_DATA, last_stream_id=last_stream_id
        )
        self.transport.write(self.conn.data_to_send())

    def release(self, token: str | None, answer: Answer) -> None:
        if self.transport.is_closing():
            return
        for stream_id, (hung_token, apns_id, index) in list(self.hanging.items()):
            if token is None or hung_token == token:
                del self.hanging[stream_id]
                self._send(stream_id, apns_id, answer)
                self.fake._released(index, answer.status)
        self.transport.write(self.conn.data_to_send())

    def _request(self, stream_id: int, raw_headers: Any) -> None:
        if stream_id > self.last_stream_id:
            return  # after a GOAWAY that did not take it: ignored (RFC 9113 section 6.8)
        headers: dict[str, str] = {}
        duplicated = False
        for name, value in raw_headers:
            duplicated = duplicated or name in headers
            headers[name] = value
        self.streams[stream_id] = (headers, duplicated, bytearray())

    def _stream_ended(self, stream_id: int) -> None:
        request = self.streams.pop(stream_id, None)
        if request is None:
            return
        headers, duplicated, body = request
        answer, index = self.fake._handle(self.number, headers, duplicated, bytes(body))
        apns_id = headers.get("apns-id", "")
        if not _UUID.fullmatch(apns_id):
            apns_id = str(uuid.uuid4())
        if answer.hang:
            token = headers.get(":path", "").removeprefix("/3/device/")
            self.hanging[stream_id] = (token, apns_id, index)
            return
        if answer.delay:
            loop = asyncio.get_running_loop()
            loop.call_later(answer.delay, self._send_later, stream_id, apns_id, answer)
        else:
            self._send(stream_id, apns_id, answer)

    def _send_later(self, stream_id: int, apns_id: str, answer: Answer) -> None:
        if self.transport.is_closing():
            return
        self._send(stream_id, apns_id, answer)
        self.transport.write(self.conn.data_to_send())

    def _send(self, stream_id: int, apns_id: str, answer: Answer) -> None:
        headers = [(":status", str(answer.status)), ("apns-id", apns_id)]
        if answer.retry_after is not None:
            headers.append(("retry-after", str(answer.retry_after)))
        with self.fake._lock:
            self.fake._answers_sent += 1
        try:
            if answer.status == 200 or answer.reason is None:
                self.conn.send_headers(stream_id, headers, end_stream=True)
                return
            error: dict[str, Any] = {"reason": answer.reason}
            if answer.status == 410:
                error["timestamp"] = int(time.time() * 1000)
            headers.append(("content-type", "application/json"))
            self.conn.send_headers(stream_id, headers)
            self.conn.send_data(stream_id, json.dumps(error).encode(), end_stream=True)
        except H2Error:  # the client reset the stream or went away meanwhile
            pass


@pytest.fixture
def apns_server() -> Iterator[FakeApns]:
    """A fresh fake APNs server per test (starting one takes a few milliseconds)."""
    with FakeApns() as fake:
        yield fake


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (0: any free)")
    parser.add_argument("--ca-out", required=True, help="where to write the CA certificate (PEM)")
    parser.add_argument("--key-out", required=True, help="where to write the signing key (.p8)")
    parser.add_argument("--key-id", default=DEFAULT_KEY_ID)
    parser.add_argument("--team-id", default=DEFAULT_TEAM_ID)
    args = parser.parse_args()
    fake = FakeApns(port=args.port, key_id=args.key_id, team_id=args.team_id, record=False)
    Path(args.key_out).write_text(fake.key_pem)
    with fake:
        Path(args.ca_out).write_text(Path(fake.ca_path).read_text())
        info = {
            "base_url": fake.base_url,
            "ca_path": args.ca_out,
            "key_path": args.key_out,
            "key_id": fake.key_id,
            "team_id": fake.team_id,
        }
        announce_and_wait(info)


if __name__ == "__main__":
    main()
