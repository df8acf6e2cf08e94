"""FCM provider: the FCM HTTP v1 API spoken directly, over HTTP/2, with service-account OAuth.

We do not use firebase-admin: it hard-codes ``https://fcm.googleapis.com`` in private attributes
and wraps every send in its own retry policy, so it can neither be pointed at a test or benchmark
endpoint nor leave retrying to the dispatcher. One ``messages:send`` POST is simple enough to
make over the project's HTTP/2 client (:mod:`shared.transport.http2`: httpx cost about eight
times the CPU per send), and google-auth's service-account credentials give the OAuth access
token.

What is reused across sends (and invocations, in a warm process): one HTTP/2 connection pool per
event loop (``HTTPS_PROXY``/``NO_PROXY`` apply, as they did with httpx), the request headers, and
the access token, refreshed a few minutes before it expires (google-auth's margin) by one
coroutine while the others wait. google-auth fetches tokens with requests, imported at the first
refresh rather than with the module: a cold start's import time counts, its first token does not
wait any longer for it. Every answer, and every network failure, is classified into
a :class:`~shared.core.SendResult` following FCM's documented error codes (see
:func:`classify`). A registration token identifies a device, so it never appears in a log line or
in a result's ``reason``.
"""
from __future__ import annotations

import asyncio
import functools
import json
import logging
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from google.auth import exceptions as auth_exceptions
from google.auth.credentials import TokenState
from google.oauth2 import service_account
from h2.exceptions import H2Error

from shared.config import ConfigError, require_secret
from shared.core import Device, Outcome, SendResult, WakeUp
from shared.providers.base import EchoTokens, retry_after_seconds
from shared.settings import default, read_setting
from shared.transport.connect import Origin
from shared.transport.http2 import Header, Http2Pool, Response
from shared.transport.proxy import proxy_for
from shared.transport.tls import ClientTls

log = logging.getLogger(__name__)

DEFAULT_ENDPOINT = default("PUSH_FCM_ENDPOINT")
SCOPE = "https://www.googleapis.com/auth/firebase.messaging"
MAX_TTL_SECONDS = 2_419_200
"""FCM refuses an ``android.ttl`` over four weeks: longer TTLs are capped to it."""

FCM_ERROR_TYPE = "type.googleapis.com/google.firebase.fcm.v1.FcmError"
BAD_REQUEST_TYPE = "type.googleapis.com/google.rpc.BadRequest"

GRANT_REFUSED_MEMO_SECONDS = 30.0
"""After Google refused our grant, sends for this long get the same answer without asking
again: every send of an event would otherwise ask the token endpoint in turn."""

_CREDENTIALS_VAR = "PUSH_FCM_CREDENTIALS"
_PROJECT_VAR = "PUSH_FCM_PROJECT_ID"
_ENDPOINT_VAR = "PUSH_FCM_ENDPOINT"
_CA_VAR = "PUSH_FCM_CA_FILE"


@dataclass(frozen=True)
class FcmError:
    """What an FCM error body says, reduced to what classification needs."""

    status: str | None
    """The ``google.rpc.Status`` word (``NOT_FOUND``, ``INVALID_ARGUMENT``...)."""
    error_code: str | None
    """The ``errorCode`` of the ``FcmError`` detail (``UNREGISTERED``...), when present."""
    names_token: bool
    """The error is about the registration token (see :func:`classify`)."""

    @classmethod
    def parse(cls, body: bytes) -> FcmError:
        """Read a ``{"error": {...}}`` body; anything else (an HTML 502 page) gives all-empty."""
        try:
            error = json.loads(body)["error"]
            details = [d for d in error.get("details") or () if isinstance(d, dict)]
            message = str(error.get("message", ""))
            status = error.get("status")
        except (ValueError, KeyError, TypeError, AttributeError):
            return cls(None, None, False)
        error_code = next(
            (d.get("errorCode") for d in details if d.get("@type") == FCM_ERROR_TYPE), None)
        token_violation = any(
            isinstance(v, dict) and v.get("field") == "message.token"
            for d in details if d.get("@type") == BAD_REQUEST_TYPE
            for v in d.get("fieldViolations") or ())
        token_message = error_code == "INVALID_ARGUMENT" and "registration token" in message.lower()
        return cls(status if isinstance(status, str) else None,
                   error_code if isinstance(error_code, str) else None,
                   token_violation or token_message)


def classify(status_code: int, body: bytes, retry_after: str | None) -> SendResult:
    """Turn one FCM answer into a result, following the FCM HTTP v1 ``ErrorCode`` reference.

    - 200: DELIVERED (a dry run's validation too).
    - DEAD, only when FCM says the token itself is finished: ``UNREGISTERED`` (404: the app was
      uninstalled or the token expired), ``SENDER_ID_MISMATCH`` (403: the token belongs to
      another project), or a 400 ``INVALID_ARGUMENT`` about the token. FCM uses
      INVALID_ARGUMENT for payload mistakes as well, so the token is only blamed when the body
      says so: a ``google.rpc.BadRequest`` field violation on exactly ``message.token``, or an
      ``FcmError`` ``INVALID_ARGUMENT`` whose message mentions the registration token (FCM's
      documented text: "The registration token is not a valid FCM registration token").
      A 404 or 403 without those error codes (a wrong URL or project) kills no token.
    - TRANSIENT: 429 (``QUOTA_EXCEEDED``) and every 5xx (``INTERNAL``, ``UNAVAILABLE``, a proxy's
      502), with the ``Retry-After`` FCM may send.
    - CREDENTIALS: FCM refused us, not the message: 401 ``UNAUTHENTICATED`` (our access token,
      still refused after one refresh: :meth:`FcmProvider.send`) and 403 ``PERMISSION_DENIED``
      without ``SENDER_ID_MISMATCH`` (the service account lacks
      ``cloudmessaging.messages.create``, or the project id is not its project). Every message
      would be refused the same way until the key or its permissions are fixed.
    - REJECTED: everything else, i.e. 401 ``THIRD_PARTY_AUTH_ERROR`` (the project's APNs
      certificate or Web Push key, uploaded to Firebase: it refuses only the devices FCM hands to
      Apple or a browser, so holding the app's Android sends for it would be wrong), payload
      400s: retrying the same request would fail the same way.

    ``reason`` is the ``errorCode`` when FCM gave one, else the status word, else ``http_<code>``.
    """
    if status_code == 200:
        return SendResult(Outcome.DELIVERED)
    error = FcmError.parse(body)
    reason = error.error_code or error.status or f"http_{status_code}"
    if status_code == 429 or status_code >= 500:
        return SendResult(
            Outcome.TRANSIENT, reason, retry_after_seconds(retry_after), rate_limited=status_code == 429)
    if error.error_code in ("UNREGISTERED", "SENDER_ID_MISMATCH") or (
            status_code == 400 and error.names_token):
        return SendResult(Outcome.DEAD, reason)
    if error.error_code != "THIRD_PARTY_AUTH_ERROR" and (
            status_code == 401 or (status_code == 403 and error.status == "PERMISSION_DENIED")):
        return SendResult(Outcome.CREDENTIALS, reason)
    return SendResult(Outcome.REJECTED, reason)


class FcmProvider:
    """Sends wake-ups through FCM HTTP v1. Create once per process; see the module doc."""

    name = "fcm"
    #: Echo names FCM devices by their registration token, as stored.
    echo = EchoTokens()

    def __init__(
        self,
        *,
        credentials: str,
        project_id: str | None = None,
        endpoint: str = DEFAULT_ENDPOINT,
        ca_file: str | None = None,
        timeout_seconds: float = default("PUSH_FCM_TIMEOUT_SECONDS"),
        max_connections: int = default("PUSH_FCM_MAX_CONNECTIONS"),
    ) -> None:
        """Validate everything now, so a bad setting fails the start-up and not the first push.

        ``credentials`` is the service-account key file's JSON text; ``project_id`` defaults to
        its ``project_id``. ``endpoint`` is the FCM base URL (a fake in tests). ``ca_file`` is a
        PEM bundle trusted for both the send endpoint (on top of the system's CAs, as every
        provider: :mod:`shared.transport.tls`) and the token endpoint named by the JSON's
        ``token_uri`` (instead of requests' CAs: requests takes a single bundle). ``timeout_seconds`` bounds each request to FCM (waiting for a connection
        included) and the token request. ``HTTPS_PROXY`` and ``NO_PROXY`` are read here.
        Errors name the environment variable the value comes from in :meth:`from_env`.
        """
        self._credentials, json_project = _load_credentials(credentials)
        project = project_id or json_project
        if not project:
            raise ConfigError(
                f"{_PROJECT_VAR} is not set and the {_CREDENTIALS_VAR} JSON has no project_id")
        self.project_id = project
        self._origin, path = _origin(endpoint)
        self._path = f"{path}/v1/projects/{project}/messages:send".encode()
        self._tls = ClientTls(ca_file, _CA_VAR) if self._origin.scheme == "https" else None
        try:
            self._proxy = proxy_for(self._origin.scheme, self._origin.host, self._origin.port)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        self._timeout = timeout_seconds
        self._max_connections = max_connections
        self._ca_file = ca_file
        self._token_request: functools.partial[Any] | None = None
        self._grant_refused: tuple[float, auth_exceptions.GoogleAuthError] | None = None
        self._headers: tuple[str | None, list[Header]] = (None, [])
        self._loop_state: _LoopState | None = None

    @classmethod
    def from_env(cls) -> FcmProvider:
        """The provider configured by the ``PUSH_FCM_*`` settings."""
        return cls(
            credentials=require_secret(
                _CREDENTIALS_VAR, "FCM needs a service account key (JSON) to get access tokens"),
            project_id=read_setting(_PROJECT_VAR),
            endpoint=read_setting(_ENDPOINT_VAR),
            ca_file=read_setting(_CA_VAR),
            timeout_seconds=read_setting("PUSH_FCM_TIMEOUT_SECONDS"),
            max_connections=read_setting("PUSH_FCM_MAX_CONNECTIONS"),
        )

    async def send(self, device: Device, wakeup: WakeUp) -> SendResult:
        body = _message(device, wakeup)
        try:
            access_token = await self._access_token()
            response = await self._post(body, access_token)
            if (response.status == 401
                    and FcmError.parse(response.body).error_code != "THIRD_PARTY_AUTH_ERROR"):
                # FCM refused our access token (revoked, or expired early): refresh once.
                log.info("FCM refused the access token; refreshing it and retrying once")
                access_token = await self._access_token(refused=access_token)
                response = await self._post(body, access_token)
        except TimeoutError:  # before OSError: it is one
            return SendResult(Outcome.TRANSIENT, "timeout")
        except (OSError, H2Error) as exc:
            log.warning("FCM unreachable: %s: %s", type(exc).__name__, exc)
            return SendResult(Outcome.TRANSIENT, "connection_error")
        except auth_exceptions.GoogleAuthError as exc:
            return _token_failure(exc)
        retry_after = response.header(b"retry-after")
        result = classify(response.status, response.body,
                          None if retry_after is None else retry_after.decode("latin-1"))
        if result.outcome is Outcome.REJECTED:
            log.warning("FCM rejected a message for device %d: HTTP %d %s",
                        device.id, response.status, result.reason)
        return result

    async def aclose(self) -> None:
        state, self._loop_state = self._loop_state, None
        if state is not None and state.loop is asyncio.get_running_loop():
            await state.pool.aclose()
        if self._token_request is not None:
            self._token_request.func.session.close()

    async def _post(self, body: bytes, access_token: str) -> Response:
        token, headers = self._headers
        if token != access_token:  # built once per access token, not per request
            headers = [
                (b":method", b"POST"),
                (b":scheme", self._origin.scheme.encode()),
                (b":authority", self._origin.authority),
                (b":path", self._path),
                (b"content-type", b"application/json; charset=UTF-8"),
                (b"authorization", f"Bearer {access_token}".encode()),
            ]
            self._headers = (access_token, headers)
        return await self._bound().pool.request(headers, body)

    def _bound(self) -> _LoopState:
        """The connection pool and refresh lock of the running event loop. Connections and
        locks belong to the loop that made them, so a process that runs each invocation in a
        new loop (``asyncio.run``) gets new ones for each; within a loop they are made once."""
        loop = asyncio.get_running_loop()
        if self._loop_state is None or self._loop_state.loop is not loop:
            pool = Http2Pool(self._origin, None if self._tls is None else self._tls.context("h2"),
                             timeout=self._timeout, max_connections=self._max_connections,
                             proxy=self._proxy)
            self._loop_state = _LoopState(loop, pool, asyncio.Lock())
        return self._loop_state

    async def _access_token(self, refused: str | None = None) -> str:
        """A fresh access token: the cached one, or a new one when it is missing, within
        google-auth's refresh margin of its expiry, or the one FCM just ``refused``.
        Concurrent callers wait for a single refresh."""
        credentials = self._credentials
        if credentials.token != refused and credentials.token_state is TokenState.FRESH:
            return credentials.token
        async with self._bound().refresh_lock:
            if credentials.token != refused and credentials.token_state is TokenState.FRESH:
                return credentials.token
            started = time.monotonic()
            if self._grant_refused is not None and started - self._grant_refused[0] < GRANT_REFUSED_MEMO_SECONDS:
                raise self._grant_refused[1]
            try:
                await asyncio.to_thread(credentials.refresh, self._token_transport())
            except auth_exceptions.GoogleAuthError as exc:
                if not (isinstance(exc, auth_exceptions.TransportError) or exc.retryable):
                    self._grant_refused = (time.monotonic(), exc)
                raise
            self._grant_refused = None
            log.debug("FCM access token refreshed in %.3f s", time.monotonic() - started)
            return credentials.token

    def _token_transport(self) -> functools.partial[Any]:
        """google-auth's requests transport, made (and requests imported) at the first refresh.
        The refresh is synchronous: it runs in a worker thread. verify= is given per request
        because a Session's own verify loses to the REQUESTS_CA_BUNDLE / CURL_CA_BUNDLE
        environment variables many images set."""
        if self._token_request is None:
            import requests
            from google.auth.transport.requests import Request as AuthRequest

            self._token_request = functools.partial(
                AuthRequest(requests.Session()), timeout=self._timeout,
                verify=self._ca_file or True)
        return self._token_request


@dataclass(frozen=True)
class _LoopState:
    loop: asyncio.AbstractEventLoop
    pool: Http2Pool
    refresh_lock: asyncio.Lock


def _message(device: Device, wakeup: WakeUp) -> bytes:
    """The ``messages:send`` body: data-only (the app fetches the content itself), collapsible
    per message type, high priority so a dozing Android device wakes for it."""
    ttl = min(max(wakeup.ttl_seconds, 0), MAX_TTL_SECONDS)
    document: dict[str, Any] = {
        "message": {
            "token": device.token,
            "data": {"type": wakeup.message_type},
            "android": {"collapse_key": wakeup.message_type, "priority": "high", "ttl": f"{ttl}s"},
        }
    }
    if wakeup.dry_run:
        document["validate_only"] = True
    return json.dumps(document, separators=(",", ":")).encode()


def _token_failure(exc: auth_exceptions.GoogleAuthError) -> SendResult:
    """No access token. Network trouble, or Google's token endpoint saying "try later", is
    TRANSIENT; a refused grant (``invalid_grant``: a deleted key, a disabled account) is
    CREDENTIALS: it needs a person. Not logged here: the hold gate logs a refusal once a minute
    per app (a refused grant fails every send of an event at once)."""
    if isinstance(exc, auth_exceptions.TransportError) or exc.retryable:
        log.warning("FCM access token unavailable: %s", type(exc).__name__)
        return SendResult(Outcome.TRANSIENT, "oauth_unavailable")
    return SendResult(Outcome.CREDENTIALS, "oauth_refused")


def _load_credentials(text: str) -> tuple[service_account.Credentials, str | None]:
    """The service-account credentials scoped for FCM, and the JSON's ``project_id``."""
    try:
        info = json.loads(text)
    except ValueError:
        raise ConfigError(f"{_CREDENTIALS_VAR} is not JSON (a service account key file)") from None
    if not isinstance(info, dict) or info.get("type") != "service_account":
        raise ConfigError(
            f"{_CREDENTIALS_VAR} is not a service account key file (\"type\": \"service_account\")")
    try:
        credentials = service_account.Credentials.from_service_account_info(info, scopes=[SCOPE])
    except (ValueError, TypeError, KeyError) as exc:
        # google-auth's messages name missing fields or an unreadable key, never key material.
        raise ConfigError(f"{_CREDENTIALS_VAR} is not a usable service account key: {exc}") from None
    project = info.get("project_id")
    return credentials, project if isinstance(project, str) and project else None


def _origin(endpoint: str) -> tuple[Origin, str]:
    """The endpoint URL's origin and path prefix (no trailing slash)."""
    parts = urlsplit(endpoint.rstrip("/"))
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        port = 0
    if parts.scheme not in ("https", "http") or not parts.hostname or not port:
        raise ConfigError(f"{_ENDPOINT_VAR} must be an http(s) URL, not {endpoint!r}")
    return Origin(parts.scheme, parts.hostname, port), parts.path

