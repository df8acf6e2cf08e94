"""A fake FCM HTTP v1 server with its OAuth 2 token endpoint: HTTPS, HTTP/2 and HTTP/1.1.

It exists so the FCM provider can be tested, and benchmarked, over a real connection (HTTP/2 for
sends, google-auth fetching its access token over HTTP/1.1), never a mock. It behaves the way Google documents
and the way FCM is seen to answer:

- ``POST /token`` is Google's OAuth 2 token endpoint for service accounts: it takes the
  ``urn:ietf:params:oauth:grant-type:jwt-bearer`` grant, checks the assertion is an RS256 JWT
  signed by the test service account's key (``kid``, ``iss``, ``aud``, ``scope``, ``exp``) and
  answers ``{"access_token", "expires_in", "token_type"}``. google-auth puts Google's own token URL
  (``https://oauth2.googleapis.com/token``) in ``aud`` whatever ``token_uri`` says, and Google
  accepts it, so the fake accepts that or its own token URL.
- ``POST /v1/projects/{project}/messages:send`` checks the bearer token is one it issued (401
  UNAUTHENTICATED otherwise), the project (403 PERMISSION_DENIED otherwise), and the message shape
  (400 INVALID_ARGUMENT with a ``google.rpc.BadRequest``, like FCM), then answers
  ``{"name": "projects/{project}/messages/<id>"}`` or a scripted error with FCM's real error body
  (a ``google.rpc.Status`` whose ``details`` carry the ``FcmError`` ``errorCode``).

The server is asyncio's, in its own thread with its own event loop (``tests.fakes.LoopThread``
says why). One TLS port serves both protocols, chosen by ALPN: HTTP/2 framed by h2 (with its
header checks off, so a send costs the fake less than it costs the client: the fake must not be
what a benchmark measures), and HTTP/1.1 parsed by h11.

In a test, use the function-scoped ``fcm_server`` fixture (a fresh server per test, so scripts,
records, counters and issued access tokens never leak between tests)::

    fcm_server.script(token, "UNAVAILABLE", "OK")   # 503 first, then 200 (the last answer stays)
    fcm_server.script(token, fcm_error("QUOTA_EXCEEDED", retry_after=30))
    fcm_server.script(token, "HANG")                 # never answer
    fcm_server.revoke_access_tokens()                # the next send gets 401 UNAUTHENTICATED
    fcm_server.goaway()                              # GOAWAY on every HTTP/2 connection
    fcm_server.drop_connections()                    # cut every connection
    fcm_server.messages                              # accepted messages, in order
    fcm_server.requests                              # every send request, with its status
    fcm_server.token_requests                        # access tokens issued so far
    fcm_server.connections_made, fcm_server.peak_streams
    fcm_server.service_account_json()                # credentials whose token_uri is the fake

Standalone (for benchmarks), it accepts every valid message until stopped and records nothing
(counters only)::

    python -m tests.fakes.fcm --port 8444 --ca-out /tmp/fcm-ca.pem --credentials-out /tmp/sa.json

It prints one JSON line with ``endpoint``, ``ca_path``, ``credentials_path`` and ``project_id``.
The send path does no logging and no sleeping (unless ``--latency-ms`` asks for it).
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import itertools
import json
import re
import secrets
import socket
import ssl
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import h11
import pytest
import trustme
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
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

DEFAULT_PROJECT_ID = "fake-project"
CLIENT_EMAIL_DOMAIN = "iam.gserviceaccount.com"
JWT_BEARER_GRANT = "urn:ietf:params:oauth:grant-type:jwt-bearer"
GOOGLE_TOKEN_URL = "https://oauth2.googleapis.com/token"
FCM_SCOPE = "https://www.googleapis.com/auth/firebase.messaging"
MAX_TTL_SECONDS = 2_419_200
"""FCM refuses an ``android.ttl`` over four weeks."""
MAX_DATA_BYTES = 4096
"""FCM's limit on a message's data payload, keys and values together."""
HANG_LIMIT_SECONDS = 60.0
"""A hanging request is dropped after this long even if the client never gives up."""

FCM_ERROR_TYPE = "type.googleapis.com/google.firebase.fcm.v1.FcmError"
BAD_REQUEST_TYPE = "type.googleapis.com/google.rpc.BadRequest"
ERROR_INFO_TYPE = "type.googleapis.com/google.rpc.ErrorInfo"

OK = "OK"
"""Script name: accept the message (what an unscripted token gets)."""
HANG = "HANG"
"""Script name: read the request and never answer it."""

_SEND_PATH = re.compile(r"/v1/projects/([^/]+)/messages:send")
_DURATION = re.compile(r"(\d+)(?:\.\d{1,9})?s")
_MESSAGE_FIELDS = frozenset(
    {"name", "data", "notification", "android", "webpush", "apns", "fcm_options", "token",
     "topic", "condition"}
)
_ANDROID_FIELDS = frozenset(
    {"collapse_key", "priority", "ttl", "restricted_package_name", "data", "notification",
     "fcm_options", "direct_boot_ok"}
)
_TARGETS = ("token", "topic", "condition")
_RESERVED_DATA_KEYS = frozenset({"from", "gcm"})

_shared_ca: trustme.CA | None = None
_shared_ca_lock = threading.Lock()


def shared_ca() -> trustme.CA:
    """The process-wide test CA the fake's certificates are issued by: one CA file trusts every
    FCM fake of the process."""
    global _shared_ca
    with _shared_ca_lock:
        if _shared_ca is None:
            _shared_ca = trustme.CA()
        return _shared_ca


@lru_cache(maxsize=None)
def _service_account_key(role: str) -> rsa.RSAPrivateKey:
    """The RSA key of a ``role`` (``"trusted"``, ``"untrusted"``), made once per process:
    generating a 2048-bit key takes long enough to notice when every test starts a server."""
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@dataclass(frozen=True)
class Answer:
    """One HTTP answer: status, body and extra headers, as the fake sends them."""

    status: int
    body: bytes
    headers: tuple[tuple[bytes, bytes], ...] = ()


@dataclass(frozen=True)
class ReceivedRequest:
    """One request to the send endpoint as the fake saw it. ``token`` is the message's
    registration token (``None`` when the body names none), ``body`` the whole request JSON
    (``None`` when it was not JSON), ``http_version`` ``"2"`` or ``"1.1"``, ``status`` what the
    fake answered (``None``: it hung)."""

    token: str | None
    body: Any
    validate_only: bool
    http_version: str
    status: int | None


def _status(
    code: int,
    message: str,
    status: str,
    *,
    error_code: str | None = None,
    violation: dict[str, str] | None = None,
    error_info: dict[str, Any] | None = None,
) -> bytes:
    """A ``google.rpc.Status`` error body the way Google's front end writes it: the FcmError
    ``errorCode``, a BadRequest field violation, an ErrorInfo, each when given."""
    details: list[dict[str, Any]] = []
    if error_code is not None:
        details.append({"@type": FCM_ERROR_TYPE, "errorCode": error_code})
    if violation is not None:
        details.append({"@type": BAD_REQUEST_TYPE, "fieldViolations": [violation]})
    if error_info is not None:
        details.append({"@type": ERROR_INFO_TYPE, **error_info})
    error: dict[str, Any] = {"code": code, "message": message, "status": status}
    if details:
        error["details"] = details
    return json.dumps({"error": error}, indent=2).encode()


_JSON = ((b"content-type", b"application/json; charset=UTF-8"),)
_BEARER_CHALLENGE = (b"www-authenticate", b'Bearer realm="https://accounts.google.com/"')
_INVALID_TOKEN_MESSAGE = "The registration token is not a valid FCM registration token"
_UNAUTHENTICATED_MESSAGE = (
    "Request had invalid authentication credentials. Expected OAuth 2 access token, login "
    "cookie or other valid authentication credential. See "
    "https://developers.google.com/identity/sign-in/web/devconsole-project."
)
_MISSING_CREDENTIAL_MESSAGE = (
    "Request is missing required authentication credential. Expected OAuth 2 access token, "
    "login cookie or other valid authentication credential. See "
    "https://developers.google.com/identity/sign-in/web/devconsole-project."
)
_AUTH_ERROR_METADATA = {
    "service": "fcm.googleapis.com",
    "method": "google.firebase.fcm.v1.FcmService.SendMessage",
}

FCM_ERRORS: dict[str, tuple[int, bytes]] = {
    "UNREGISTERED": (404, _status(
        404, "Requested entity was not found.", "NOT_FOUND", error_code="UNREGISTERED")),
    "INVALID_TOKEN": (400, _status(
        400, _INVALID_TOKEN_MESSAGE, "INVALID_ARGUMENT", error_code="INVALID_ARGUMENT",
        violation={"field": "message.token", "description": "Invalid registration token"})),
    "INVALID_TOKEN_MESSAGE_ONLY": (400, _status(
        400, _INVALID_TOKEN_MESSAGE, "INVALID_ARGUMENT", error_code="INVALID_ARGUMENT")),
    "INVALID_ARGUMENT": (400, _status(
        400, "Invalid value at 'message.data[0].value' (TYPE_STRING), 12", "INVALID_ARGUMENT",
        violation={"field": "message.data[0].value",
                   "description": "Invalid value at 'message.data[0].value' (TYPE_STRING), 12"})),
    "SENDER_ID_MISMATCH": (403, _status(
        403, "SenderId mismatch", "PERMISSION_DENIED", error_code="SENDER_ID_MISMATCH")),
    "QUOTA_EXCEEDED": (429, _status(
        429, "Quota exceeded for quota metric 'Send requests' and limit 'Send requests per "
        "minute' of service 'fcm.googleapis.com'.", "RESOURCE_EXHAUSTED",
        error_code="QUOTA_EXCEEDED")),
    "UNAVAILABLE": (503, _status(
        503, "The service is currently unavailable.", "UNAVAILABLE", error_code="UNAVAILABLE")),
    "INTERNAL": (500, _status(
        500, "Internal error encountered.", "INTERNAL", error_code="INTERNAL")),
    "THIRD_PARTY_AUTH_ERROR": (401, _status(
        401, "Auth error from APNS or Web Push Service", "UNAUTHENTICATED",
        error_code="THIRD_PARTY_AUTH_ERROR")),
    "UNAUTHENTICATED": (401, _status(
        401, _UNAUTHENTICATED_MESSAGE, "UNAUTHENTICATED",
        error_info={"reason": "ACCESS_TOKEN_EXPIRED", "domain": "googleapis.com",
                    "metadata": _AUTH_ERROR_METADATA})),
    "PERMISSION_DENIED": (403, _status(
        403, "Permission 'cloudmessaging.messages.create' denied on resource "
        "'//cloudresourcemanager.googleapis.com/projects/other-project' (or it may not exist).",
        "PERMISSION_DENIED",
        error_info={"reason": "IAM_PERMISSION_DENIED",
                    "domain": "cloudresourcemanager.googleapis.com",
                    "metadata": {"permission": "cloudmessaging.messages.create"}})),
}
"""FCM's error answers by name: the ``errorCode`` (or, without one, the status) they carry.
``INVALID_TOKEN`` is the shape FCM sends for a malformed registration token (a BadRequest on
``message.token``), ``INVALID_TOKEN_MESSAGE_ONLY`` the documented example without it, and
``INVALID_ARGUMENT`` a payload error (the documented ``message.data[0].value`` example)."""


def fcm_error(name: str, *, retry_after: int | None = None) -> Answer:
    """FCM's error answer ``name`` (a key of :data:`FCM_ERRORS`), with a ``Retry-After`` header
    when ``retry_after`` is given (FCM sends one with some 429 and 503 answers)."""
    status, body = FCM_ERRORS[name]
    headers: tuple[tuple[bytes, bytes], ...] = _JSON
    if status == 401:
        headers += (_BEARER_CHALLENGE,)
    if retry_after is not None:
        headers += ((b"retry-after", str(retry_after).encode()),)
    return Answer(status, body, headers)


def _bad_request(message: str, field: str | None, *, fcm: bool = True) -> Answer:
    """A 400 INVALID_ARGUMENT with a BadRequest naming the faulty field (no field: a JSON syntax
    error). Errors found while parsing the JSON carry only the BadRequest (``fcm=False``); FCM's
    own checks add the ``FcmError``."""
    violation = {"description": message} if field is None else {
        "field": field, "description": message}
    body = _status(400, message, "INVALID_ARGUMENT",
                   error_code="INVALID_ARGUMENT" if fcm else None, violation=violation)
    return Answer(400, body, _JSON)


def _unknown_name(name: str, where: str | None) -> Answer:
    at = f" at '{where}'" if where else ""
    return _bad_request(
        f'Invalid JSON payload received. Unknown name "{name}"{at}: Cannot find field.',
        None, fcm=False)


def _json(status: int, document: dict[str, Any]) -> Answer:
    return Answer(status, json.dumps(document).encode(), _JSON)


def _b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class FakeFcm:
    """A fake FCM endpoint and token endpoint on 127.0.0.1. Start it with :meth:`start` or
    ``with FakeFcm() as fake:``. Scripting methods and records are safe from any thread.
    ``max_concurrent_streams`` is the SETTINGS_MAX_CONCURRENT_STREAMS it announces (and holds
    clients to) on HTTP/2 connections."""

    def __init__(
        self,
        *,
        port: int = 0,
        project_id: str = DEFAULT_PROJECT_ID,
        record: bool = True,
        latency: float = 0.0,
        max_concurrent_streams: int = 100,
    ) -> None:
        self.host = "127.0.0.1"
        self.port = port
        self.project_id = project_id
        self.client_email = f"push-sender@{project_id}.{CLIENT_EMAIL_DOMAIN}"
        self.key_id = secrets.token_hex(20)
        self.record = record
        self.latency = latency
        """Seconds every send waits before answering (benchmarks: FCM is not instantaneous)."""
        self.max_concurrent_streams = max_concurrent_streams
        self.access_token_lifetime = 3600
        """``expires_in`` of the access tokens issued from now on, in seconds."""
        self._public_key = _service_account_key("trusted").public_key()
        self._lock = threading.Lock()
        self._scripts: dict[str, deque[Answer | str]] = {}
        self._requests: list[ReceivedRequest] = []
        self._access_tokens: set[str] = set()
        self._token_requests = 0
        self._send_requests = 0
        self._connections_made = 0
        self._peak_streams = 0
        self._message_ids = itertools.count(1)
        self._connections: set[_Http2 | _Http1] = set()
        self._workdir: tempfile.TemporaryDirectory[str] | None = None
        self._server: asyncio.Server | None = None
        self._server_thread = LoopThread()

    # -- lifecycle ---------------------------------------------------------------------------

    @property
    def endpoint(self) -> str:
        """The base URL to give the provider as its FCM endpoint."""
        return f"https://{self.host}:{self.port}"

    @property
    def token_url(self) -> str:
        """The OAuth 2 token endpoint, written as ``token_uri`` in the service-account JSON."""
        return f"{self.endpoint}/token"

    @property
    def ca_path(self) -> str:
        """The PEM file of the CA that issued the fake's certificate (trust it in clients)."""
        assert self._workdir is not None, "start the fake first"
        return str(Path(self._workdir.name) / "ca.pem")

    def start(self) -> FakeFcm:
        """Bind, start serving in a background thread, and return once the server is up."""
        self._workdir = tempfile.TemporaryDirectory(prefix="fake-fcm-")
        ca = shared_ca()
        ca.cert_pem.write_to_path(self.ca_path)
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ca.issue_cert("localhost", "127.0.0.1").configure_cert(context)
        context.set_alpn_protocols(["h2", "http/1.1"])
        # Bind and listen here, so the port is known before the server runs and no early
        # connection is refused.
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.port))
        sock.listen(1024)
        self.port = sock.getsockname()[1]
        try:
            self._server_thread.start(
                f"fake-fcm-{self.port}", lambda: self._open(sock, context))
        except BaseException as exc:
            sock.close()
            self.stop()
            raise RuntimeError("the fake FCM server did not start") from exc
        return self

    def stop(self) -> None:
        """Stop serving (connections are dropped, hanging requests with them) and remove the
        temporary files."""
        self._server_thread.stop(self._shutdown)
        if self._workdir is not None:
            self._workdir.cleanup()
            self._workdir = None

    def __enter__(self) -> FakeFcm:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    async def _open(self, sock: socket.socket, context: ssl.SSLContext) -> None:
        """Serve on the bound socket (in the server thread)."""
        self._server = await asyncio.get_running_loop().create_server(
            lambda: _Negotiation(self), sock=sock, ssl=context)

    async def _shutdown(self) -> None:
        assert self._server is not None
        await close_server(
            self._server, [connection.transport for connection in self._connections])

    # -- scripting and records -----------------------------------------------------------------

    def script(self, token: str, *answers: Answer | str) -> None:
        """Answer the next sends to ``token`` with ``answers`` in order; the last one then stays.
        An answer is :data:`OK`, :data:`HANG`, a name from :data:`FCM_ERRORS`, or an
        :class:`Answer` (e.g. from :func:`fcm_error` with ``retry_after``)."""
        if not answers:
            raise ValueError("script at least one answer")
        resolved = [
            a if isinstance(a, Answer) or a in (OK, HANG) else fcm_error(a) for a in answers]
        with self._lock:
            self._scripts[token] = deque(resolved)

    def revoke_access_tokens(self) -> None:
        """Forget every access token issued so far, as if they had expired early: the next
        send is refused with 401 UNAUTHENTICATED until the client fetches a new token."""
        with self._lock:
            self._access_tokens.clear()

    def goaway(self, last_stream_id: int | None = None) -> None:
        """Send GOAWAY (NO_ERROR) on every HTTP/2 connection, as Google's front end does before
        it closes one: requests up to ``last_stream_id`` (default: all received so far) are
        still answered, later ones were not processed, and no new stream is accepted."""
        self._in_server(lambda c: c.goaway(last_stream_id))

    def drop_connections(self) -> None:
        """Cut every connection at once, without a word (a crashed front end, a lost route)."""
        self._in_server(lambda c: c.transport.abort())

    def _in_server(self, action: Callable[[_Http2 | _Http1], None]) -> None:
        async def run() -> None:
            for connection in list(self._connections):
                action(connection)

        self._server_thread.call(run)

    @property
    def requests(self) -> list[ReceivedRequest]:
        """Every request to the send endpoint so far, whatever the answer, in order."""
        with self._lock:
            return list(self._requests)

    @property
    def messages(self) -> list[ReceivedRequest]:
        """The messages accepted so far (200 answers, dry runs included), in order."""
        with self._lock:
            return [r for r in self._requests if r.status == 200]

    @property
    def token_requests(self) -> int:
        """How many access tokens the token endpoint issued."""
        with self._lock:
            return self._token_requests

    @property
    def send_requests(self) -> int:
        """How many requests reached the send endpoint, whatever the answer."""
        with self._lock:
            return self._send_requests

    @property
    def connections_made(self) -> int:
        """How many HTTP/2 connections were accepted (the send endpoint's: google-auth
        fetches tokens over HTTP/1.1)."""
        with self._lock:
            return self._connections_made

    @property
    def peak_streams(self) -> int:
        """The most requests ever in flight (received, not yet answered) on one HTTP/2
        connection."""
        with self._lock:
            return self._peak_streams

    # -- service account -----------------------------------------------------------------------

    def service_account_info(self, *, trusted: bool = True) -> dict[str, Any]:
        """A service-account key file's content whose ``token_uri`` is the fake. With
        ``trusted=False`` it is signed by a key the fake does not know: the token endpoint
        refuses it (``invalid_grant``), as Google does for a deleted key."""
        key = _service_account_key("trusted" if trusted else "untrusted")
        pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption()).decode()
        return {
            "type": "service_account",
            "project_id": self.project_id,
            "private_key_id": self.key_id,
            "private_key": pem,
            "client_email": self.client_email,
            "client_id": "100000000000000000001",
            "auth_uri": "https://accounts.google.com/o/oauth2/auth",
            "token_uri": self.token_url,
            "universe_domain": "googleapis.com",
        }

    def service_account_json(self, *, trusted: bool = True) -> str:
        """:meth:`service_account_info` as JSON text (what ``PUSH_FCM_CREDENTIALS`` holds)."""
        return json.dumps(self.service_account_info(trusted=trusted), indent=2)

    def write_service_account(self, path: str | Path, *, trusted: bool = True) -> Path:
        """Write :meth:`service_account_json` to ``path`` and return it."""
        path = Path(path)
        path.write_text(self.service_account_json(trusted=trusted))
        return path

    # -- requests (server thread) --------------------------------------------------------------

    def _connection_made(self, connection: _Http2 | _Http1) -> None:
        self._connections.add(connection)
        if isinstance(connection, _Http2):
            with self._lock:
                self._connections_made += 1

    def _streams_open(self, count: int) -> None:
        if count > self._peak_streams:
            with self._lock:
                self._peak_streams = max(self._peak_streams, count)

    def _handle(self, method: bytes, path: bytes, authorization: bytes, body: bytes,
                http_version: str) -> tuple[Answer | str, float]:
        """The answer to one request, and how long to wait before giving it."""
        if method != b"POST":
            return _json(405, {"error": {"code": 405, "message": "Method not allowed.",
                                         "status": "METHOD_NOT_ALLOWED"}}), 0.0
        if path == b"/token":
            return self._token(body), 0.0
        match = _SEND_PATH.fullmatch(path.decode("latin-1"))
        if match is None:
            return _json(404, {"error": {"code": 404, "message": "Not Found",
                                         "status": "NOT_FOUND"}}), 0.0
        return self._send_message(match.group(1), authorization, body, http_version)

    def _send_message(self, project: str, authorization: bytes, body: bytes,
                      http_version: str) -> tuple[Answer | str, float]:
        with self._lock:
            self._send_requests += 1
        try:
            document = json.loads(body)
        except ValueError:
            document = None
        answer, delay = self._answer_send(project, authorization, document)
        if self.record:
            message = document.get("message") if isinstance(document, dict) else None
            token = message.get("token") if isinstance(message, dict) else None
            received = ReceivedRequest(
                token if isinstance(token, str) else None, document,
                isinstance(document, dict) and document.get("validate_only") is True,
                http_version, answer.status if isinstance(answer, Answer) else None)
            with self._lock:
                self._requests.append(received)
        return answer, delay

    def _answer_send(self, project: str, authorization: bytes,
                     document: Any) -> tuple[Answer | str, float]:
        """FCM's checks in FCM's order (credentials, project, request), then the script; the
        latency applies to requests that pass the checks."""
        refused = self._check_authorization(authorization)
        if refused is not None:
            return refused, 0.0
        if project != self.project_id:
            return fcm_error("PERMISSION_DENIED"), 0.0
        if document is None:
            return _bad_request(
                "Invalid JSON payload received. Unexpected token.", None, fcm=False), 0.0
        invalid = _check_send_request(document)
        if invalid is not None:
            return invalid, 0.0
        answer = self._scripted(document["message"].get("token", ""))
        if answer != OK:
            return answer, self.latency
        # FCM names every dry-run message fake_message_id.
        validate_only = document.get("validate_only", False)
        message_id = "fake_message_id" if validate_only else str(next(self._message_ids))
        body = f'{{"name": "projects/{project}/messages/{message_id}"}}'.encode()
        return Answer(200, body, _JSON), self.latency

    def _scripted(self, token: str) -> Answer | str:
        if not self._scripts:
            return OK
        with self._lock:
            answers = self._scripts.get(token)
            if not answers:
                return OK
            return answers.popleft() if len(answers) > 1 else answers[0]

    def _check_authorization(self, authorization: bytes) -> Answer | None:
        scheme, _, credential = authorization.decode("latin-1").partition(" ")
        if scheme.lower() == "bearer" and credential:
            with self._lock:
                if credential in self._access_tokens:
                    return None
            return fcm_error("UNAUTHENTICATED")
        body = _status(401, _MISSING_CREDENTIAL_MESSAGE, "UNAUTHENTICATED",
                       error_info={"reason": "CREDENTIALS_MISSING", "domain": "googleapis.com",
                                   "metadata": _AUTH_ERROR_METADATA})
        return Answer(401, body, _JSON + (_BEARER_CHALLENGE,))

    def _token(self, body: bytes) -> Answer:
        form = {k: v[0] for k, v in parse_qs(body.decode("latin-1")).items()}
        if form.get("grant_type") != JWT_BEARER_GRANT:
            return _json(400, {"error": "unsupported_grant_type",
                               "error_description": "Invalid grant_type: "
                               + form.get("grant_type", "")})
        problem = self._check_assertion(form.get("assertion", ""))
        if problem is not None:
            return _json(400, {"error": "invalid_grant", "error_description": problem})
        access_token = f"ya29.fake.{secrets.token_urlsafe(32)}"
        with self._lock:
            self._access_tokens.add(access_token)
            self._token_requests += 1
        return _json(200, {"access_token": access_token,
                           "expires_in": self.access_token_lifetime, "token_type": "Bearer"})

    def _check_assertion(self, assertion: str) -> str | None:
        """Why Google would refuse the JWT assertion, or ``None`` when it is good."""
        try:
            header_b64, claims_b64, signature_b64 = assertion.split(".")
            header = json.loads(_b64url_decode(header_b64))
            claims = json.loads(_b64url_decode(claims_b64))
            signature = _b64url_decode(signature_b64)
        except (ValueError, binascii.Error):
            return "Invalid JWT: the assertion is not a JWT."
        if header.get("alg") != "RS256":
            return "Invalid JWT: the signature algorithm must be RS256."
        if header.get("kid") != self.key_id:
            return "Invalid JWT Signature."
        try:
            self._public_key.verify(signature, f"{header_b64}.{claims_b64}".encode(),
                                    padding.PKCS1v15(), hashes.SHA256())
        except InvalidSignature:
            return "Invalid JWT Signature."
        if claims.get("iss") != self.client_email:
            return "Invalid JWT: the issuer is not the service account."
        if claims.get("aud") not in (GOOGLE_TOKEN_URL, self.token_url):
            return "Invalid JWT: Failed audience check."
        if FCM_SCOPE not in str(claims.get("scope", "")).split():
            return "Invalid JWT: the scope does not include firebase.messaging."
        now = time.time()
        iat, exp = claims.get("iat"), claims.get("exp")
        if (not isinstance(iat, int) or not isinstance(exp, int) or exp <= now - 60
                or iat > now + 300 or exp - iat > 3600):
            return ("Invalid JWT: Token must be a short-lived token (60 minutes) and in a "
                    "reasonable timeframe. Check your iat and exp values in the JWT claim.")
        return None


class _Negotiation(asyncio.Protocol):
    """A new TLS connection: hands it to HTTP/2 or HTTP/1.1 by what ALPN agreed."""

    def __init__(self, fake: FakeFcm) -> None:
        self.fake = fake

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        ssl_object = transport.get_extra_info("ssl_object")
        http2 = ssl_object is not None and ssl_object.selected_alpn_protocol() == "h2"
        protocol: _Http2 | _Http1 = _Http2(self.fake) if http2 else _Http1(self.fake)
        transport.set_protocol(protocol)
        protocol.connection_made(transport)


_H2_CONFIG = H2Configuration(
    client_side=False,
    validate_outbound_headers=False,
    normalize_outbound_headers=False,
    validate_inbound_headers=False,
    normalize_inbound_headers=False,
)
_WINDOW = 16 * 1024 * 1024
"""The flow-control window the fake gives clients: large, so it rarely sends WINDOW_UPDATE."""


class _Http2(asyncio.Protocol):
    """One HTTP/2 connection: framing with h2 (header checks off: the fake checks what it
    needs), requests handed to :class:`FakeFcm`, what h2 queues written once per batch of
    frames received."""

    def __init__(self, fake: FakeFcm) -> None:
        self.fake = fake
        self.transport: asyncio.Transport
        self.conn = H2Connection(_H2_CONFIG)
        self.conn.state_machine = DrainingServerStateMachine()
        self.conn.local_settings = Settings(client=False, initial_values={
            SettingCodes.MAX_CONCURRENT_STREAMS: fake.max_concurrent_streams,
            SettingCodes.INITIAL_WINDOW_SIZE: _WINDOW,
        })
        self.requests: dict[int, tuple[list[tuple[bytes, bytes]], bytearray]] = {}
        """Streams whose request is still arriving."""
        self.unanswered: set[int] = set()
        """Streams received and not yet answered (delayed or hanging)."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.fake._connection_made(self)
        self.conn.initiate_connection()
        self.conn.increment_flow_control_window(_WINDOW - 65_535)
        transport.write(self.conn.data_to_send())

    def connection_lost(self, exc: Exception | None) -> None:
        self.fake._connections.discard(self)

    def data_received(self, data: bytes) -> None:
        try:
            events = self.conn.receive_data(data)
        except H2Error:
            self.transport.write(self.conn.data_to_send())
            self.transport.close()
            return
        for event in events:
            kind = type(event)
            if kind is RequestReceived:
                self.requests[event.stream_id] = (event.headers, bytearray())  # type: ignore[attr-defined]
                self.unanswered.add(event.stream_id)  # type: ignore[attr-defined]
                self.fake._streams_open(len(self.unanswered))
            elif kind is DataReceived:
                request = self.requests.get(event.stream_id)  # type: ignore[attr-defined]
                if request is not None:
                    request[1].extend(event.data)  # type: ignore[attr-defined]
                self.conn.acknowledge_received_data(
                    event.flow_controlled_length, event.stream_id)  # type: ignore[attr-defined]
            elif kind is StreamEnded:
                self._request_complete(event.stream_id)  # type: ignore[attr-defined]
            elif kind is StreamReset:
                self.requests.pop(event.stream_id, None)  # type: ignore[attr-defined]
                self.unanswered.discard(event.stream_id)  # type: ignore[attr-defined]
            elif kind is ConnectionTerminated:
                self.transport.close()
        self.transport.write(self.conn.data_to_send())

    def goaway(self, last_stream_id: int | None) -> None:
        self.conn.close_connection(last_stream_id=last_stream_id)
        self.transport.write(self.conn.data_to_send())

    def _request_complete(self, stream_id: int) -> None:
        request = self.requests.pop(stream_id, None)
        if request is None:
            return
        headers, body = request
        method = path = authorization = b""
        for name, value in headers:
            if name == b":method":
                method = value
            elif name == b":path":
                path = value
            elif name == b"authorization":
                authorization = value
        answer, delay = self.fake._handle(method, path, authorization, bytes(body), "2")
        loop = asyncio.get_running_loop()
        if not isinstance(answer, Answer):  # HANG
            loop.call_later(HANG_LIMIT_SECONDS, self._give_up, stream_id)
        elif delay:
            loop.call_later(delay, self._answer_later, stream_id, answer)
        else:
            self._answer(stream_id, answer)

    def _answer(self, stream_id: int, answer: Answer) -> None:
        if stream_id not in self.unanswered:
            return  # reset by the client meanwhile
        self.unanswered.discard(stream_id)
        status = str(answer.status).encode()
        try:
            self.conn.send_headers(stream_id, [(b":status", status), *answer.headers],
                                   end_stream=not answer.body)
            if answer.body:
                self.conn.send_data(stream_id, answer.body, end_stream=True)
        except H2Error:  # the client went away meanwhile
            pass

    def _answer_later(self, stream_id: int, answer: Answer) -> None:
        if not self.transport.is_closing():
            self._answer(stream_id, answer)
            self.transport.write(self.conn.data_to_send())

    def _give_up(self, stream_id: int) -> None:
        """A hanging request reached :data:`HANG_LIMIT_SECONDS`: reset it."""
        if stream_id in self.unanswered and not self.transport.is_closing():
            self.unanswered.discard(stream_id)
            try:
                self.conn.reset_stream(stream_id, ErrorCodes.CANCEL)
            except H2Error:
                return
            self.transport.write(self.conn.data_to_send())


class _Http1(asyncio.Protocol):
    """One HTTP/1.1 connection (google-auth's requests, for the token endpoint), parsed by h11;
    requests are answered one at a time, in order."""

    def __init__(self, fake: FakeFcm) -> None:
        self.fake = fake
        self.transport: asyncio.Transport
        self.conn = h11.Connection(h11.SERVER)
        self.request: h11.Request | None = None
        self.body = bytearray()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.fake._connection_made(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.fake._connections.discard(self)

    def data_received(self, data: bytes) -> None:
        self.conn.receive_data(data)
        self._next()

    def goaway(self, last_stream_id: int | None) -> None:
        """HTTP/1.1 has no GOAWAY: nothing to do."""

    def _next(self) -> None:
        while True:
            try:
                event = self.conn.next_event()
            except h11.RemoteProtocolError:
                self.transport.close()
                return
            if event is h11.NEED_DATA or event is h11.PAUSED:
                return
            if isinstance(event, h11.Request):
                self.request, self.body = event, bytearray()
            elif isinstance(event, h11.Data):
                self.body.extend(event.data)
            elif isinstance(event, h11.EndOfMessage):
                self._request_complete()
                return
            elif isinstance(event, h11.ConnectionClosed):
                self.transport.close()
                return

    def _request_complete(self) -> None:
        assert self.request is not None
        request = self.request
        authorization = next((v for k, v in request.headers if k == b"authorization"), b"")
        path = request.target.partition(b"?")[0]
        answer, delay = self.fake._handle(
            request.method, path, authorization, bytes(self.body), "1.1")
        loop = asyncio.get_running_loop()
        if not isinstance(answer, Answer):  # HANG
            loop.call_later(HANG_LIMIT_SECONDS, self.transport.close)
        elif delay:
            loop.call_later(delay, self._answer, answer)
        else:
            self._answer(answer)

    def _answer(self, answer: Answer) -> None:
        if self.transport.is_closing():
            return
        headers = [*answer.headers, (b"content-length", str(len(answer.body)).encode())]
        data = self.conn.send(h11.Response(status_code=answer.status, headers=headers))
        data += self.conn.send(h11.Data(data=answer.body)) + self.conn.send(h11.EndOfMessage())
        self.transport.write(data)
        if self.conn.our_state is h11.MUST_CLOSE:
            self.transport.close()
            return
        self.conn.start_next_cycle()
        self._next()  # a request the client sent meanwhile


def _check_send_request(document: Any) -> Answer | None:
    """What FCM would say of a malformed send request, or ``None`` when it is well-formed."""
    if not isinstance(document, dict):
        return _bad_request("Invalid JSON payload received. Expected an object.", None, fcm=False)
    for name in document:
        if name not in ("message", "validate_only"):
            return _unknown_name(name, None)
    validate_only = document.get("validate_only", False)
    if not isinstance(validate_only, bool):
        return _bad_request(
            f"Invalid value at 'validate_only' (TYPE_BOOL), {json.dumps(validate_only)}",
            "validate_only", fcm=False)
    message = document.get("message")
    if not isinstance(message, dict):
        return _bad_request("Recipient of the message is not set.", "message")
    for name in message:
        if name not in _MESSAGE_FIELDS:
            return _unknown_name(name, "message")
    targets = [t for t in _TARGETS if message.get(t)]
    if not targets:
        return _bad_request("Recipient of the message is not set.", "message")
    if len(targets) > 1:
        return _bad_request(
            f"Invalid JSON payload received. Oneof field 'target' is already set. Cannot set "
            f"'{targets[1]}'", None, fcm=False)
    if not all(isinstance(message[t], str) for t in targets):
        return _bad_request(f"Invalid value at 'message.{targets[0]}' (TYPE_STRING)",
                            f"message.{targets[0]}", fcm=False)
    return _check_data(message.get("data"), "message.data") or _check_android(
        message.get("android"))


def _check_data(data: Any, where: str) -> Answer | None:
    if data is None:
        return None
    if not isinstance(data, dict):
        return _bad_request(f"Invalid value at '{where}' (type.googleapis.com/"
                            "google.protobuf.Struct)", where, fcm=False)
    size = 0
    for index, (key, value) in enumerate(data.items()):
        if not isinstance(value, str):
            return _bad_request(
                f"Invalid value at '{where}[{index}].value' (TYPE_STRING), {json.dumps(value)}",
                f"{where}[{index}].value", fcm=False)
        if key in _RESERVED_DATA_KEYS or key.startswith("google"):
            return _bad_request(f"Invalid data payload key: {key}", where)
        size += len(key.encode()) + len(value.encode())
    if size > MAX_DATA_BYTES:
        # FCM's answer for an oversized message names no field.
        return Answer(400, _status(400, "Request contains an invalid argument.",
                                   "INVALID_ARGUMENT"), _JSON)
    return None


def _check_android(android: Any) -> Answer | None:
    if android is None:
        return None
    if not isinstance(android, dict):
        return _bad_request("Invalid value at 'message.android' (type.googleapis.com/"
                            "google.firebase.fcm.v1.AndroidConfig)", "message.android", fcm=False)
    for name in android:
        if name not in _ANDROID_FIELDS:
            return _unknown_name(name, "message.android")
    priority = android.get("priority", "NORMAL")
    if not isinstance(priority, str) or priority.upper() not in ("NORMAL", "HIGH"):
        return _bad_request(
            "Invalid value at 'message.android.priority' (type.googleapis.com/"
            f"google.firebase.fcm.v1.AndroidMessagePriority), {json.dumps(priority)}",
            "message.android.priority", fcm=False)
    if "collapse_key" in android and not isinstance(android["collapse_key"], str):
        return _bad_request("Invalid value at 'message.android.collapse_key' (TYPE_STRING)",
                            "message.android.collapse_key", fcm=False)
    ttl = android.get("ttl", "0s")
    match = _DURATION.fullmatch(ttl) if isinstance(ttl, str) else None
    if match is None:
        return _bad_request(
            "Invalid value at 'message.android.ttl' (type.googleapis.com/"
            f"google.protobuf.Duration), {json.dumps(ttl)}", "message.android.ttl", fcm=False)
    if int(match.group(1)) > MAX_TTL_SECONDS:
        return _bad_request("The TTL is out of range: it must be between 0 and 4 weeks.",
                            "message.android.ttl")
    return _check_data(android.get("data"), "message.android.data")


@pytest.fixture
def fcm_server() -> Iterator[FakeFcm]:
    """A fresh fake FCM server per test (function scope: nothing scripted, recorded, counted or
    issued in one test is seen by another). Starting one takes a few milliseconds; the CA and
    the service-account keys are made once per process."""
    with FakeFcm() as fake:
        yield fake


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (0: any free)")
    parser.add_argument("--project", default=DEFAULT_PROJECT_ID, help="the FCM project id")
    parser.add_argument("--ca-out", required=True, help="where to write the CA certificate (PEM)")
    parser.add_argument("--credentials-out", required=True,
                        help="where to write the service-account JSON (token_uri: the fake)")
    parser.add_argument("--latency-ms", type=float, default=0.0,
                        help="wait this long before answering each send")
    args = parser.parse_args()
    fake = FakeFcm(port=args.port, project_id=args.project, record=False,
                   latency=args.latency_ms / 1000)
    with fake:
        Path(args.ca_out).write_text(Path(fake.ca_path).read_text())
        fake.write_service_account(args.credentials_out)
        info = {
            "endpoint": fake.endpoint,
            "ca_path": args.ca_out,
            "credentials_path": args.credentials_out,
            "project_id": fake.project_id,
        }
        announce_and_wait(info)


if __name__ == "__main__":
    main()
