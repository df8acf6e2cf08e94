"""Web Push provider: RFC 8030 delivery, RFC 8291 payload encryption, RFC 8292 (VAPID) signing.

A browser subscription is the token (its JSON text). Each wake-up is encrypted for that browser
alone, so encryption happens per push (a fresh ephemeral ECDH key and salt each, as RFC 8291
requires); everything else is reused across pushes and invocations: kept-alive HTTPS connections
per push service, and one signed VAPID header per push-service origin, kept until shortly before
it expires, because an ECDSA signature per push is measurable waste when a burst fans out to
thousands of subscriptions of the same few push services.

Encryption is http_ece's (RFC 8188 and the RFC 8291 key derivation), called directly rather than
through pywebpush, and HTTP goes through the project's transport (:mod:`shared.transport`) rather
than aiohttp, because per push their wrappers cost more than the cryptography itself: pywebpush
copies the subscription, re-decodes its keys and builds its header dictionaries (and imports
``requests``); aiohttp spends about as much again per request on its client machinery, and its
import (with yarl, multidict and TLS contexts) was a tenth of a cold start. The tests decrypt
every push on the receiving side and verify its VAPID signature.

Real push services (``fcm.googleapis.com``, ``updates.push.services.mozilla.com``,
``web.push.apple.com``) speak HTTP/2, so each connection offers ``h2`` in ALPN and a push service
that agrees gets every push to it multiplexed over a few connections (:mod:`shared.transport.
http2`); one that answers with HTTP/1.1 is remembered as such, and its pushes go over kept-alive
HTTP/1.1 connections (:mod:`shared.transport.http1`), one request at a time each. At a 50 ms
round trip that is the difference between 2,000 pushes/s on one connection and ~100 connections
for the same (docs/libraries.md).

Push services answer with plain HTTP statuses; :meth:`WebPushProvider.send` turns every answer
and every network failure into a :class:`~shared.core.SendResult`. Endpoints and keys
identify a browser, so they never appear in a log line or in a result's ``reason``.

Endpoints lead only to the browser push services over the public internet (:mod:`shared.endpoints`:
the name is checked before each push, the address when a connection opens, and the connection
goes to the address checked). A redirect is an answer like any other: never followed.
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import re
import ssl
import time
from dataclasses import dataclass
from urllib.parse import quote, urlsplit

import http_ece
import httptools
from cryptography.hazmat.primitives.asymmetric import ec
from py_vapid.jwt import sign as sign_jwt

from shared.config import ConfigError, require_secret
from shared.core import Device, Outcome, SendResult, WakeUp
from shared.endpoints import EndpointRefused, EndpointRules
from shared.providers.base import retry_after_seconds
from shared.settings import default, read_setting
from shared.transport.connect import Origin, Resolver
from shared.transport.http1 import Http1Pool
from shared.transport.http2 import Header, Http2Pool, NoHttp2
from shared.transport.proxy import Proxy, proxy_for
from shared.transport.tls import ClientTls
from shared.vapid import (
    PRIVATE_KEY_VAR,
    PUBLIC_KEY_VAR,
    b64url_decode,
    b64url_encode,
    check_public_key,
    load_private_key,
    public_key_b64,
)

log = logging.getLogger(__name__)

URGENCIES = ("very-low", "low", "normal", "high")
"""RFC 8030 section 5.3 values; push services reject anything else."""

VAPID_LIFETIME_SECONDS = 12 * 3600
"""How long a signed VAPID header is valid. RFC 8292 caps ``exp`` at 24 h; half of that leaves
room for a push service whose clock runs ahead of ours."""

VAPID_RENEWAL_MARGIN_SECONDS = 3600
"""A cached header is re-signed this long before its ``exp``, so a header never expires between
leaving us and reaching the push service, even with clock skew."""

RECORD_SIZE = 4096
"""The RFC 8188 record size announced in each body, as browsers' and libraries' default."""

_HOST = re.compile(r"[A-Za-z0-9._~%!$&'()*+,;=:-]+")
"""RFC 3986 host characters (a name, an IPv4 address, an IPv6 address without its brackets):
nothing that could end the Host header it goes into."""

_URL_SAFE = "/%:@!$&'()*+,;=-._~"
"""RFC 3986 path and query characters that go into a request line as they are."""

_TOPIC = re.compile(r"[A-Za-z0-9_-]{1,32}")
"""RFC 8030 section 5.4: a Topic is at most 32 characters of the base64url alphabet."""

_SUBJECT_VAR = "PUSH_VAPID_SUBJECT"
_CA_VAR = "PUSH_WEBPUSH_CA_FILE"
_URGENCY_VAR = "PUSH_WEBPUSH_URGENCY"


@dataclass(frozen=True)
class _Subscription:
    """A subscription that passed validation, in the forms a push to it needs."""

    service: Origin
    """Where to connect (the host an IPv6 address without brackets)."""
    origin: str
    """The push service's origin: the VAPID audience."""
    target: bytes
    """The request line's target and the Host header: ``/path?query HTTP/1.1\\r\\nHost: ...``."""
    path: bytes
    """``/path?query``, as HTTP/2's ``:path``."""
    authority: bytes
    receiver_point: bytes
    """The browser's uncompressed P-256 point (``p256dh``), as RFC 8291 hashes it."""
    auth_secret: bytes


class WebPushProvider:
    """Sends wake-ups to browsers' push services. Create once per process; see the module doc."""

    name = "webpush"
    #: Echo has no Web Push: its request is not served here.
    echo = None

    def __init__(
        self,
        *,
        vapid_private_key: str,
        vapid_subject: str,
        ca_file: str | None = None,
        timeout_seconds: float = default("PUSH_WEBPUSH_TIMEOUT_SECONDS"),
        urgency: str = default(_URGENCY_VAR),
        max_connections: int = default("PUSH_WEBPUSH_MAX_CONNECTIONS"),
        vapid_public_key: str | None = None,
        endpoint_rules: EndpointRules | None = None,
    ) -> None:
        """Validate everything now, so a bad setting fails the start-up and not the first push.

        ``vapid_private_key`` is the raw base64url private key or a PEM (SEC1 or PKCS#8).
        ``vapid_public_key``, when given, is the key subscribe publishes to web pages
        (``PUSH_VAPID_PUBLIC_KEY``): it must be this private key's, or no push would be accepted.
        ``ca_file`` is a PEM bundle trusted in addition to the system's CAs.
        ``max_connections`` bounds the HTTP/2 connections to each push service, and the
        requests in flight over HTTP/1.1 (over all push services that only speak it).
        ``endpoint_rules`` say where endpoints may lead (default: the browser push services).
        Errors name the environment variable the value comes from in :meth:`from_env`.
        """
        self._private_key = load_private_key(vapid_private_key)
        self._public_key = public_key_b64(self._private_key)
        if vapid_public_key is not None and check_public_key(vapid_public_key) != self._public_key:
            raise ConfigError(
                f"{PUBLIC_KEY_VAR} is not the public key of {PRIVATE_KEY_VAR}: web pages would "
                "subscribe with a key these pushes are not signed with"
            )
        self._subject = _check_subject(vapid_subject)
        if urgency not in URGENCIES:
            choices = ", ".join(URGENCIES)
            raise ConfigError(f"{_URGENCY_VAR} must be one of {choices}, not {urgency!r}")
        self._urgency = urgency
        self._tls = ClientTls(ca_file, _CA_VAR)
        try:  # a malformed HTTPS_PROXY fails the start-up, not the first push
            proxy_for("https", "push.example", 443)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        self._timeout = timeout_seconds
        self._max_connections = max_connections
        self._rules = endpoint_rules or EndpointRules()
        self._transports: _Transports | None = None
        self._vapid_headers: dict[str, tuple[str, int]] = {}

    @classmethod
    def from_env(cls, endpoint_rules: EndpointRules | None = None) -> WebPushProvider:
        """The provider configured by the ``PUSH_VAPID_*`` and ``PUSH_WEBPUSH_*`` settings;
        ``endpoint_rules`` when given (shared by every app's provider), else their own."""
        subject = read_setting(_SUBJECT_VAR)
        if subject is None:
            raise ConfigError(
                f"{_SUBJECT_VAR} is not set: Web Push needs a mailto: or https: contact for VAPID"
            )
        return cls(
            vapid_private_key=require_secret(PRIVATE_KEY_VAR, "Web Push signs every push with it"),
            vapid_public_key=read_setting(PUBLIC_KEY_VAR),
            vapid_subject=subject,
            ca_file=read_setting(_CA_VAR),
            timeout_seconds=read_setting("PUSH_WEBPUSH_TIMEOUT_SECONDS"),
            urgency=read_setting(_URGENCY_VAR),
            max_connections=read_setting("PUSH_WEBPUSH_MAX_CONNECTIONS"),
            endpoint_rules=endpoint_rules or EndpointRules.from_env(),
        )

    @property
    def application_server_key(self) -> str:
        """The VAPID public key, base64url: web pages must subscribe with this exact key."""
        return self._public_key

    async def send(self, device: Device, wakeup: WakeUp) -> SendResult:
        """Encrypt ``{"type": message_type}`` for the subscription and POST it to its endpoint.

        The subscription is checked even on a dry run: a dry run says whether the real push
        could work, and a subscription with unusable keys never can.
        """
        subscription = _parse_subscription(device.token)
        if subscription is None:
            log.info("webpush device %s: invalid subscription", device.id)
            return SendResult(Outcome.DEAD, "invalid_subscription")
        # SSRF guard (shared/endpoints.py), for rows stored before a rule too: not a dead
        # subscription (no push service said so), a refused push.
        refusal = self._rules.refusal(subscription.service.host, subscription.service.port)
        if refusal is not None:
            log.warning("webpush device %s: endpoint refused (%s)", device.id, refusal.reason)
            return SendResult(Outcome.REJECTED, "endpoint_not_allowed")
        if wakeup.dry_run:
            return SendResult(Outcome.DELIVERED, "dry_run")
        payload = json.dumps({"type": wakeup.message_type}, separators=(",", ":")).encode()
        body = _encrypt(payload, subscription)
        headers = [
            (b"authorization", self._vapid_header(subscription.origin).encode()),
            (b"ttl", b"%d" % wakeup.ttl_seconds),
            (b"urgency", self._urgency.encode()),
            (b"topic", _topic(wakeup.message_type).encode()),
            (b"content-encoding", b"aes128gcm"),
            (b"content-type", b"application/octet-stream"),
            (b"content-length", b"%d" % len(body)),
        ]
        try:
            # The timeout bounds the whole exchange: waiting for a connection slot, connecting,
            # TLS, sending, reading the answer.
            async with asyncio.timeout(self._timeout):
                status, retry_after = await self._post(subscription, headers, body)
        except EndpointRefused as refused:  # SSRF guard: its host resolved to an inward address
            log.warning("webpush device %s: endpoint refused (%s)", device.id, refused.reason)
            return SendResult(Outcome.REJECTED, refused.reason)
        except TimeoutError:
            result = SendResult(Outcome.TRANSIENT, "timeout")
        except httptools.HttpParserError:
            result = SendResult(Outcome.TRANSIENT, "unreadable_response")
        except ssl.SSLError:
            result = SendResult(Outcome.TRANSIENT, "tls_error")
        except OSError as exc:
            # The text names at most the push service's host, never the subscription's path.
            log.info("webpush device %s: %s: %s", device.id, type(exc).__name__, exc)
            result = SendResult(Outcome.TRANSIENT, "connection_error")
        else:
            result = _classify(status, retry_after)
        if result.outcome is not Outcome.DELIVERED:
            log.info("webpush device %s: %s %s", device.id, result.outcome.value, result.reason)
        return result

    async def aclose(self) -> None:
        """Close the pooled connections; a later send opens new ones."""
        transports, self._transports = self._transports, None
        if transports is not None and transports.loop is asyncio.get_running_loop():
            await transports.aclose()

    async def _post(self, subscription: _Subscription, headers: list[Header],
                    body: bytes) -> tuple[int, str | None]:
        """POST the push over HTTP/2 when the push service agrees to it, else HTTP/1.1; the
        answer's status and ``Retry-After``."""
        transports = self._connections()
        service = subscription.service
        if service not in transports.http1_only:
            try:
                response = await transports.http2(service).request([
                    (b":method", b"POST"), (b":scheme", b"https"),
                    (b":authority", subscription.authority), (b":path", subscription.path),
                    *headers], body)
            except NoHttp2 as answered_http1:
                transports.http1_only.add(service)
                connection = answered_http1.take()  # already open: no second lookup
                if connection is not None:
                    transports.http1.adopt(service, connection)
            else:
                retry_after = response.header(b"retry-after")
                return response.status, (
                    None if retry_after is None else retry_after[:64].decode("latin-1"))
        head = b"".join(b"%s: %s\r\n" % header for header in headers)
        request = b"POST " + subscription.target + head + b"\r\n" + body
        return await transports.http1.request(service, request)

    def _connections(self) -> _Transports:
        """The connection pools of the running loop.

        Connections belong to the loop that opened them; if the process runs each invocation in
        a new loop (``asyncio.run`` per call), the old pools are unusable and are replaced.
        """
        loop = asyncio.get_running_loop()
        if self._transports is None or self._transports.loop is not loop:
            self._transports = _Transports(self._tls, self._max_connections, self._timeout,
                                           self._rules.addresses)
        return self._transports

    def _vapid_header(self, origin: str) -> str:
        """The ``Authorization`` header for ``origin``, re-signed only when near expiry."""
        now = time.time()
        cached = self._vapid_headers.get(origin)
        if cached is not None and now < cached[1] - VAPID_RENEWAL_MARGIN_SECONDS:
            return cached[0]
        expires = int(now) + VAPID_LIFETIME_SECONDS
        token = sign_jwt({"aud": origin, "exp": expires, "sub": self._subject}, self._private_key)
        header = f"vapid t={token}, k={self._public_key}"
        self._vapid_headers[origin] = (header, expires)
        return header


class _Transports:
    """The connections of one event loop: an HTTP/2 pool per push service that speaks it, one
    HTTP/1.1 pool for those that do not (found out by ALPN at the first connection)."""

    MAX_SERVICES = 256
    """HTTP/2 pools kept at most; past it the oldest is closed (subscribers name the push
    service, so their number is not ours to bound)."""

    def __init__(self, tls: ClientTls, max_connections: int, timeout: float,
                 resolve: Resolver) -> None:
        """``resolve``: the addresses a connection to a push service may go to, each checked
        (shared/endpoints.py, the guard against endpoints that lead inward)."""
        self.loop = asyncio.get_running_loop()
        self._tls = tls
        self._max_connections = max_connections
        self._timeout = timeout
        self._resolve = resolve
        self.http1 = Http1Pool(tls.context("http/1.1"), max_connections, _proxy, resolve)
        self.http1_only: set[Origin] = set()
        self._http2: dict[Origin, Http2Pool] = {}
        self._closing: set[asyncio.Task[None]] = set()

    def http2(self, service: Origin) -> Http2Pool:
        pool = self._http2.get(service)
        if pool is None:
            if len(self._http2) >= self.MAX_SERVICES:
                oldest = self._http2.pop(next(iter(self._http2)))
                task = self.loop.create_task(oldest.aclose())
                self._closing.add(task)
                task.add_done_callback(self._closing.discard)
            pool = self._http2[service] = Http2Pool(
                service, self._tls.context("h2", "http/1.1"), timeout=self._timeout,
                max_connections=self._max_connections, proxy=_proxy(service),
                resolve=self._resolve)
        return pool

    async def aclose(self) -> None:
        self.http1.close()
        await asyncio.gather(*(pool.aclose() for pool in self._http2.values()), *self._closing)


def _proxy(service: Origin) -> Proxy | None:
    return proxy_for(service.scheme, service.host, service.port)


def _encrypt(payload: bytes, subscription: _Subscription) -> bytes:
    """``payload`` encrypted for the subscription's browser: an RFC 8291 ``aes128gcm`` body, by
    http_ece (the RFC 8188 library pywebpush itself encrypts with), with a fresh ephemeral ECDH
    key pair and a fresh salt each time, as RFC 8291 requires."""
    return http_ece.encrypt(
        payload,
        salt=os.urandom(16),
        private_key=ec.generate_private_key(ec.SECP256R1()),
        dh=subscription.receiver_point,
        auth_secret=subscription.auth_secret,
        rs=RECORD_SIZE,
        version="aes128gcm",
    )


def _classify(status: int, retry_after: str | None) -> SendResult:
    """What a push service's HTTP status means (RFC 8030 section 5 and the services' docs).

    401 and 403 are the push service refusing our VAPID header, not the message: KEY_REFUSED.
    RFC 8292 section 4.2 names 401 for authentication absent and 403 for invalid, where invalid
    includes a key other than the one the subscription was created with; the services differ:
    Mozilla's autopush answers 401 (errno 109) both to a key mismatch and to a bad or expired
    JWT, FCM 403 to a mismatch ("the VAPID credentials in the authorization header do not
    correspond to the credentials used to create the subscriptions"), Apple 403 ``BadJwtToken``
    to a JWT signed with the wrong key and to a subject or audience it will not take. So neither
    status says whether one subscription is stale or our key is wrong for all: the hold gate
    tells them apart by the app's other devices."""
    if 200 <= status < 300:
        return SendResult(Outcome.DELIVERED)
    reason = f"http_{status}"
    if status in (404, 410):
        return SendResult(Outcome.DEAD, reason)
    if status in (401, 403):
        return SendResult(Outcome.KEY_REFUSED, reason)
    if status == 429 or status >= 500:
        return SendResult(
            Outcome.TRANSIENT, reason, retry_after_seconds(retry_after), rate_limited=status == 429)
    return SendResult(Outcome.REJECTED, reason)


def _parse_subscription(token: str) -> _Subscription | None:
    """The subscription in ``token``, or ``None`` when no push to it can ever work.

    Checked in full here, so that a malformed key cannot fail halfway through encryption.
    """
    try:
        data = json.loads(token)
    except ValueError:
        return None
    if not isinstance(data, dict):
        return None
    endpoint, keys = data.get("endpoint"), data.get("keys")
    if not isinstance(endpoint, str) or not isinstance(keys, dict):
        return None
    p256dh, auth = keys.get("p256dh"), keys.get("auth")
    if not isinstance(p256dh, str) or not isinstance(auth, str):
        return None
    try:
        url = urlsplit(endpoint)
        # .port raises ValueError for a port no request could ever use.
        if url.scheme != "https" or not url.hostname or url.port == 0:
            return None
        hostname = url.hostname if url.hostname.isascii() else url.hostname.encode("idna").decode()
        if not _HOST.fullmatch(hostname):
            return None
        point, secret = b64url_decode(p256dh), b64url_decode(auth)
        # Browsers send the uncompressed point; the RFC 8291 key derivation hashes it as sent.
        if len(point) != 65 or point[0] != 4 or len(secret) != 16:
            return None
        ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), point)
    except ValueError:
        return None
    # The audience is the origin as the push service sees it: host lower-cased, no user-info.
    host = f"[{hostname}]" if ":" in hostname else hostname
    origin = f"https://{host}" if url.port is None else f"https://{host}:{url.port}"
    # What yarl (under aiohttp, before) did too: characters a request line cannot carry are
    # percent-encoded, escapes already there are kept.
    target = quote(url.path or "/", safe=_URL_SAFE)
    if url.query:
        target += "?" + quote(url.query, safe=_URL_SAFE)
    host_header = host if url.port is None else f"{host}:{url.port}"
    return _Subscription(
        service=Origin("https", hostname, url.port or 443),
        origin=origin,
        target=f"{target} HTTP/1.1\r\nHost: {host_header}\r\n".encode(),
        path=target.encode(),
        authority=host_header.encode(),
        receiver_point=point,
        auth_secret=secret,
    )


def _topic(message_type: str) -> str:
    """The Topic header for a message type, so a newer wake-up replaces a pending one.

    A message type that is not a valid Topic would make every push service reject the push, so
    it is replaced by a stable digest of itself, which keeps the replacing behaviour.
    """
    if _TOPIC.fullmatch(message_type):
        return message_type
    return b64url_encode(hashlib.sha256(message_type.encode()).digest())[:32]


def _check_subject(subject: str) -> str:
    """RFC 8292 section 2.1: ``sub`` is a contact URI, mailto: or https:."""
    url = urlsplit(subject.strip())
    valid = (
        url.scheme == "mailto" and re.fullmatch(r"[^@\s]+@[^@\s]+", url.path) is not None
    ) or (url.scheme == "https" and bool(url.hostname) and " " not in subject.strip())
    if not valid:
        raise ConfigError(
            f"{_SUBJECT_VAR} must be a mailto: address or an https: URL, not {subject!r}"
        )
    return subject.strip()


