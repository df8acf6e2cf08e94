"""A fake Web Push service that checks every push the way a push service and a browser would.

It plays both ends a real push goes through: it creates subscriptions as a browser does (a P-256
key pair and a 16-byte auth secret each, endpoint ``https://localhost:PORT/push/<id>``), and on
``POST /push/<id>`` it verifies what a push service verifies (the RFC 8292 VAPID header, TTL,
Urgency, Topic, size) and then decrypts the RFC 8291 body with the subscription's private key, as
the browser would. Every request is recorded as a :class:`ReceivedPush`; tests can also script
the answers of one subscription (errors, Retry-After, a queue such as 503-then-201, a hang).

It serves HTTPS with a throw-away trustme CA (``ca_file`` is the PEM to trust) from its own
thread and event loop, so it works the same under pytest-asyncio's per-test loops, in
synchronous tests, and standalone for benchmarks and the local demo::

    python -m tests.fakes.webpush --port 8443 --subscriptions 3 --ca-file /tmp/ca.pem

prints one JSON line describing the service, then one subscription JSON per line; ``POST
/subscriptions`` creates more (body optionally ``{"applicationServerKey": "..."}``);
``--print-pushes`` prints every accepted push, decrypted, as a JSON line.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import contextlib
import copy
import json
import os
import re
import secrets
import shutil
import signal
import ssl
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any, TextIO

import http_ece
import pytest
import trustme
from aiohttp import web
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from tests.fakes import LoopThread

MAX_BODY_BYTES = 4096
"""Real push services refuse larger encrypted bodies with 413 (RFC 8030 only guarantees 4096)."""

MAX_VAPID_LIFETIME_SECONDS = 24 * 3600
"""RFC 8292 section 2: ``exp`` must be no more than 24 hours ahead."""

HANG_LIMIT_SECONDS = 60.0
"""A hung request is answered 503 after this long, unless the client left or the fake stopped."""

URGENCIES = frozenset({"very-low", "low", "normal", "high"})
_TOPIC = re.compile(r"[A-Za-z0-9_-]{1,32}")
_VERIFIED_TOKENS_LIMIT = 4096


@dataclass(frozen=True)
class Answer:
    """A scripted answer to one push (see :meth:`FakeWebPushService.script`).

    A scripted answer replaces the 201 of a push that passed every check; a push that fails a
    check is still refused with 400/401/403/413 as a real service would.
    """

    status: int = 201
    retry_after: str | None = None
    """The Retry-After header to send: seconds or an HTTP date."""
    hang: bool = False
    """Never answer: hold the request until the client gives up or the fake stops."""


HANG = Answer(hang=True)


@dataclass(frozen=True)
class ReceivedPush:
    """One request to a push endpoint, as the fake saw and answered it."""

    subscription_id: str
    status: int | None
    """The status answered; ``None`` for a request held by a hang."""
    payload: bytes | None
    """The decrypted body; ``None`` when the request was refused before decryption."""
    body: bytes | None
    """The body as received (encrypted); ``None`` when the request was refused before reading
    it."""
    ttl: str | None
    urgency: str | None
    topic: str | None
    vapid_token: str | None
    """The JWT of the VAPID header (``t=``), verified or not."""
    vapid_key: str | None
    """The public key of the VAPID header (``k=``)."""
    claims: Mapping[str, Any] | None
    """The JWT claims, only when the signature verified."""
    error: str | None
    """Why the fake refused the request; ``None`` when it passed every check."""
    client_port: int | None
    """The client's source port: equal ports mean one reused connection."""

    def message(self) -> Any:
        """The decrypted payload parsed as JSON."""
        assert self.payload is not None, f"push was not decrypted: {self.error}"
        return json.loads(self.payload)


@dataclass(frozen=True)
class _Subscription:
    id: str
    private_key: ec.EllipticCurvePrivateKey
    auth_secret: bytes
    application_server_key: str | None
    info: Mapping[str, Any]


class _Refusal(Exception):
    """A request a real push service would refuse."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class FakeWebPushService:
    """The fake push service; use as a context manager or :meth:`start`/:meth:`stop`.

    ``application_server_key`` is the default key new subscriptions are bound to (a push signed
    with another key gets 403, as from a real service); ``None`` accepts any valid signature.
    ``max_records`` caps the kept :attr:`pushes` (``None``: keep all; standalone runs cap it).
    ``echo``, when given, gets one JSON line per accepted push (the demo's ``--print-pushes``).
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        ca: trustme.CA | None = None,
        application_server_key: str | None = None,
        max_records: int | None = None,
        echo: TextIO | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.ca = ca or trustme.CA()
        """The CA that signed the server certificate; pass it to a second fake to share trust."""
        self.ca_file = ""
        """Path of the CA certificate PEM to trust (``PUSH_WEBPUSH_CA_FILE``), set by start()."""
        self.application_server_key = application_server_key
        self._records: collections.deque[ReceivedPush] = collections.deque(maxlen=max_records)
        self._echo = echo
        self._subscriptions: dict[str, _Subscription] = {}
        self._scripts: dict[str, tuple[collections.deque[Answer], Answer | None]] = {}
        self._lock = threading.Lock()
        self._verified: dict[tuple[str, str], dict[str, Any]] = {}
        self._server_thread = LoopThread()
        self._release: asyncio.Event | None = None
        self._runner: web.AppRunner | None = None
        self._tmpdir: str | None = None

    @property
    def origin(self) -> str:
        """The service's origin, the ``aud`` every VAPID token must carry."""
        return f"https://localhost:{self.port}"

    # --- lifecycle -------------------------------------------------------------------------

    def start(self) -> FakeWebPushService:
        """Start serving in a background thread; returns once the port is listening."""
        self._tmpdir = tempfile.mkdtemp(prefix="fake-webpush-")
        self.ca_file = os.path.join(self._tmpdir, "ca.pem")
        self.ca.cert_pem.write_to_path(self.ca_file)
        server_ssl = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.ca.issue_cert("localhost", "127.0.0.1").configure_cert(server_ssl)
        self.port = self._server_thread.start(
            "fake-webpush", lambda: self._start_site(server_ssl))
        return self

    def stop(self) -> None:
        """Release hung requests, stop serving, and remove the CA file."""
        self._server_thread.stop(self._stop_site)
        if self._tmpdir is not None:
            shutil.rmtree(self._tmpdir, ignore_errors=True)
        self._tmpdir = None

    def __enter__(self) -> FakeWebPushService:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # --- what tests use --------------------------------------------------------------------

    def subscribe(self, application_server_key: str | None = None) -> dict[str, Any]:
        """A new subscription, as ``PushSubscription.toJSON()`` gives it to a web page.

        It is bound to ``application_server_key``, or to the service's default when omitted.
        Call it once the service is started: the endpoint holds the port.
        """
        key = ec.generate_private_key(ec.SECP256R1())
        auth_secret = os.urandom(16)
        subscription_id = secrets.token_urlsafe(12)
        point = key.public_key().public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
        )
        info = {
            "endpoint": f"{self.origin}/push/{subscription_id}",
            "expirationTime": None,
            "keys": {"p256dh": _b64url(point), "auth": _b64url(auth_secret)},
        }
        with self._lock:
            self._subscriptions[subscription_id] = _Subscription(
                subscription_id,
                key,
                auth_secret,
                application_server_key or self.application_server_key,
                info,
            )
        return copy.deepcopy(info)

    def script(
        self,
        subscription: Mapping[str, Any],
        *answers: int | Answer,
        then: int | Answer | None = None,
    ) -> None:
        """Answer the next pushes to ``subscription`` with ``answers``, one each, in order.

        Once they are used up, pushes get ``then``, or the normal 201 when ``then`` is None.
        ``script(sub, 503, 201)`` is a queue; ``script(sub, then=410)`` is a permanent answer.
        A new script replaces the previous one.
        """
        queue = collections.deque(_answer(a) for a in answers)
        with self._lock:
            self._scripts[_subscription_id(subscription)] = (
                queue,
                None if then is None else _answer(then),
            )

    def drop_connections(self) -> None:
        """Close every client connection now, as a push service closes idle kept-alive ones.

        Returns once they are closed; the clients see it when their loop next runs.
        """
        self._server_thread.call(self._drop_connections)

    async def _drop_connections(self) -> None:
        assert self._runner is not None and self._runner.server is not None
        for handler in self._runner.server.connections:
            if handler.transport is not None:
                handler.transport.abort()

    @property
    def pushes(self) -> list[ReceivedPush]:
        """Every recorded request, oldest first."""
        with self._lock:
            return list(self._records)

    def pushes_to(self, subscription: Mapping[str, Any]) -> list[ReceivedPush]:
        """The recorded requests to one subscription, oldest first."""
        subscription_id = _subscription_id(subscription)
        return [p for p in self.pushes if p.subscription_id == subscription_id]

    # --- serving ---------------------------------------------------------------------------

    async def _start_site(self, server_ssl: ssl.SSLContext) -> int:
        """Serve (in the server thread); returns the port."""
        self._release = asyncio.Event()
        app = web.Application(client_max_size=64 * 1024)
        app.router.add_post("/push/{id}", self._push)
        app.router.add_post("/subscriptions", self._create_subscription)
        # No access log: the push handler is the hot path of benchmarks. Cancelling handlers
        # whose client left ends hangs as soon as the provider times out.
        runner = web.AppRunner(
            app, access_log=None, handler_cancellation=True, shutdown_timeout=1.0
        )
        await runner.setup()
        await web.TCPSite(runner, self.host, self.port, ssl_context=server_ssl).start()
        self._runner = runner
        return int(runner.addresses[0][1])

    async def _stop_site(self) -> None:
        """Release hung requests, drop every connection, then stop serving.

        Closing TLS politely waits for the client's close_notify, which never comes from a
        client whose loop is not running (a test's, between two tests): the sockets would be
        left to the garbage collector.
        """
        assert self._release is not None and self._runner is not None
        self._release.set()
        await self._drop_connections()
        await self._runner.cleanup()

    async def _create_subscription(self, request: web.Request) -> web.Response:
        body = await request.json() if request.can_read_body else {}
        subscription = self.subscribe(body.get("applicationServerKey"))
        return web.json_response(subscription, status=201)

    async def _push(self, request: web.Request) -> web.StreamResponse:
        subscription_id = request.match_info["id"]
        peer = request.transport.get_extra_info("peername") if request.transport else None
        seen: dict[str, Any] = {
            "subscription_id": subscription_id,
            "payload": None,
            "body": None,
            "ttl": request.headers.get("TTL"),
            "urgency": request.headers.get("Urgency"),
            "topic": request.headers.get("Topic"),
            "vapid_token": None,
            "vapid_key": None,
            "claims": None,
            "client_port": peer[1] if peer else None,
        }
        subscription = self._subscriptions.get(subscription_id)
        try:
            if subscription is None:
                raise _Refusal(404, "no such subscription")
            body = seen["body"] = await request.read()
            self._check(request, subscription, body, seen)
        except _Refusal as refusal:
            self._record(seen, refusal.status, refusal.message)
            return _error(refusal.status, refusal.message)
        answer = self._next_answer(subscription_id)
        if answer.hang:
            self._record(seen, None, None)
            assert self._release is not None
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._release.wait(), HANG_LIMIT_SECONDS)
            return _error(503, "hung")
        self._record(seen, answer.status, None)
        if answer.status == 201:
            if self._echo is not None:
                self._echo_push(seen)
            location = f"{self.origin}/message/{secrets.token_urlsafe(8)}"
            return web.Response(status=201, headers={"Location": location})
        response = _error(answer.status, "scripted answer")
        if answer.retry_after is not None:
            response.headers["Retry-After"] = answer.retry_after
        return response

    def _echo_push(self, seen: Mapping[str, Any]) -> None:
        """One JSON line per accepted push, for watching a local demo."""
        assert self._echo is not None
        line = {key: seen[key] for key in ("subscription_id", "ttl", "urgency", "topic")}
        line["payload"] = (seen["payload"] or b"").decode(errors="replace")
        print(json.dumps(line), file=self._echo, flush=True)

    def _check(
        self, request: web.Request, subscription: _Subscription, body: bytes, seen: dict[str, Any]
    ) -> None:
        """Everything a push service and then the browser check, in a push service's order."""
        token, key = _vapid_parts(request.headers.get("Authorization"))
        seen["vapid_token"], seen["vapid_key"] = token, key
        claims = self._verified_claims(token, key)
        seen["claims"] = claims
        _check_claims(claims, f"https://{request.host}")
        if subscription.application_server_key and key != subscription.application_server_key:
            raise _Refusal(403, "VAPID key differs from the subscription's applicationServerKey")
        ttl = request.headers.get("TTL")
        if ttl is None or not ttl.isdigit():
            raise _Refusal(400, "missing or invalid TTL header")
        urgency = request.headers.get("Urgency")
        if urgency is not None and urgency not in URGENCIES:
            raise _Refusal(400, "invalid Urgency header")
        topic = request.headers.get("Topic")
        if topic is not None and not _TOPIC.fullmatch(topic):
            raise _Refusal(400, "invalid Topic header")
        if len(body) > MAX_BODY_BYTES:
            raise _Refusal(413, "payload too large")
        if not body:
            return
        if request.headers.get("Content-Encoding", "").lower() != "aes128gcm":
            raise _Refusal(400, "Content-Encoding must be aes128gcm")
        try:
            seen["payload"] = http_ece.decrypt(
                body,
                private_key=subscription.private_key,
                auth_secret=subscription.auth_secret,
                version="aes128gcm",
            )
        except Exception as exc:  # http_ece fails in many ways on a bad body
            raise _Refusal(400, f"cannot decrypt body: {type(exc).__name__}") from None

    def _verified_claims(self, token: str, key: str) -> dict[str, Any]:
        """The token's claims; a token seen before is not verified again (as real services)."""
        claims = self._verified.get((token, key))
        if claims is None:
            claims = _verify_jwt(token, key)
            if len(self._verified) >= _VERIFIED_TOKENS_LIMIT:
                self._verified.clear()
            self._verified[(token, key)] = claims
        return claims

    def _next_answer(self, subscription_id: str) -> Answer:
        with self._lock:
            queue, then = self._scripts.get(subscription_id, (None, None))
            if queue:
                return queue.popleft()
        return then or Answer()

    def _record(self, seen: dict[str, Any], status: int | None, error: str | None) -> None:
        push = ReceivedPush(status=status, error=error, **seen)
        with self._lock:
            self._records.append(push)


def _vapid_parts(header: str | None) -> tuple[str, str]:
    """``t`` and ``k`` of ``Authorization: vapid t=..., k=...`` (RFC 8292 section 3)."""
    if not header:
        raise _Refusal(401, "missing Authorization header")
    scheme, _, params = header.partition(" ")
    if scheme.lower() != "vapid":
        raise _Refusal(401, "Authorization scheme must be vapid")
    parts = {}
    for item in params.split(","):
        name, _, value = item.strip().partition("=")
        parts[name.strip().lower()] = value.strip()
    if not parts.get("t") or not parts.get("k"):
        raise _Refusal(401, "VAPID header needs t= and k=")
    return parts["t"], parts["k"]


def _verify_jwt(token: str, key: str) -> dict[str, Any]:
    """The claims of an ES256 JWT signed by the key ``k=`` (uncompressed P-256 point)."""
    try:
        header_b64, claims_b64, signature_b64 = token.split(".")
        if json.loads(_unb64url(header_b64)).get("alg") != "ES256":
            raise _Refusal(401, "VAPID JWT must be ES256")
        signature = _unb64url(signature_b64)
        if len(signature) != 64:
            raise _Refusal(401, "VAPID JWT signature must be 64 bytes")
        public_key = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), _unb64url(key))
        public_key.verify(
            encode_dss_signature(
                int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big")
            ),
            f"{header_b64}.{claims_b64}".encode(),
            ec.ECDSA(hashes.SHA256()),
        )
        claims = json.loads(_unb64url(claims_b64))
    except (ValueError, AttributeError, InvalidSignature):
        raise _Refusal(401, "invalid VAPID JWT") from None
    if not isinstance(claims, dict):
        raise _Refusal(401, "VAPID JWT claims must be an object")
    return claims


def _check_claims(claims: Mapping[str, Any], origin: str) -> None:
    if claims.get("aud") != origin:
        raise _Refusal(401, "VAPID aud is not this push service's origin")
    exp = claims.get("exp")
    now = time.time()
    if not isinstance(exp, int) or exp <= now:
        raise _Refusal(401, "VAPID JWT expired or without exp")
    if exp > now + MAX_VAPID_LIFETIME_SECONDS:
        raise _Refusal(401, "VAPID exp more than 24 hours ahead")
    sub = claims.get("sub")
    if not isinstance(sub, str) or not sub.startswith(("mailto:", "https://")):
        raise _Refusal(401, "VAPID sub must be a mailto: or https: URI")


def _error(status: int, message: str) -> web.Response:
    """An error body shaped like Mozilla autopush's."""
    return web.json_response({"code": status, "message": message}, status=status)


def _answer(answer: int | Answer) -> Answer:
    return answer if isinstance(answer, Answer) else Answer(status=answer)


def _subscription_id(subscription: Mapping[str, Any]) -> str:
    return str(subscription["endpoint"]).rsplit("/", 1)[1]


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64url(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@pytest.fixture
def webpush_server() -> Iterator[FakeWebPushService]:
    """A started fake push service, fresh for each test (function scope: nothing to reset).

    Starting one costs a few milliseconds (a new CA, certificate and thread). Its CA PEM is at
    ``webpush_server.ca_file``; subscriptions come from ``webpush_server.subscribe()``.
    """
    with FakeWebPushService() as service:
        yield service


def main(argv: list[str] | None = None) -> None:
    """Run the fake standalone until interrupted (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--ca-file", help="also write the CA certificate PEM here")
    parser.add_argument("--subscriptions", type=int, default=0, help="create and print N")
    parser.add_argument("--application-server-key", help="the only VAPID key to accept")
    parser.add_argument("--print-pushes", action="store_true", help="print accepted pushes")
    parser.add_argument("--max-records", type=int, default=10_000)
    args = parser.parse_args(argv)
    service = FakeWebPushService(
        host=args.host,
        port=args.port,
        application_server_key=args.application_server_key,
        max_records=args.max_records,
        echo=sys.stdout if args.print_pushes else None,
    )
    # SIGTERM (from a benchmark or demo script) stops it as cleanly as Ctrl-C; installed before
    # the banner is printed, so a caller that has read the banner can always stop it cleanly.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    with service, contextlib.suppress(KeyboardInterrupt):
        if args.ca_file:
            service.ca.cert_pem.write_to_path(args.ca_file)
        ca_file = args.ca_file or service.ca_file
        print(json.dumps({"origin": service.origin, "port": service.port, "ca_file": ca_file}))
        for _ in range(args.subscriptions):
            print(json.dumps(service.subscribe()))
        sys.stdout.flush()
        threading.Event().wait()


if __name__ == "__main__":
    main()
