"""A fake APNs server speaking the real wire protocol: HTTP/2 over TLS, token (JWT) auth.

It exists so the APNs provider can be tested, and benchmarked, over a real connection, never a
mock. It checks requests the way Apple documents it (method and path, headers, the ES256 provider
token, the JSON body) and answers like Apple: 200 with an ``apns-id`` header and END_STREAM on
the HEADERS frame, errors as a status with a JSON ``{"reason": ...}`` body (410 adds
``timestamp``). Like Apple, a connection starts at SETTINGS_MAX_CONCURRENT_STREAMS 1 and raises
it (default 1,000) after the first accepted request; its GOAWAY carries ``{"reason":"Shutdown"}``.
On the network it behaves as :mod:`fakes.server` says (latency, recycling, refusals).

In a test, use the function-scoped ``apns_server`` fixture (tests/conftest.py: a fresh server
per test, so scripted answers and records never leak between tests)::

    apns_server.respond(token, 410, "Unregistered")       # every request for token
    apns_server.respond(token, 429, "TooManyRequests", once=True)  # next request only
    apns_server.hang(token)                                # never answer...
    apns_server.release(token)                             # ...until released (200)
    apns_server.goaway()                                   # GOAWAY on every connection
    apns_server.requests                                   # what was received, in order
    apns_server.connections_made                           # TLS connections accepted
    apns_server.provider_tokens                            # distinct well-signed JWTs seen

Standalone (for benchmarks and the local stack), it answers 200 to every valid request until
stopped and records nothing (counts only)::

    python -m fakes.apns --port 8443 --ca-out /tmp/apns-ca.pem --key-out /tmp/apns.p8 \
        [--rtt-ms 50 --recycle-after 1000] [--print-pushes]

It prints one JSON line with ``base_url``, ``ca_path``, ``key_path``, ``key_id`` and
``team_id``; with ``--print-pushes`` one line per accepted push (never the device token: its
hash). The hot path has no logging; a provider token is verified once and then remembered.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
import time
import uuid
from collections import deque
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TextIO

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fakes.server import FakeServer, Hang, Network, Reply, Request, announce_and_wait

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
STREAMS_AFTER_FIRST_PUSH = 1000
"""The SETTINGS_MAX_CONCURRENT_STREAMS Apple raises a connection to after its first accepted
request (1 until then, on token-authenticated connections)."""


def make_p8_key() -> str:
    """A new APNs-style signing key: EC P-256, PKCS#8 PEM (what Apple's ``.p8`` files hold)."""
    key = ec.generate_private_key(ec.SECP256R1())
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()


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


class FakeApns(FakeServer):
    """A fake APNs endpoint on 127.0.0.1. Start it with :meth:`start` or ``with FakeApns() as
    fake:``. Scripting methods and the records are safe to use from any thread."""

    name = "fake-apns"
    goaway_debug_data = b'{"reason":"Shutdown"}'
    """What Apple's GOAWAY carries when a server shuts down."""

    def __init__(
        self,
        *,
        port: int = 0,
        key_pem: str | None = None,
        key_id: str = DEFAULT_KEY_ID,
        team_id: str = DEFAULT_TEAM_ID,
        record: bool = True,
        max_concurrent_streams: int = STREAMS_AFTER_FIRST_PUSH,
        network: Network = Network(max_concurrent_streams=1),
        echo: TextIO | None = None,
    ) -> None:
        """``max_concurrent_streams`` is the SETTINGS_MAX_CONCURRENT_STREAMS a connection is
        raised to after its first accepted request (``network.max_concurrent_streams``, 1 as
        Apple's, until then). ``echo`` gets a JSON line per accepted push."""
        super().__init__(port=port, network=network)
        self.key_pem = key_pem or make_p8_key()
        """The private key (PKCS#8 PEM) whose signatures the fake accepts: give it to the client."""
        self.key_id = key_id
        self.team_id = team_id
        self.record = record
        self.max_concurrent_streams = max_concurrent_streams
        self.echo = echo
        self.clock_offset = 0.0
        """Seconds added to the fake's clock when it checks a token's age: set it above
        3600 to make every provider token look expired."""
        private = serialization.load_pem_private_key(self.key_pem.encode(), password=None)
        if not isinstance(private, ec.EllipticCurvePrivateKey):
            raise ValueError("an APNs signing key is an EC P-256 key")
        self._public_key = private.public_key()
        self._default = Answer()
        self._standing: dict[str, Answer] = {}
        self._queued: dict[str, deque[Answer]] = {}
        self._requests: list[ReceivedRequest] = []
        self._request_count = 0
        self._answers_sent = 0
        self._verified_tokens: dict[str, int] = {}
        self._distinct_tokens: dict[str, None] = {}

    @property
    def base_url(self) -> str:
        """``https://localhost:PORT``: the certificate is valid for localhost and 127.0.0.1."""
        return f"https://localhost:{self.port}"

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

    def release(  # type: ignore[override]
        self, token: str | None = None, status: int = 200, reason: str | None = None
    ) -> None:
        """Answer the requests hanging so far for ``token`` (``None``: every hanging request)
        with ``status`` and ``reason``, also on a connection that sent GOAWAY if their streams
        are at or below its last stream ID; their records then carry that status."""
        super().release(token, _reply(Answer(status, reason), str(uuid.uuid4())))

    def _script(self, token: str | None, answer: Answer, once: bool) -> None:
        with self.lock:
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
        with self.lock:
            return list(self._requests)

    @property
    def request_count(self) -> int:
        """How many requests were received, also when not recording."""
        with self.lock:
            return self._request_count

    @property
    def provider_tokens(self) -> list[str]:
        """The distinct provider tokens (JWTs) seen with a valid signature (expired or not),
        first seen first; only when recording."""
        with self.lock:
            return list(self._distinct_tokens)

    @property
    def answers_sent(self) -> int:
        """How many answers came due: written, or dropped because the client had reset the
        stream meanwhile (a timeout)."""
        counts = self.counts
        return sum(counts.by_status.values()) + counts.answers_dropped

    # -- request handling (server thread) --------------------------------------------------------

    def handle(self, request: Request) -> Reply | Hang:
        headers: dict[str, str] = {}
        duplicated = False
        for name, value in request.headers:
            key = name.decode("latin-1")
            duplicated = duplicated or key in headers
            headers[key] = value.decode("latin-1")
        path = headers.get(":path", "")
        token = path.removeprefix("/3/device/") if path.startswith("/3/device/") else ""
        answer: Answer | None = Answer(400, "DuplicateHeaders")
        if not duplicated:
            answer = self._check(headers, token, request.body)
        decoded: Any = None
        if answer is None:
            try:
                decoded = json.loads(request.body)
            except ValueError:
                pass
            if not isinstance(decoded, dict):
                answer = Answer(400, "BadPayload")  # Apple documents no reason for this one
        valid = answer is None
        with self.lock:
            if answer is None:
                queued = self._queued.get(token)
                if queued:
                    answer = queued.popleft()
                else:
                    answer = self._standing.get(token, self._default)
            self._request_count += 1
            index = -1
            if self.record:
                status = None if answer.hang else answer.status
                self._requests.append(
                    ReceivedRequest(token, headers, decoded, request.connection, status))
                index = len(self._requests) - 1
        if valid and self.max_concurrent_streams != self.network.max_concurrent_streams:
            request.stream.raise_stream_limit(self.max_concurrent_streams)
        if answer.hang:
            return Hang(token, index)
        if self.echo is not None and answer.status == 200:
            self._echo(headers, token, decoded)
        apns_id = headers.get("apns-id", "")
        return _reply(answer, apns_id if _UUID.fullmatch(apns_id) else str(uuid.uuid4()))

    def released(self, record: int, status: int) -> None:
        """A hanging request was answered ``status`` at last: its record says so."""
        if record >= 0:
            with self.lock:
                self._requests[record] = replace(self._requests[record], status=status)

    def _echo(self, headers: dict[str, str], token: str, body: Any) -> None:
        """One JSON line per accepted push, for watching the local stack: never the token."""
        assert self.echo is not None
        line = {
            "provider": "apns",
            "device_sha256": hashlib.sha256(token.encode()).hexdigest()[:16],
            "message_type": (body.get("data") or {}).get("type"),
            **{name: headers[name] for name in ("apns-topic", "apns-push-type", "apns-priority",
                                                 "apns-collapse-id", "apns-expiration")
               if name in headers},
        }
        print(json.dumps(line), file=self.echo, flush=True)

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
                with self.lock:
                    self._distinct_tokens[token] = None
        if time.time() + self.clock_offset - issued_at > TOKEN_MAX_AGE_SECONDS:
            return "ExpiredProviderToken"
        return None


def _reply(answer: Answer, apns_id: str) -> Reply:
    """Apple's answer: 200 with END_STREAM on its HEADERS; an error with a JSON reason (410 with
    a timestamp), or no body when the script gives no reason (as a proxy's 5xx)."""
    headers: tuple[tuple[bytes, bytes], ...] = ((b"apns-id", apns_id.encode()),)
    if answer.retry_after is not None:
        headers += ((b"retry-after", str(answer.retry_after).encode()),)
    if answer.status == 200 or answer.reason is None:
        return Reply(answer.status, headers, delay=answer.delay)
    error: dict[str, Any] = {"reason": answer.reason}
    if answer.status == 410:
        error["timestamp"] = int(time.time() * 1000)
    return Reply(answer.status, headers + ((b"content-type", b"application/json"),),
                 json.dumps(error).encode(), delay=answer.delay)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (0: any free)")
    parser.add_argument("--ca-out", required=True, help="where to write the CA certificate (PEM)")
    parser.add_argument("--key-out", required=True, help="where to write the signing key (.p8)")
    parser.add_argument("--key-id", default=DEFAULT_KEY_ID)
    parser.add_argument("--team-id", default=DEFAULT_TEAM_ID)
    parser.add_argument("--print-pushes", action="store_true", help="print accepted pushes")
    Network.add_arguments(parser, max_concurrent_streams=1)
    args = parser.parse_args()
    fake = FakeApns(port=args.port, key_id=args.key_id, team_id=args.team_id, record=False,
                    network=Network.from_arguments(args),
                    echo=sys.stdout if args.print_pushes else None)
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
        announce_and_wait(info, fake)


if __name__ == "__main__":
    main()
