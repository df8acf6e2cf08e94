"""The APNs provider: wake-ups to Apple devices over HTTP/2 with token (``.p8`` key) auth.

Built on aioapns, which owns the HTTP/2 connections and, without a token store, signs the
provider token (an ES256 JWT, re-signed by aioapns every 30 minutes per connection, inside Apple's
20-60 minute window). The module works around aioapns where it does not fit a long-running,
never-raising provider:

Provider token
    With a token store (:class:`shared.apns_tokens.ApnsTokenStore`, given by the dispatcher),
    every connection of every replica presents the one token shared through the database, so
    cold-starting replicas do not each mint one (``TooManyProviderTokenUpdates``). aioapns asks
    for the ``authorization`` header synchronously per request, from the
    ``auth_provider`` its pool gives each new connection; :class:`_SharedToken` answers it from
    memory, and :meth:`ApnsProvider.send` first awaits its cheap freshness check, which goes to
    the store (in a thread) only once the token reaches the refresh age. The pool's own
    per-connection signer is swapped for it in :class:`_EndpointProtocol` (the per-endpoint
    subclass carries it as ``shared_token``); aioapns's signer is then created but never asked.
    If the store fails, the token in memory is used until it is :data:`_LAST_RESORT_AGE` old,
    and then one signed locally, so sends never wait on a broken database for long.

Endpoints
    aioapns hard-codes the host and port in the ``APNS_SERVER``/``APNS_PORT`` class attributes
    of its connection protocol classes. :func:`_endpoint_protocol` makes a subclass of
    :class:`_EndpointProtocol` per configured endpoint and the pool is pointed at it
    (``pool.protocol_class``), so tests, proxies and the fake server can stand in for Apple.
    Sandbox devices (``Device.environment == "sandbox"``) go to the sandbox endpoint, all others
    to production; there is one aioapns client (pool) per environment.

Event loop
    aioapns binds the running loop when a client is constructed, so clients are built lazily in
    :meth:`ApnsProvider.send`, and built again if the provider finds itself in a different loop
    (a runtime that calls ``asyncio.run`` per invocation): a pool bound to a closed loop would
    fail every send forever.

Topic
    aioapns insists on a topic at construction for key auth; every request carries the
    device's own (``NotificationRequest(apns_topic=...)``), so the constructor gets a placeholder
    that is never sent.

Time bounds
    aioapns sleeps one second after each failed connection attempt, and would await an answer
    that never comes forever; so attempts are kept at two (an immediate retry when a pooled
    connection turns out to be closed; an unreachable server is reported after about two
    seconds) and every send is bounded by ``timeout_seconds``.
    A send cut short by the timeout leaves state in aioapns's protocol: the cancelled future
    stays registered and a late answer would then raise inside ``data_received``, which kills the
    connection and every send in flight on it. :class:`_EndpointProtocol` forgets cancelled
    requests, and also drops aioapns's per-stream bookkeeping when a stream ends (aioapns never
    removes it for successful sends, so it grows with every notification on a connection), which
    also lets an error status without a JSON body (a proxy's 502, say) be answered at once
    rather than by the timeout.

GOAWAY
    Apple sends a GOAWAY before it closes a connection (a server shutting down, say). h2 would
    close the connection at once and aioapns then closes it, failing every request in flight,
    and aioapns's pool sends them again on another connection: a second wake-up for each one
    Apple had processed. Instead (RFC 9113 section 6.8), :class:`_EndpointProtocol` keeps the
    connection open with :class:`shared.providers.http2.DrainingStateMachine`, takes it out of
    the pool at once, fails only the requests on streams after the GOAWAY's last stream ID
    (Apple did not process them: aioapns's retry on another connection is right for those),
    lets the others get their answers, and closes the connection when the last is answered.

Logs
    No device token reaches a log line: aioapns logs a failed notification's status and reason
    with its id (a UUID) unless given an ``err_func``, and we pass one that does nothing, since
    classifying failures is this module's job. aioapns's other log lines name notification ids,
    connections and connection errors, never request paths. The paths (which hold the token) only
    pass through hpack, whose debug log prints every header: aioapns sets the ``hpack`` logger to
    CRITICAL on import, and so does this module, so the guarantee does not rest on aioapns
    alone. A logging configuration must not lower it.

Answers
    aioapns resolves a request on the 200 HEADERS frame, or on the error's JSON body; it does
    not expose response headers, so ``retry_after`` is always ``None`` (Apple documents no
    Retry-After header anyway). Every outcome, including timeouts and connection failures, is
    classified into a :class:`SendResult`; :meth:`ApnsProvider.send` never raises for them.
"""
from __future__ import annotations

import asyncio
import json
import logging
import re
import ssl
from datetime import datetime, timedelta
from functools import partial
from typing import Any, ClassVar
from urllib.parse import urlsplit

from aioapns import APNs, NotificationRequest, PushType
from aioapns.common import NotificationResult
from aioapns.connection import APNsTLSClientProtocol, AuthorizationHeaderProvider
from aioapns.exceptions import ConnectionClosed, MaxAttemptsExceeded
from aioapns.exceptions import ConnectionError as ApnsConnectionError
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from h2.connection import H2Connection
from h2.events import ConnectionTerminated
from h2.exceptions import H2Error

from shared.apns_tokens import ApnsTokenStore, IssuedToken, sign_provider_token
from shared.config import (
    ConfigError,
    env,
    env_float,
    env_int,
    require_env,
    require_secret,
)
from shared.providers.base import Device, Outcome, SendResult, WakeUp
from shared.providers.http2 import (
    UNCHECKED_CLIENT_CONFIG,
    DrainingStateMachine,
    LiteralEncoder,
)

DEFAULT_PRODUCTION_URL = "https://api.push.apple.com"
DEFAULT_SANDBOX_URL = "https://api.sandbox.push.apple.com"
DEFAULT_TIMEOUT_SECONDS = 10.0
DEFAULT_MAX_CONNECTIONS = 4

_CONNECTION_ATTEMPTS = 2
_PRIORITY_IMMEDIATE = 10
_PLACEHOLDER_TOPIC = "per-request.topic.unused"
_HEX = re.compile(r"[0-9a-fA-F]+")
_GOAWAY_REASON = re.compile(r"[A-Za-z]{1,64}")
"""What a GOAWAY's reason may look like to be logged: Apple's are words like ``Shutdown``."""
_DEAD_REASONS = frozenset(
    {"Unregistered", "ExpiredToken", "BadDeviceToken", "DeviceTokenNotForTopic"}
)
"""Reasons meaning the token will never work for this topic and environment (any 410 too)."""

_LAST_RESORT_AGE = timedelta(minutes=55)
"""With the token store failing, the shared token is used until this old, then one signed here."""
_STORE_RETRY = timedelta(seconds=30)
"""After the token store failed, how long sends go on without asking it again."""

log = logging.getLogger(__name__)
logging.getLogger("hpack").setLevel(logging.CRITICAL)


class _SharedToken(AuthorizationHeaderProvider):
    """The ``authorization`` header of every connection of one provider, from the token store
    (module docstring, "Provider token"). :meth:`get_header` is what aioapns calls per request;
    :meth:`ensure_fresh` must have been awaited before."""

    def __init__(self, store: ApnsTokenStore, key: str, key_id: str, team_id: str) -> None:
        self._store = store
        self._team_id = team_id
        self._key_id = key_id
        self._sign = partial(sign_provider_token, key, key_id, team_id)
        self._token: IssuedToken | None = None
        self._header = ""
        self._store_retry_at: datetime | None = None
        self._refreshing: asyncio.Task[None] | None = None

    def get_header(self) -> str:
        return self._header

    async def ensure_fresh(self) -> None:
        """Make :meth:`get_header` give a usable token: in memory when the one held is younger
        than the refresh age, else from the store; concurrent sends share one refresh."""
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
        self._header = f"bearer {token.token}"


_PER_REQUEST_HEADERS = frozenset({b":path", b"apns-id", b"apns-expiration"})
"""Request headers whose values change with each request (the device token is in the path):
encoded each time, never cached."""


class _EndpointProtocol(APNsTLSClientProtocol):
    """aioapns's connection protocol with the endpoint as class attributes (set per endpoint by
    :func:`_endpoint_protocol`) and with its per-request bookkeeping kept tidy (module
    docstring, "Time bounds"), and with the provider's shared token, if any, in place of the
    signer the pool passes (module docstring, "Provider token")."""

    shared_token: _SharedToken | None = None
    draining_connections: ClassVar[set[_EndpointProtocol]]
    """This endpoint's connections out of the pool after a GOAWAY and not yet lost, for
    :meth:`ApnsProvider.aclose`, which finds the others in the pools (set per endpoint)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._flush_scheduled = False
        super().__init__(*args, **kwargs)
        # h2's header validation and normalisation check what aioapns builds (lower-case names,
        # the device token and topic validated when the device subscribed) and what Apple
        # answers, through a chain of generators per header that cost a third of a send.
        # HPACK as cached plain literals (shared.providers.http2.LiteralEncoder): h2 Huffman-codes
        # every literal in pure Python, the provider token's few hundred bytes included, which was
        # the largest single cost of a send. The provider token is never-indexed, as h2 does.
        self.conn = H2Connection(UNCHECKED_CLIENT_CONFIG)
        self.conn.state_machine = DrainingStateMachine()
        self.conn.encoder = LiteralEncoder(per_request=_PER_REQUEST_HEADERS)
        self.draining = False
        """A GOAWAY came: no new request, close once the last one in flight is answered."""
        if self.shared_token is not None:
            self.auth_provider = self.shared_token
        self.lost: asyncio.Future[None] = self.loop.create_future()
        """Done once the connection is closed, for :meth:`ApnsProvider.aclose` to wait on."""

    def flush(self) -> None:
        """Write what h2 has queued once per turn of the event loop, not once per request:
        aioapns flushes after every request and every frame it receives, and each flush is a
        TLS record, a write system call and a new inactivity timer. Requests started in the
        same turn (an event's sends) leave in one write."""
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self.loop.call_soon(self._flush_now)

    def _flush_now(self) -> None:
        self._flush_scheduled = False
        if self.transport is not None and not self.transport.is_closing():
            super().flush()

    def connection_lost(self, exc: Exception | None) -> None:
        try:
            super().connection_lost(exc)
        finally:  # even if aioapns trips over its own bookkeeping, aclose must not wait forever
            self.draining_connections.discard(self)
            if not self.lost.done():
                self.lost.set_result(None)

    @property
    def is_busy(self) -> bool:
        """What aioapns's pool asks before routing a request here: also busy once draining."""
        return self.draining or self.free_channels.is_busy

    async def send_notification(self, request: NotificationRequest) -> NotificationResult:
        if self.draining:
            # The pool hands a new connection to the request it was made for without asking
            # ``is_busy``: a GOAWAY read with the TLS handshake reaches here.
            raise ConnectionClosed("the server sent GOAWAY")
        try:
            return await super().send_notification(request)
        except asyncio.CancelledError:
            self.requests.pop(request.notification_id, None)
            self._close_if_drained()
            raise

    def on_stream_ended(self, stream_id: int) -> None:
        notification_id = self.request_streams.pop(stream_id, None)
        if notification_id is not None:
            status = self.request_statuses.pop(notification_id, None)
            pending = self.requests.get(notification_id)
            if status is not None and pending is not None:
                del self.requests[notification_id]
                pending.set_result(NotificationResult(notification_id, status))
        super().on_stream_ended(stream_id)
        self._close_if_drained()

    def on_connection_terminated(self, event: ConnectionTerminated) -> None:
        """A GOAWAY (module docstring, "GOAWAY"); aioapns's own closes the connection at once.
        A server may send more than one, lowering the last stream ID: each is applied."""
        last_stream_id: int = event.last_stream_id or 0  # type: ignore[attr-defined]
        reason = _goaway_reason(event.additional_data)  # type: ignore[attr-defined]
        log.warning(
            "APNs connection %s going away: code=%s, reason=%s, last_stream_id=%s",
            id(self), event.error_code, reason, last_stream_id,  # type: ignore[attr-defined]
        )
        self.draining = True
        self.draining_connections.add(self)
        self._leave_pool()
        closed = ConnectionClosed("the server sent GOAWAY before processing the request")
        for stream_id in [s for s in self.request_streams if s > last_stream_id]:
            notification_id = self.request_streams.pop(stream_id)
            self.request_statuses.pop(notification_id, None)
            pending = self.requests.pop(notification_id, None)
            if pending is not None and not pending.done():
                pending.set_exception(closed)
        self._close_if_drained()

    def _leave_pool(self) -> None:
        """Out of aioapns's pool at once, so it makes a new connection for the next request.
        The pool's ``on_connection_lost`` is its ``discard_connection``, which raises if the
        connection was already removed: it is called here instead of when the connection is
        lost, unless the pool has not added the connection yet (a GOAWAY read with the TLS
        handshake): then it leaves when lost, and ``is_busy`` keeps requests away meanwhile."""
        leave, self.on_connection_lost = self.on_connection_lost, None
        if leave is None:
            return
        try:
            leave(self)
        except ValueError:
            self.on_connection_lost = leave

    def _close_if_drained(self) -> None:
        if self.draining and not self.requests:
            self.close()


def _goaway_reason(debug_data: bytes | None) -> str:
    """Apple's reason from a GOAWAY's debug data (``{"reason": "Shutdown"}``), or ``unknown``:
    never the raw data, which is not known to be free of device tokens."""
    try:
        reason = json.loads(debug_data or b"").get("reason")
    except (ValueError, AttributeError):
        return "unknown"
    return reason if isinstance(reason, str) and _GOAWAY_REASON.fullmatch(reason) else "unknown"


def _endpoint_protocol(
    setting: str, url: str, shared_token: _SharedToken | None = None
) -> type[_EndpointProtocol]:
    """The protocol class connecting to ``url`` (``https://host[:port]``), presenting
    ``shared_token`` if given; ``setting`` names the variable in errors."""
    parts = urlsplit(url)
    try:
        port = parts.port or 443
    except ValueError:
        port = 0
    if parts.scheme != "https" or not parts.hostname or not port or parts.path not in ("", "/"):
        raise ConfigError(f"{setting} must look like https://host[:port], not {url!r}")
    attributes = {
        "APNS_SERVER": parts.hostname,
        "APNS_PORT": port,
        "shared_token": shared_token,
        "draining_connections": set(),
    }
    return type(f"_EndpointProtocol_{parts.hostname}_{port}", (_EndpointProtocol,), attributes)


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


def _ssl_context(ca_file: str | None) -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.set_alpn_protocols(["h2"])
    if ca_file is not None:
        try:
            context.load_verify_locations(cafile=ca_file)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"PUSH_APNS_CA_FILE: cannot load {ca_file}: {exc}") from None
    return context


async def _ignore_error(request: NotificationRequest, result: NotificationResult) -> None:
    """aioapns's ``err_func``: replaces its error log line; failures are classified instead."""


def _classify(result: NotificationResult) -> SendResult:
    if result.is_successful:
        return SendResult(Outcome.DELIVERED)
    status = int(result.status) if result.status.isdigit() else 0
    reason = result.description or f"http_{result.status}"
    if status == 410 or reason in _DEAD_REASONS:
        return SendResult(Outcome.DEAD, reason)
    # Not 429s, nor an expired provider token: aioapns signs a new one at least every 30 min.
    if 400 <= status < 500 and status != 429 and reason != "ExpiredProviderToken":
        return SendResult(Outcome.REJECTED, reason)
    return SendResult(Outcome.TRANSIENT, reason)


class ApnsProvider:
    """Sends wake-ups through APNs. Create one per process; :meth:`aclose` at shutdown."""

    name = "apns"

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
        token_store: ApnsTokenStore | None = None,
    ) -> None:
        """``key`` is the ``.p8`` PEM text; ``ca_file`` an extra CA bundle (PEM) to trust;
        ``token_store`` shares the provider token with other replicas (``None``: each
        connection signs its own)."""
        _check_key(key)
        if not key_id:
            raise ConfigError("PUSH_APNS_KEY_ID is empty")
        if not team_id:
            raise ConfigError("PUSH_APNS_TEAM_ID is empty")
        self._key = key
        self._key_id = key_id
        self._team_id = team_id
        self._shared_token = (
            None if token_store is None else _SharedToken(token_store, key, key_id, team_id)
        )
        self._protocols = {
            "production": _endpoint_protocol(
                "PUSH_APNS_PRODUCTION_URL", production_url, self._shared_token
            ),
            "sandbox": _endpoint_protocol("PUSH_APNS_SANDBOX_URL", sandbox_url, self._shared_token),
        }
        self._ssl_context = _ssl_context(ca_file)
        self._timeout = timeout_seconds
        self._max_connections = max_connections
        self._loop: asyncio.AbstractEventLoop | None = None
        self._clients: dict[str, APNs] = {}

    @classmethod
    def from_env(cls, token_store: ApnsTokenStore | None = None) -> ApnsProvider:
        """The provider configured by the ``PUSH_APNS_*`` settings."""
        return cls(
            require_secret("PUSH_APNS_KEY", "the APNs provider signs its requests with this key"),
            require_env("PUSH_APNS_KEY_ID", "the APNs provider needs the signing key's id"),
            require_env("PUSH_APNS_TEAM_ID", "the APNs provider needs the Apple team id"),
            production_url=env("PUSH_APNS_PRODUCTION_URL") or DEFAULT_PRODUCTION_URL,
            sandbox_url=env("PUSH_APNS_SANDBOX_URL") or DEFAULT_SANDBOX_URL,
            ca_file=env("PUSH_APNS_CA_FILE"),
            timeout_seconds=env_float("PUSH_APNS_TIMEOUT_SECONDS", DEFAULT_TIMEOUT_SECONDS, 0.001),
            max_connections=env_int("PUSH_APNS_MAX_CONNECTIONS", DEFAULT_MAX_CONNECTIONS, 1),
            token_store=token_store,
        )

    async def send(self, device: Device, wakeup: WakeUp) -> SendResult:
        if wakeup.dry_run:  # APNs has no validate-only mode, and a dry run has no effects
            return SendResult(Outcome.DELIVERED, "dry_run")
        if not device.topic:
            return SendResult(Outcome.REJECTED, "MissingTopic")
        if not _HEX.fullmatch(device.token):
            return SendResult(Outcome.DEAD, "BadDeviceToken")
        message: dict[str, Any] = {
            "aps": {
                "alert": wakeup.message_type,
                "mutable-content": 1,
                "thread-id": wakeup.message_type,
            },
            "data": {"type": wakeup.message_type},
        }
        request = NotificationRequest(
            device_token=device.token,
            message=message,
            time_to_live=wakeup.ttl_seconds,
            priority=_PRIORITY_IMMEDIATE,
            collapse_key=wakeup.message_type,
            push_type=PushType.ALERT,
            apns_topic=device.topic,
        )
        client = self._client("sandbox" if device.environment == "sandbox" else "production")
        if self._shared_token is not None:
            await self._shared_token.ensure_fresh()
        try:
            async with asyncio.timeout(self._timeout):
                result = await client.send_notification(request)
        except TimeoutError:
            return SendResult(Outcome.TRANSIENT, "timeout")
        except (MaxAttemptsExceeded, ConnectionClosed, ApnsConnectionError, OSError, H2Error):
            return SendResult(Outcome.TRANSIENT, "connection_error")
        return _classify(result)

    async def aclose(self) -> None:
        """Drop every connection and wait until they are closed. They are aborted, not closed
        with a TLS close_notify: that could wait on a peer that is gone, and nothing is lost."""
        clients, self._clients = self._clients, {}
        connections: list[_EndpointProtocol] = []
        for client in clients.values():
            connections.extend(client.pool.connections)  # type: ignore[arg-type]
        for protocol in self._protocols.values():
            connections.extend(protocol.draining_connections)
        for connection in connections:
            assert connection.transport is not None
            connection.transport.abort()
        await asyncio.gather(*(connection.lost for connection in connections))

    def _client(self, environment: str) -> APNs:
        loop = asyncio.get_running_loop()
        if loop is not self._loop:
            # Pools of an earlier loop cannot be used, nor closed, from this one.
            self._loop = loop
            self._clients = {}
        client = self._clients.get(environment)
        if client is None:
            client = APNs(
                key=self._key,
                key_id=self._key_id,
                team_id=self._team_id,
                topic=_PLACEHOLDER_TOPIC,
                max_connections=self._max_connections,
                max_connection_attempts=_CONNECTION_ATTEMPTS,
                ssl_context=self._ssl_context,
                err_func=_ignore_error,
            )
            client.pool.protocol_class = self._protocols[environment]
            self._clients[environment] = client
        return client
