"""Web Push provider: RFC 8030 delivery, RFC 8291 payload encryption, RFC 8292 (VAPID) signing.

A browser subscription is the token (its JSON text). Each wake-up is encrypted for that browser
alone, so encryption happens per push; everything else is reused across pushes and invocations:
one pooled HTTPS session per provider, and one signed VAPID header per push-service origin, kept
until shortly before it expires, because an ECDSA signature per push is measurable waste when a
burst fans out to thousands of subscriptions of the same few push services.

Push services answer with plain HTTP statuses; :meth:`WebPushProvider.send` turns every answer
and every network failure into a :class:`~shared.providers.base.SendResult`. Endpoints and keys
identify a browser, so they never appear in a log line or in a result's ``reason``.
"""
from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import re
import ssl
import time
from dataclasses import dataclass
from typing import Any, NamedTuple
from urllib.parse import urlsplit

import aiohttp
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from py_vapid.jwt import sign as sign_jwt
from pywebpush import WebPusher

from shared.config import ConfigError, env, env_float, env_int, require_secret
from shared.providers.base import (
    Device,
    Outcome,
    SendResult,
    WakeUp,
    retry_after_seconds,
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

_TOPIC = re.compile(r"[A-Za-z0-9_-]{1,32}")
"""RFC 8030 section 5.4: a Topic is at most 32 characters of the base64url alphabet."""

_KEY_VAR = "PUSH_VAPID_PRIVATE_KEY"
_SUBJECT_VAR = "PUSH_VAPID_SUBJECT"
_CA_VAR = "PUSH_WEBPUSH_CA_FILE"
_URGENCY_VAR = "PUSH_WEBPUSH_URGENCY"


class VapidKeys(NamedTuple):
    """A VAPID key pair in the forms people copy around."""

    private_key: str
    """The raw 32-byte private key, base64url: the value for ``PUSH_VAPID_PRIVATE_KEY``."""
    public_key: str
    """The uncompressed public point, base64url: what web pages pass to
    ``pushManager.subscribe()`` as ``applicationServerKey``."""


def generate_vapid_keys() -> VapidKeys:
    """A fresh P-256 VAPID key pair, in the raw base64url forms browsers' tooling uses."""
    key = ec.generate_private_key(ec.SECP256R1())
    raw_private = key.private_numbers().private_value.to_bytes(32, "big")
    return VapidKeys(_b64url_encode(raw_private), _public_key_b64(key))


@dataclass(frozen=True)
class _Subscription:
    """A subscription that passed validation: what pywebpush needs, plus the VAPID audience."""

    info: dict[str, Any]
    origin: str


class WebPushProvider:
    """Sends wake-ups to browsers' push services. Create once per process; see the module doc."""

    name = "webpush"

    def __init__(
        self,
        *,
        vapid_private_key: str,
        vapid_subject: str,
        ca_file: str | None = None,
        timeout_seconds: float = 10.0,
        urgency: str = "normal",
        max_connections: int = 16,
    ) -> None:
        """Validate everything now, so a bad setting fails the start-up and not the first push.

        ``vapid_private_key`` is the raw base64url private key or a PEM (SEC1 or PKCS#8).
        ``ca_file`` is a PEM bundle trusted in addition to the system's CAs.
        Errors name the environment variable the value comes from in :meth:`from_env`.
        """
        self._private_key = _load_private_key(vapid_private_key)
        self._public_key = _public_key_b64(self._private_key)
        self._subject = _check_subject(vapid_subject)
        if urgency not in URGENCIES:
            choices = ", ".join(URGENCIES)
            raise ConfigError(f"{_URGENCY_VAR} must be one of {choices}, not {urgency!r}")
        self._urgency = urgency
        self._ssl: ssl.SSLContext | bool = _ssl_context(ca_file) if ca_file else True
        self._timeout = aiohttp.ClientTimeout(total=timeout_seconds)
        self._max_connections = max_connections
        self._session: aiohttp.ClientSession | None = None
        self._session_loop: asyncio.AbstractEventLoop | None = None
        self._vapid_headers: dict[str, tuple[str, int]] = {}

    @classmethod
    def from_env(cls) -> WebPushProvider:
        """The provider configured by the ``PUSH_VAPID_*`` and ``PUSH_WEBPUSH_*`` settings."""
        subject = env(_SUBJECT_VAR)
        if subject is None:
            raise ConfigError(
                f"{_SUBJECT_VAR} is not set: Web Push needs a mailto: or https: contact for VAPID"
            )
        return cls(
            vapid_private_key=require_secret(_KEY_VAR, "Web Push signs every push with it"),
            vapid_subject=subject,
            ca_file=env(_CA_VAR),
            timeout_seconds=env_float("PUSH_WEBPUSH_TIMEOUT_SECONDS", 10.0, minimum=0.001),
            urgency=env(_URGENCY_VAR, "normal") or "normal",
            max_connections=env_int("PUSH_WEBPUSH_MAX_CONNECTIONS", 16, minimum=1),
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
        if wakeup.dry_run:
            return SendResult(Outcome.DELIVERED, "dry_run")
        headers = {
            "Authorization": self._vapid_header(subscription.origin),
            "Urgency": self._urgency,
            "Topic": _topic(wakeup.message_type),
        }
        payload = json.dumps({"type": wakeup.message_type}, separators=(",", ":"))
        pusher = WebPusher(subscription.info, aiohttp_session=self._client())
        try:
            # The timeout bounds the whole exchange: connecting, TLS, sending, reading the answer.
            response = await pusher.send_async(
                payload,
                headers,
                ttl=wakeup.ttl_seconds,
                content_encoding="aes128gcm",
                timeout=self._timeout,
            )
        except TimeoutError:
            result = SendResult(Outcome.TRANSIENT, "timeout")
        except UnicodeDecodeError:
            # pywebpush decodes the answer's body as text; a body that is not text hides the
            # status, and retrying a content-free wake-up is harmless.
            result = SendResult(Outcome.TRANSIENT, "unreadable_response")
        except aiohttp.ClientSSLError:
            result = SendResult(Outcome.TRANSIENT, "tls_error")
        except aiohttp.ClientError as exc:
            # The exception's text names the endpoint's host: log its type only.
            log.debug("webpush device %s: %s", device.id, type(exc).__name__)
            result = SendResult(Outcome.TRANSIENT, "connection_error")
        else:
            result = _classify(response.status, response.headers.get("Retry-After"))
        if result.outcome is not Outcome.DELIVERED:
            log.info("webpush device %s: %s %s", device.id, result.outcome.value, result.reason)
        return result

    async def aclose(self) -> None:
        """Close the pooled connections; a later send opens a new session."""
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _client(self) -> aiohttp.ClientSession:
        """The pooled session, created inside the running loop as aiohttp requires.

        A session belongs to the loop that created it; if the process runs each invocation in a
        new loop (``asyncio.run`` per call), the old session is unusable and is replaced.
        """
        loop = asyncio.get_running_loop()
        if self._session is None or self._session.closed or self._session_loop is not loop:
            connector = aiohttp.TCPConnector(limit=self._max_connections, ssl=self._ssl)
            self._session = aiohttp.ClientSession(connector=connector)
            self._session_loop = loop
        return self._session

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


def _classify(status: int, retry_after: str | None) -> SendResult:
    """What a push service's HTTP status means (RFC 8030 section 5 and the services' docs)."""
    if 200 <= status < 300:
        return SendResult(Outcome.DELIVERED)
    reason = f"http_{status}"
    if status in (404, 410):
        return SendResult(Outcome.DEAD, reason)
    if status == 429 or status >= 500:
        return SendResult(Outcome.TRANSIENT, reason, retry_after_seconds(retry_after))
    return SendResult(Outcome.REJECTED, reason)


def _parse_subscription(token: str) -> _Subscription | None:
    """The subscription in ``token``, or ``None`` when no push to it can ever work.

    Checked here rather than left to pywebpush, which accepts malformed keys and then fails
    with assorted exceptions halfway through encryption.
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
        point, secret = _b64url_decode(p256dh), _b64url_decode(auth)
        # Browsers send the uncompressed point; the RFC 8291 key derivation hashes it as sent.
        if len(point) != 65 or point[0] != 4 or len(secret) != 16:
            return None
        ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), point)
    except ValueError:
        return None
    # The audience is the origin as the push service sees it: host lower-cased, no user-info.
    host = f"[{url.hostname}]" if ":" in url.hostname else url.hostname
    origin = f"https://{host}" if url.port is None else f"https://{host}:{url.port}"
    return _Subscription({"endpoint": endpoint, "keys": {"p256dh": p256dh, "auth": auth}}, origin)


def _topic(message_type: str) -> str:
    """The Topic header for a message type, so a newer wake-up replaces a pending one.

    A message type that is not a valid Topic would make every push service reject the push, so
    it is replaced by a stable digest of itself, which keeps the replacing behaviour.
    """
    if _TOPIC.fullmatch(message_type):
        return message_type
    return _b64url_encode(hashlib.sha256(message_type.encode()).digest())[:32]


def _load_private_key(text: str) -> ec.EllipticCurvePrivateKey:
    """The VAPID signing key from a raw base64url scalar or a PEM; never echoes the value."""
    text = text.strip()
    if text.startswith("-----BEGIN"):
        try:
            key = serialization.load_pem_private_key(text.encode(), password=None)
        except (ValueError, TypeError, UnsupportedAlgorithm):
            raise ConfigError(
                f"{_KEY_VAR} is not a readable unencrypted PEM private key"
            ) from None
        if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != "secp256r1":
            raise ConfigError(f"{_KEY_VAR} must be a P-256 (prime256v1) EC key")
        return key
    try:
        raw = _b64url_decode(text)
    except ValueError:
        raise ConfigError(
            f"{_KEY_VAR} must be a PEM or the base64url raw 32-byte private key"
        ) from None
    if len(raw) != 32:
        raise ConfigError(
            f"{_KEY_VAR} must be a PEM or the base64url raw 32-byte private key, "
            f"not {len(raw)} bytes"
        )
    try:
        return ec.derive_private_key(int.from_bytes(raw, "big"), ec.SECP256R1())
    except ValueError:
        raise ConfigError(f"{_KEY_VAR} is not a valid P-256 private key") from None


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


def _ssl_context(ca_file: str) -> ssl.SSLContext:
    """The system's trust store plus the extra CA bundle (a private or test push service)."""
    context = ssl.create_default_context()
    try:
        context.load_verify_locations(cafile=ca_file)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"{_CA_VAR}: cannot load CA bundle {ca_file}: {exc}") from None
    return context


def _public_key_b64(key: ec.EllipticCurvePrivateKey) -> str:
    """The uncompressed public point, base64url: VAPID's ``k=`` and ``applicationServerKey``."""
    point = key.public_key().public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )
    return _b64url_encode(point)


def _b64url_encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _b64url_decode(text: str) -> bytes:
    """Base64url with or without padding (standard base64, which some stores keep, too).

    Raises ``ValueError`` (``binascii.Error``) on anything else, rather than silently skipping
    stray characters as the non-validating decoder would.
    """
    return base64.b64decode(text + "=" * (-len(text) % 4), altchars=b"-_", validate=True)
