"""A fake Web Push service that checks every push the way a push service and a browser would.

It plays both ends a real push goes through: it creates subscriptions as a browser does (a P-256
key pair and a 16-byte auth secret each, endpoint ``https://localhost:PORT/push/<id>``), and on
``POST /push/<id>`` it verifies what a push service verifies (the RFC 8292 VAPID header, TTL,
Urgency, Topic, size) and then decrypts the RFC 8291 body with the subscription's private key, as
the browser would. Every request is recorded as a :class:`ReceivedPush`; tests can also script
the answers of one subscription (errors, Retry-After, a queue such as 503-then-201, a hang).

It serves HTTPS (HTTP/2 or HTTP/1.1, as the client's ALPN offers: real push services speak both)
with the fakes' test CA (``ca_file`` is the PEM to trust) from its own thread and event loop, on
:mod:`fakes.server`'s base (latency, recycling, stream limits, refusals), so it works the same
under pytest-asyncio's per-test loops, in synchronous tests, and standalone for benchmarks and
the local demo::

    python -m fakes.webpush --port 8443 --subscriptions 3 --ca-file /tmp/ca.pem [--rtt-ms 50]

prints one JSON line describing the service, then one subscription JSON per line; ``POST
/subscriptions`` creates more (body optionally ``{"applicationServerKey": "..."}``);
``--print-pushes`` prints every accepted push, decrypted, as a JSON line; ``--state-file`` keeps
the subscriptions (with their private keys) in a file across restarts, as a browser keeps its
own (the local stack's ``.local/webpush-subscriptions.json``).
"""
from __future__ import annotations

import argparse
import base64
import collections
import copy
import json
import os
import re
import secrets
import sys
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, TextIO

import http_ece
import trustme
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from fakes.server import FakeServer, Hang, Network, Reply, Request, announce_and_wait

MAX_BODY_BYTES = 4096
"""Real push services refuse larger encrypted bodies with 413 (RFC 8030 only guarantees 4096)."""

MAX_VAPID_LIFETIME_SECONDS = 24 * 3600
"""RFC 8292 section 2: ``exp`` must be no more than 24 hours ahead."""

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


class FakeWebPushService(FakeServer):
    """The fake push service; use as a context manager or :meth:`start`/:meth:`stop`.

    ``application_server_key`` is the default key new subscriptions are bound to (a push signed
    with another key gets ``key_mismatch_status``: 403 as from FCM and Apple, or 401 as from
    Mozilla's autopush); ``None`` accepts any valid signature.
    ``max_records`` caps the kept :attr:`pushes` (``None``: keep all; standalone runs cap it).
    ``echo``, when given, gets one JSON line per accepted push (the demo's ``--print-pushes``).
    ``state_file``, when given, keeps the subscriptions across restarts (read at start, rewritten
    on each new one). ``ca`` is accepted for compatibility: every fake of a process shares one CA. With
    ``http2=False`` the service speaks HTTP/1.1 only (a push service that never agrees to h2).
    """

    name = "fake-webpush"
    http1 = True

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        ca: trustme.CA | None = None,
        application_server_key: str | None = None,
        max_records: int | None = None,
        echo: TextIO | None = None,
        network: Network = Network(),
        http2: bool = True,
        state_file: str | None = None,
    ) -> None:
        super().__init__(port=port, network=network)
        self.host = host
        self.http2 = http2
        self.application_server_key = application_server_key
        self.key_mismatch_status = 403
        self._records: collections.deque[ReceivedPush] = collections.deque(maxlen=max_records)
        self._echo = echo
        self._subscriptions: dict[str, _Subscription] = {}
        self._scripts: dict[str, tuple[collections.deque[Answer], Answer | None]] = {}
        self._verified: dict[tuple[str, str], dict[str, Any]] = {}
        self._state_file = state_file
        if state_file and os.path.exists(state_file):
            self._subscriptions = _load_subscriptions(state_file)

    @property
    def origin(self) -> str:
        """The service's origin, the ``aud`` every VAPID token must carry."""
        return f"https://localhost:{self.port}"

    @property
    def ca_file(self) -> str:
        """Path of the CA certificate PEM to trust (``PUSH_WEBPUSH_CA_FILE``)."""
        return self.ca_path

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
        with self.lock:
            self._subscriptions[subscription_id] = _Subscription(
                subscription_id,
                key,
                auth_secret,
                application_server_key or self.application_server_key,
                info,
            )
            if self._state_file:
                _save_subscriptions(self._state_file, self._subscriptions.values())
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
        with self.lock:
            self._scripts[_subscription_id(subscription)] = (
                queue,
                None if then is None else _answer(then),
            )

    @property
    def pushes(self) -> list[ReceivedPush]:
        """Every recorded request, oldest first."""
        with self.lock:
            return list(self._records)

    def pushes_to(self, subscription: Mapping[str, Any]) -> list[ReceivedPush]:
        """The recorded requests to one subscription, oldest first."""
        subscription_id = _subscription_id(subscription)
        return [p for p in self.pushes if p.subscription_id == subscription_id]

    # --- serving (server thread) ---------------------------------------------------------

    def handle(self, request: Request) -> Reply | Hang:
        path = request.path.decode("latin-1").partition("?")[0]
        if request.method == b"POST" and path == "/subscriptions":
            body = json.loads(request.body) if request.body else {}
            info = self.subscribe(body.get("applicationServerKey"))
            return Reply(201, ((b"content-type", b"application/json"),),
                         json.dumps(info).encode(), push=False)
        if request.method != b"POST" or not path.startswith("/push/"):
            return _error(404, "not found", push=False)
        return self._push(path.removeprefix("/push/"), request)

    def _push(self, subscription_id: str, request: Request) -> Reply | Hang:
        headers = {name.decode("latin-1"): value.decode("latin-1")
                   for name, value in request.headers}
        seen: dict[str, Any] = {
            "subscription_id": subscription_id,
            "payload": None,
            "body": None,
            "ttl": headers.get("ttl"),
            "urgency": headers.get("urgency"),
            "topic": headers.get("topic"),
            "vapid_token": None,
            "vapid_key": None,
            "claims": None,
            "client_port": request.peer_port,
        }
        subscription = self._subscriptions.get(subscription_id)
        try:
            if subscription is None:
                raise _Refusal(404, "no such subscription")
            seen["body"] = request.body
            authority = headers.get(":authority") or headers.get("host", "")
            self._check(headers, authority, subscription, request.body, seen)
        except _Refusal as refusal:
            self._record(seen, refusal.status, refusal.message)
            return _error(refusal.status, refusal.message)
        answer = self._next_answer(subscription_id)
        if answer.hang:
            self._record(seen, None, None)
            return Hang(subscription_id)
        self._record(seen, answer.status, None)
        if answer.status == 201:
            if self._echo is not None:
                self._echo_push(seen)
            location = f"{self.origin}/message/{secrets.token_urlsafe(8)}"
            return Reply(201, ((b"location", location.encode()),))
        reply = _error(answer.status, "scripted answer")
        if answer.retry_after is not None:
            reply = Reply(reply.status, reply.headers + (
                (b"retry-after", answer.retry_after.encode()),), reply.body)
        return reply

    def _echo_push(self, seen: Mapping[str, Any]) -> None:
        """One JSON line per accepted push, for watching a local demo."""
        assert self._echo is not None
        line = {key: seen[key] for key in ("subscription_id", "ttl", "urgency", "topic")}
        line["payload"] = (seen["payload"] or b"").decode(errors="replace")
        print(json.dumps(line), file=self._echo, flush=True)

    def _check(
        self, headers: dict[str, str], authority: str, subscription: _Subscription, body: bytes,
        seen: dict[str, Any],
    ) -> None:
        """Everything a push service and then the browser check, in a push service's order."""
        token, key = _vapid_parts(headers.get("authorization"))
        seen["vapid_token"], seen["vapid_key"] = token, key
        claims = self._verified_claims(token, key)
        seen["claims"] = claims
        _check_claims(claims, f"https://{authority}")
        if subscription.application_server_key and key != subscription.application_server_key:
            raise _Refusal(self.key_mismatch_status, "VAPID key differs from the subscription's applicationServerKey")
        ttl = headers.get("ttl")
        if ttl is None or not ttl.isdigit():
            raise _Refusal(400, "missing or invalid TTL header")
        urgency = headers.get("urgency")
        if urgency is not None and urgency not in URGENCIES:
            raise _Refusal(400, "invalid Urgency header")
        topic = headers.get("topic")
        if topic is not None and not _TOPIC.fullmatch(topic):
            raise _Refusal(400, "invalid Topic header")
        if len(body) > MAX_BODY_BYTES:
            raise _Refusal(413, "payload too large")
        if not body:
            return
        if headers.get("content-encoding", "").lower() != "aes128gcm":
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
        with self.lock:
            queue, then = self._scripts.get(subscription_id, (None, None))
            if queue:
                return queue.popleft()
        return then or Answer()

    def _record(self, seen: dict[str, Any], status: int | None, error: str | None) -> None:
        push = ReceivedPush(status=status, error=error, **seen)
        with self.lock:
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


def _error(status: int, message: str, *, push: bool = True) -> Reply:
    """An error body shaped like Mozilla autopush's."""
    return Reply(status, ((b"content-type", b"application/json"),),
                 json.dumps({"code": status, "message": message}).encode(), push=push)


def _answer(answer: int | Answer) -> Answer:
    return answer if isinstance(answer, Answer) else Answer(status=answer)


def _subscription_id(subscription: Mapping[str, Any]) -> str:
    return str(subscription["endpoint"]).rsplit("/", 1)[1]


def _save_subscriptions(path: str, subscriptions: Iterable[_Subscription]) -> None:
    """Write every subscription, private key included (mode 0600), replacing the file whole."""
    items = [{
        "id": s.id,
        "private_key": _b64url(s.private_key.private_numbers().private_value.to_bytes(32, "big")),
        "auth_secret": _b64url(s.auth_secret),
        "application_server_key": s.application_server_key,
        "info": s.info,
    } for s in subscriptions]
    partial = f"{path}.partial"
    with open(os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as file:
        json.dump(items, file)
    os.replace(partial, path)


def _load_subscriptions(path: str) -> dict[str, _Subscription]:
    with open(path) as file:
        items = json.load(file)
    return {item["id"]: _Subscription(
        item["id"],
        ec.derive_private_key(int.from_bytes(_unb64url(item["private_key"]), "big"), ec.SECP256R1()),
        _unb64url(item["auth_secret"]),
        item["application_server_key"],
        item["info"],
    ) for item in items}


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64url(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


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
    parser.add_argument("--http1-only", action="store_true",
                        help="speak HTTP/1.1 only (no h2 in ALPN)")
    parser.add_argument("--state-file", help="keep the subscriptions in this file across restarts")
    Network.add_arguments(parser, max_concurrent_streams=100)
    args = parser.parse_args(argv)
    service = FakeWebPushService(
        host=args.host,
        port=args.port,
        application_server_key=args.application_server_key,
        max_records=args.max_records,
        echo=sys.stdout if args.print_pushes else None,
        network=Network.from_arguments(args),
        http2=not args.http1_only,
        state_file=args.state_file,
    )
    with service:
        if args.ca_file:
            service.ca.cert_pem.write_to_path(args.ca_file)
        ca_file = args.ca_file or service.ca_file
        info = {"origin": service.origin, "port": service.port, "ca_file": ca_file}
        subscriptions = [json.dumps(service.subscribe()) for _ in range(args.subscriptions)]
        announce_and_wait(info, service, subscriptions)


if __name__ == "__main__":
    main()
