"""The APNs provider: wake-ups to Apple devices over HTTP/2 with token (``.p8`` key) auth.

Requests go through the project's HTTP/2 client (:mod:`shared.transport.http2`), one pool per
endpoint (production and sandbox), which handles Apple's side of the protocol: the stream limit
APNs raises after the first authenticated request, GOAWAY (Apple sends one before it closes a
connection; requests it did not process are sent again on another connection, the others are
answered), quiet connections checked with a PING, forward proxies (``HTTPS_PROXY``). aioapns,
which this module used before, was dropped: docs say why and what it cost.

Provider token
    An ES256 JWT naming the key and team, presented as ``authorization: bearer <jwt>``. With a
    token store (:class:`shared.apns_tokens.ApnsTokenStore`, given by the dispatcher), every
    connection of every replica presents the one token shared through the database, so
    cold-starting replicas do not each mint one (``TooManyProviderTokenUpdates``):
    :class:`_SharedToken` keeps it in memory, and :meth:`ApnsProvider.send` first awaits its
    cheap freshness check, which goes to the store (in a thread) only once the token reaches the
    refresh age. If the store fails, the token in memory is used until it is
    :data:`_LAST_RESORT_AGE` old, and then one signed locally, so sends never wait on a broken
    database for long. Without a store, :class:`_LocalToken` signs one per process every
    30 minutes (inside Apple's 20-60 minute window).

Endpoints
    Sandbox devices (``Device.environment == "sandbox"``) go to the sandbox endpoint, all others
    to production (``PUSH_APNS_SANDBOX_URL``, ``PUSH_APNS_PRODUCTION_URL``: tests, proxies and
    the fake server stand in for Apple). Pools belong to the event loop that made them, and are
    made again in a new one (a runtime that calls ``asyncio.run`` per invocation).

Logs
    No device token reaches a log line: the path that holds it only passes through our HPACK
    encoder and hpack's decoder (whose debug log would print headers: the transport sets the
    ``hpack`` logger to CRITICAL), and failures are classified here, by Apple's reason.

Answers
    200 is delivered; an error is a status with a JSON ``{"reason": ...}`` body, classified by
    :func:`_classify`, with ``Retry-After`` when Apple sends one. Every outcome, including
    timeouts and connection failures, is a :class:`SendResult`: :meth:`ApnsProvider.send`
    never raises for them.
"""
from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from functools import partial
from typing import Any, Protocol
from urllib.parse import urlsplit

import jwt
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from h2.exceptions import H2Error

from shared.config import (
    ConfigError,
    require_env,
    require_secret,
)
from shared.core import Clock, Device, IssuedToken, Outcome, SendResult, WakeUp
from shared.providers.base import EchoTokens, retry_after_seconds
from shared.settings import default, read_setting
from shared.transport.connect import Origin
from shared.transport.http2 import Header, Http2Pool
from shared.transport.proxy import proxy_for
from shared.transport.tls import ClientTls

DEFAULT_PRODUCTION_URL = default("PUSH_APNS_PRODUCTION_URL")
DEFAULT_SANDBOX_URL = default("PUSH_APNS_SANDBOX_URL")
DEFAULT_TIMEOUT_SECONDS = default("PUSH_APNS_TIMEOUT_SECONDS")
DEFAULT_MAX_CONNECTIONS = default("PUSH_APNS_MAX_CONNECTIONS")

_HEX = re.compile(r"[0-9a-fA-F]+")
_REASON = re.compile(r"[A-Za-z]{1,64}")
"""What an error's reason may look like to be reported: Apple's are words like ``BadTopic``."""
_DEAD_REASONS = frozenset(
    {"Unregistered", "ExpiredToken", "BadDeviceToken", "DeviceTokenNotForTopic"}
)
"""Reasons meaning the token will never work for this topic and environment (any 410 too)."""
_PER_REQUEST_HEADERS = frozenset({b":path", b"apns-expiration"})
"""Request headers whose values change with each request (the device token is in the path):
encoded each time, never cached."""

_LOCAL_TOKEN_AGE = timedelta(minutes=30)
"""Without a token store, a provider token is signed again this often."""
_LAST_RESORT_AGE = timedelta(minutes=55)
"""With the token store failing, the shared token is used until this old, then one signed here."""
_STORE_RETRY = timedelta(seconds=30)
"""After the token store failed, how long sends go on without asking it again."""

log = logging.getLogger(__name__)


def sign_provider_token(key_pem: str, key_id: str, team_id: str, issued_at: datetime) -> str:
    """The APNs provider token: an ES256 JWT with header ``kid`` and claims ``iss``, ``iat``."""
    iat = int(issued_at.replace(tzinfo=timezone.utc).timestamp())
    return jwt.encode({"iss": team_id, "iat": iat}, key_pem, algorithm="ES256", headers={"kid": key_id})


class TokenStore(Protocol):
    """Where the provider token is shared between replicas: what the provider asks of
    :class:`shared.apns_tokens.ApnsTokenStore`, which the function gives it (a provider never
    imports storage). Its methods block: they are called in a thread."""

    clock: Clock

    def is_fresh(self, issued_at: datetime, now: datetime | None = None) -> bool: ...

    def get(self, team_id: str, key_id: str, sign: Callable[[datetime], str]) -> IssuedToken: ...

    def forget(self, team_id: str, key_id: str, issued_at: datetime) -> None: ...


class _ProviderToken(Protocol):
    header: bytes
    """The ``authorization`` value, valid once :meth:`ensure_fresh` returned."""

    async def ensure_fresh(self) -> None: ...


class _LocalToken:
    """A provider token signed in this process, again every :data:`_LOCAL_TOKEN_AGE`."""

    def __init__(self, key: str, key_id: str, team_id: str) -> None:
        self._sign = partial(sign_provider_token, key, key_id, team_id)
        self._issued_at: datetime | None = None
        self.header = b""

    async def ensure_fresh(self) -> None:
        now = datetime.now(timezone.utc).replace(tzinfo=None, microsecond=0)
        if self._issued_at is None or now - self._issued_at >= _LOCAL_TOKEN_AGE:
            self._issued_at = now
            self.header = f"bearer {self._sign(now)}".encode()


class _SharedToken:
    """The provider token of every connection of one provider, from the token store (module
    docstring, "Provider token"). :attr:`header` is valid once :meth:`ensure_fresh` returned."""

    def __init__(self, store: TokenStore, key: str, key_id: str, team_id: str) -> None:
        self._store = store
        self._team_id = team_id
        self._key_id = key_id
        self._sign = partial(sign_provider_token, key, key_id, team_id)
        self._token: IssuedToken | None = None
        self.header = b""
        self._store_retry_at: datetime | None = None
        self._refreshing: asyncio.Task[None] | None = None

    async def ensure_fresh(self) -> None:
        """Make :attr:`header` a usable token: in memory when the one held is younger than the
        refresh age, else from the store; concurrent sends share one refresh."""
        now = self._store.clock()
        token = self._token
        if token is not None:
            if self._store.is_fresh(token.issued_at, now):
                return
            retry_at = self._store_retry_at
            if retry_at is not None and now < retry_at and now - token.issued_at < _LAST_RESORT_AGE:
                return
        task = self._refreshing
        loop = asyncio.get_running_loop()
        if task is None or task.done() or task.get_loop() is not loop:
            task = self._refreshing = loop.create_task(self._refresh())
        await asyncio.shield(task)

    async def refused(self, header: bytes) -> None:
        """Apple refused the token sent as ``header``: drop it from the store, if it is still
        the shared one, so the next send signs a new one with this process's key. Without this,
        a key fixed under the same key id would go on presenting the refused token, shared
        through the database, until it reached the refresh age."""
        token = self._token
        if token is None or header != self.header:
            return
        self._token = None
        try:
            await asyncio.to_thread(self._store.forget, self._team_id, self._key_id, token.issued_at)
        except Exception as exc:  # noqa: BLE001 - the next refresh finds out for itself
            log.warning("APNs provider token: could not drop a refused token (%s)", type(exc).__name__)

    async def _refresh(self) -> None:
        try:
            token = await asyncio.to_thread(
                self._store.get, self._team_id, self._key_id, self._sign
            )
            self._store_retry_at = None
        except Exception as exc:  # noqa: BLE001 - any failure: fall back rather than fail sends
            # The class only: a database error's text can hold the statement's parameters.
            log.warning(
                "APNs provider token: the shared token store failed (%s)", type(exc).__name__
            )
            now = self._store.clock()
            self._store_retry_at = now + _STORE_RETRY
            if self._token is not None and now - self._token.issued_at < _LAST_RESORT_AGE:
                return
            issued_at = now.replace(microsecond=0)
            token = IssuedToken(self._sign(issued_at), issued_at)
        self._token = token
        self.header = f"bearer {token.token}".encode()


def _endpoint(setting: str, url: str) -> Origin:
    """The origin of ``url`` (``https://host[:port]``); ``setting`` names the variable in
    errors."""
    parts = urlsplit(url)
    try:
        port = parts.port or 443
    except ValueError:
        port = 0
    if parts.scheme != "https" or not parts.hostname or not port or parts.path not in ("", "/"):
        raise ConfigError(f"{setting} must look like https://host[:port], not {url!r}")
    return Origin("https", parts.hostname, port)


def _check_key(pem: str) -> None:
    """Fail at start-up, not at the first send, when the key is not Apple's kind of key."""
    try:
        key = serialization.load_pem_private_key(pem.encode(), password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise ConfigError(
            "PUSH_APNS_KEY is not an unencrypted PEM private key: give the .p8 file's text or path"
        ) from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP256R1):
        raise ConfigError("PUSH_APNS_KEY must be an EC P-256 key (an APNs .p8 signing key)")


def _classify(status: int, body: bytes, retry_after: bytes | None) -> SendResult:
    """Apple's answer as a result: 200 delivered; 410 or a dead-token reason DEAD; 429, 5xx and
    an expired provider token (we sign a new one) TRANSIENT; 403 otherwise CREDENTIALS (Apple
    refused our provider token or certificate: ``InvalidProviderToken``,
    ``MissingProviderToken``, ``BadCertificate``, ``BadCertificateEnvironment``, ``Forbidden``,
    ``UnrelatedKeyIdInToken``, ``BadEnvironmentKeyInToken``: any message would be refused);
    other 4xx REJECTED."""
    if status == 200:
        return SendResult(Outcome.DELIVERED)
    reason = _reason(body) or f"http_{status}"
    if status == 410 or reason in _DEAD_REASONS:
        return SendResult(Outcome.DEAD, reason)
    if status == 403 and reason != "ExpiredProviderToken":
        return SendResult(Outcome.CREDENTIALS, reason)
    if 400 <= status < 500 and status != 429 and reason != "ExpiredProviderToken":
        return SendResult(Outcome.REJECTED, reason)
    delay = None if retry_after is None else retry_after_seconds(retry_after.decode("latin-1"))
    # 429 is Apple's "slow down" (TooManyRequests, TooManyProviderTokenUpdates).
    return SendResult(Outcome.TRANSIENT, reason, delay, rate_limited=status == 429)


def _reason(body: bytes) -> str | None:
    """Apple's ``reason`` from an error body, when it is one of Apple's words: never other
    text, which is not known to be free of device tokens."""
    try:
        reason = json.loads(body).get("reason")
    except (ValueError, AttributeError):
        return None
    return reason if isinstance(reason, str) and _REASON.fullmatch(reason) else None


class ApnsProvider:
    """Sends wake-ups through APNs. Create one per process; :meth:`aclose` at shutdown."""

    name = "apns"
    #: Echo names APNs devices by hex token in either case; unknown ones get the default environment.
    echo = EchoTokens(lower_case=True, environment=True)

    def __init__(
        self,
        key: str,
        key_id: str,
        team_id: str,
        *,
        production_url: str = DEFAULT_PRODUCTION_URL,
        sandbox_url: str = DEFAULT_SANDBOX_URL,
        ca_file: str | None = None,
        timeout_seconds: float = DEFAULT_TIMEOUT_SECONDS,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        token_store: TokenStore | None = None,
    ) -> None:
        """``key`` is the ``.p8`` PEM text; ``ca_file`` an extra CA bundle (PEM) to trust;
        ``token_store`` shares the provider token with other replicas (``None``: this process
        signs its own)."""
        _check_key(key)
        if not key_id:
            raise ConfigError("PUSH_APNS_KEY_ID is empty")
        if not team_id:
            raise ConfigError("PUSH_APNS_TEAM_ID is empty")
        self._shared_token = (
            None if token_store is None else _SharedToken(token_store, key, key_id, team_id)
        )
        self._token: _ProviderToken = self._shared_token or _LocalToken(key, key_id, team_id)
        self._endpoints = {
            "production": _endpoint("PUSH_APNS_PRODUCTION_URL", production_url),
            "sandbox": _endpoint("PUSH_APNS_SANDBOX_URL", sandbox_url),
        }
        try:
            self._proxies = {name: proxy_for("https", origin.host, origin.port)
                             for name, origin in self._endpoints.items()}
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        self._tls = ClientTls(ca_file, "PUSH_APNS_CA_FILE")
        self._timeout = timeout_seconds
        self._max_connections = max_connections
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pools: dict[str, Http2Pool] = {}
        self._bodies: dict[str, bytes] = {}

    @classmethod
    def from_env(cls, token_store: TokenStore | None = None) -> ApnsProvider:
        """The provider configured by the ``PUSH_APNS_*`` settings."""
        return cls(
            require_secret("PUSH_APNS_KEY", "the APNs provider signs its requests with this key"),
            require_env("PUSH_APNS_KEY_ID", "the APNs provider needs the signing key's id"),
            require_env("PUSH_APNS_TEAM_ID", "the APNs provider needs the Apple team id"),
            production_url=read_setting("PUSH_APNS_PRODUCTION_URL"),
            sandbox_url=read_setting("PUSH_APNS_SANDBOX_URL"),
            ca_file=read_setting("PUSH_APNS_CA_FILE"),
            timeout_seconds=read_setting("PUSH_APNS_TIMEOUT_SECONDS"),
            max_connections=read_setting("PUSH_APNS_MAX_CONNECTIONS"),
            token_store=token_store,
        )

    async def send(self, device: Device, wakeup: WakeUp) -> SendResult:
        if wakeup.dry_run:  # APNs has no validate-only mode, and a dry run has no effects
            return SendResult(Outcome.DELIVERED, "dry_run")
        if not device.topic:
            return SendResult(Outcome.REJECTED, "MissingTopic")
        if not _HEX.fullmatch(device.token):
            return SendResult(Outcome.DEAD, "BadDeviceToken")
        pool = self._pool("sandbox" if device.environment == "sandbox" else "production")
        await self._token.ensure_fresh()
        message_type = wakeup.message_type
        headers: list[Header] = [
            (b":method", b"POST"),
            (b":scheme", b"https"),
            (b":authority", pool.origin.authority),
            (b":path", b"/3/device/" + device.token.encode()),
            (b"authorization", self._token.header),
            (b"apns-topic", device.topic.encode()),
            (b"apns-push-type", b"alert"),
            (b"apns-priority", b"10"),
            (b"apns-expiration", b"%d" % (int(time.time()) + wakeup.ttl_seconds)),
            (b"apns-collapse-id", message_type.encode()),
        ]
        presented = self._token.header
        try:
            response = await pool.request(headers, self._body(message_type))
        except TimeoutError:  # before OSError: it is one
            return SendResult(Outcome.TRANSIENT, "timeout")
        except (OSError, H2Error) as exc:
            log.warning("APNs unreachable: %s: %s", type(exc).__name__, exc)
            return SendResult(Outcome.TRANSIENT, "connection_error")
        result = _classify(response.status, response.body, response.header(b"retry-after"))
        if result.reason == "InvalidProviderToken" and self._shared_token is not None:
            await self._shared_token.refused(presented)
        return result

    async def aclose(self) -> None:
        """Drop every connection and wait until they are closed."""
        pools, self._pools = self._pools, {}
        if self._loop is asyncio.get_running_loop():
            await asyncio.gather(*(pool.aclose() for pool in pools.values()))

    def _pool(self, environment: str) -> Http2Pool:
        loop = asyncio.get_running_loop()
        if loop is not self._loop:
            # Pools of an earlier loop cannot be used, nor closed, from this one.
            self._loop = loop
            self._pools = {}
        pool = self._pools.get(environment)
        if pool is None:
            pool = self._pools[environment] = Http2Pool(
                self._endpoints[environment], self._tls.context("h2"), timeout=self._timeout,
                max_connections=self._max_connections, proxy=self._proxies[environment],
                encoder_per_request=_PER_REQUEST_HEADERS)
        return pool

    def _body(self, message_type: str) -> bytes:
        """The notification for ``message_type`` (made once per type): an alert the app's
        notification service extension replaces with the content it fetches."""
        body = self._bodies.get(message_type)
        if body is None:
            message: dict[str, Any] = {
                "aps": {"alert": message_type, "mutable-content": 1, "thread-id": message_type},
                "data": {"type": message_type},
            }
            body = json.dumps(message, separators=(",", ":")).encode()
            if len(self._bodies) < 64:
                self._bodies[message_type] = body
        return body
