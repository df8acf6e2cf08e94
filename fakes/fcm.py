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

The server is :mod:`fakes.server`'s, in its own thread with its own event loop: one TLS port
serves both protocols, chosen by ALPN (HTTP/2 for sends, HTTP/1.1 for google-auth's token
requests), and behaves on the network as Google's front end (100 streams per connection,
optional latency, recycling and refusals).

In a test, use the function-scoped ``fcm_server`` fixture (tests/conftest.py: a fresh server per
test, so scripts, records, counters and issued access tokens never leak between tests)::

    fcm_server.script(token, "UNAVAILABLE", "OK")   # 503 first, then 200 (the last answer stays)
    fcm_server.script(token, fcm_error("QUOTA_EXCEEDED", retry_after=30))
    fcm_server.script(token, "HANG")                 # never answer
    fcm_server.revoke_access_tokens()                # the next send gets 401 UNAUTHENTICATED
    fcm_server.goaway()                              # GOAWAY on every HTTP/2 connection
    fcm_server.drop_connections()                    # cut every connection
    fcm_server.messages                              # accepted messages, in order
    fcm_server.requests                              # every send request, with its status
    fcm_server.token_requests                        # access tokens issued so far
    fcm_server.grants_refused                        # token requests refused (invalid_grant)
    fcm_server.connections_made, fcm_server.peak_streams
    fcm_server.service_account_json()                # credentials whose token_uri is the fake

Standalone (for benchmarks and the local stack), it accepts every valid message until stopped
and records nothing (counts only)::

    python -m fakes.fcm --port 8444 --ca-out /tmp/fcm-ca.pem --credentials-out /tmp/sa.json \
        [--rtt-ms 50 --recycle-after 1000] [--print-pushes]

It prints one JSON line with ``endpoint``, ``ca_path``, ``credentials_path`` and ``project_id``;
with ``--print-pushes`` one line per accepted message (never the registration token: its hash).
"""
from __future__ import annotations

import argparse
import base64
import binascii
import hashlib
import itertools
import json
import re
import secrets
import sys
import time
from collections import deque
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import parse_qs

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from fakes.server import FakeServer, Hang, Network, Reply, Request, announce_and_wait

DEFAULT_PROJECT_ID = "fake-project"
CLIENT_EMAIL_DOMAIN = "iam.gserviceaccount.com"
JWT_BEARER_GRANT = "urn:ietf:params:oauth:grant-type:jwt-bearer"
GOOGLE_TOKEN_URL = "https://oauth2.googleapis.com/token"
FCM_SCOPE = "https://www.googleapis.com/auth/firebase.messaging"
MAX_TTL_SECONDS = 2_419_200
"""FCM refuses an ``android.ttl`` over four weeks."""
MAX_DATA_BYTES = 4096
"""FCM's limit on a message's data payload, keys and values together."""

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


class FakeFcm(FakeServer):
    """A fake FCM endpoint and token endpoint on 127.0.0.1. Start it with :meth:`start` or
    ``with FakeFcm() as fake:``. Scripting methods and records are safe from any thread.
    ``max_concurrent_streams`` is the SETTINGS_MAX_CONCURRENT_STREAMS it announces (and holds
    clients to) on HTTP/2 connections, unless ``network`` says."""

    name = "fake-fcm"
    http1 = True

    def __init__(
        self,
        *,
        port: int = 0,
        project_id: str = DEFAULT_PROJECT_ID,
        record: bool = True,
        latency: float = 0.0,
        max_concurrent_streams: int = 100,
        network: Network | None = None,
        echo: TextIO | None = None,
    ) -> None:
        super().__init__(port=port, network=network or Network(
            max_concurrent_streams=max_concurrent_streams))
        self.project_id = project_id
        self.client_email = f"push-sender@{project_id}.{CLIENT_EMAIL_DOMAIN}"
        self.key_id = secrets.token_hex(20)
        self.record = record
        self.latency = latency
        """Seconds every valid send waits before its answer, on top of the network's round
        trip (FCM's own time)."""
        self.echo = echo
        self.access_token_lifetime = 3600
        """``expires_in`` of the access tokens issued from now on, in seconds."""
        self._public_key = _service_account_key("trusted").public_key()
        self._scripts: dict[str, deque[Answer | str]] = {}
        self._requests: list[ReceivedRequest] = []
        self._access_tokens: set[str] = set()
        self._token_requests = 0
        self._grants_refused = 0
        self._send_requests = 0
        self._message_ids = itertools.count(1)

    # -- lifecycle ---------------------------------------------------------------------------

    @property
    def endpoint(self) -> str:
        """The base URL to give the provider as its FCM endpoint."""
        return f"https://{self.host}:{self.port}"

    @property
    def token_url(self) -> str:
        """The OAuth 2 token endpoint, written as ``token_uri`` in the service-account JSON."""
        return f"{self.endpoint}/token"

    # -- scripting and records -----------------------------------------------------------------

    def script(self, token: str, *answers: Answer | str) -> None:
        """Answer the next sends to ``token`` with ``answers`` in order; the last one then stays.
        An answer is :data:`OK`, :data:`HANG`, a name from :data:`FCM_ERRORS`, or an
        :class:`Answer` (e.g. from :func:`fcm_error` with ``retry_after``)."""
        if not answers:
            raise ValueError("script at least one answer")
        resolved = [
            a if isinstance(a, Answer) or a in (OK, HANG) else fcm_error(a) for a in answers]
        with self.lock:
            self._scripts[token] = deque(resolved)

    def revoke_access_tokens(self) -> None:
        """Forget every access token issued so far, as if they had expired early: the next
        send is refused with 401 UNAUTHENTICATED until the client fetches a new token."""
        with self.lock:
            self._access_tokens.clear()

    @property
    def requests(self) -> list[ReceivedRequest]:
        """Every request to the send endpoint so far, whatever the answer, in order."""
        with self.lock:
            return list(self._requests)

    @property
    def messages(self) -> list[ReceivedRequest]:
        """The messages accepted so far (200 answers, dry runs included), in order."""
        with self.lock:
            return [r for r in self._requests if r.status == 200]

    @property
    def token_requests(self) -> int:
        """How many access tokens the token endpoint issued."""
        with self.lock:
            return self._token_requests

    @property
    def grants_refused(self) -> int:
        """How many token requests were refused (``invalid_grant``)."""
        with self.lock:
            return self._grants_refused

    @property
    def send_requests(self) -> int:
        """How many requests reached the send endpoint, whatever the answer."""
        with self.lock:
            return self._send_requests

    @property
    def connections_made(self) -> int:
        """How many HTTP/2 connections were accepted (the send endpoint's: google-auth
        fetches tokens over HTTP/1.1)."""
        counts = self.counts
        return counts.connections_made - counts.http1_connections

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

    def handle(self, request: Request) -> Reply | Hang:
        authorization = request.header(b"authorization") or b""
        path = request.path.partition(b"?")[0]
        answer, delay = self._handle(request.method, path, authorization, request.body,
                                     request.http_version)
        if not isinstance(answer, Answer):  # HANG
            return Hang()
        return Reply(answer.status, answer.headers, answer.body,
                     push=path != b"/token", delay=delay)

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
        with self.lock:
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
            with self.lock:
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
        if self.echo is not None:
            self._echo(document)
        message_id = "fake_message_id" if validate_only else str(next(self._message_ids))
        body = f'{{"name": "projects/{project}/messages/{message_id}"}}'.encode()
        return Answer(200, body, _JSON), self.latency

    def _echo(self, document: dict[str, Any]) -> None:
        """One JSON line per accepted message, for watching the local stack: never the
        registration token."""
        assert self.echo is not None
        message = document["message"]
        android = message.get("android") or {}
        line = {
            "provider": "fcm",
            "device_sha256": hashlib.sha256(str(message.get("token")).encode()).hexdigest()[:16],
            "message_type": (message.get("data") or {}).get("type"),
            **{name: android[name] for name in ("priority", "collapse_key", "ttl")
               if name in android},
            "validate_only": document.get("validate_only", False),
        }
        print(json.dumps(line), file=self.echo, flush=True)

    def _scripted(self, token: str) -> Answer | str:
        if not self._scripts:
            return OK
        with self.lock:
            answers = self._scripts.get(token)
            if not answers:
                return OK
            return answers.popleft() if len(answers) > 1 else answers[0]

    def _check_authorization(self, authorization: bytes) -> Answer | None:
        scheme, _, credential = authorization.decode("latin-1").partition(" ")
        if scheme.lower() == "bearer" and credential:
            with self.lock:
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
            with self.lock:
                self._grants_refused += 1
            return _json(400, {"error": "invalid_grant", "error_description": problem})
        access_token = f"ya29.fake.{secrets.token_urlsafe(32)}"
        with self.lock:
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (0: any free)")
    parser.add_argument("--project", default=DEFAULT_PROJECT_ID, help="the FCM project id")
    parser.add_argument("--ca-out", required=True, help="where to write the CA certificate (PEM)")
    parser.add_argument("--credentials-out", required=True,
                        help="where to write the service-account JSON (token_uri: the fake)")
    parser.add_argument("--latency-ms", type=float, default=0.0,
                        help="FCM's own time per send, on top of the round trip")
    parser.add_argument("--print-pushes", action="store_true", help="print accepted messages")
    Network.add_arguments(parser, max_concurrent_streams=100)
    args = parser.parse_args()
    fake = FakeFcm(port=args.port, project_id=args.project, record=False,
                   latency=args.latency_ms / 1000, network=Network.from_arguments(args),
                   echo=sys.stdout if args.print_pushes else None)
    with fake:
        Path(args.ca_out).write_text(Path(fake.ca_path).read_text())
        fake.write_service_account(args.credentials_out)
        info = {
            "endpoint": fake.endpoint,
            "ca_path": args.ca_out,
            "credentials_path": args.credentials_out,
            "project_id": fake.project_id,
        }
        announce_and_wait(info, fake)


if __name__ == "__main__":
    main()
