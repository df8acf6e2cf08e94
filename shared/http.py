"""HTTP plumbing every function shares: JSON errors, bounded JSON bodies, health endpoints.

Functions are functions-framework ``aio.http`` targets, so one handler receives every path; the
platform probes (OpenFaaS's ``/_/health`` and ``/_/ready``, Knative's readiness path) are answered
here before the function's own logic runs.

The internal functions (the dispatchers, clean-up) can require a shared secret: when
``PUSH_INTERNAL_TOKEN`` is configured (a secret setting: on OpenFaaS, the secret
``push-internal-token``), every request but the platform's probes must carry it in
``X-Push-Internal-Token``, or is refused with 401. Callers that post to those functions
(a dispatcher's dead-token reports, ``pushctl dead-letters replay``) send it the same way
(:func:`internal_headers`).
"""
from __future__ import annotations

import hmac
import json
import logging
import os
import re
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response

from shared import logs, metrics
from shared.config import secret
from shared.db import DatabaseUnavailable, SchemaBehind

if TYPE_CHECKING:
    from shared.cors import CorsPolicy

log = logging.getLogger(__name__)

HEALTH_PATHS = ("/_/health", "/healthz")
READY_PATHS = ("/_/ready", "/readyz")
DEFAULT_MAX_BODY = 64 * 1024
DATABASE_RETRY_AFTER = 5
#: Request head limits, checked before any other work (uvicorn's h11 stops heads over 16 KiB
#: too, but not every server in front of a function does, and in-process callers none).
MAX_HEADERS = 100
MAX_HEADER_BYTES = 16 * 1024
INTERNAL_TOKEN_SETTING = "PUSH_INTERNAL_TOKEN"
INTERNAL_TOKEN_HEADER = "X-Push-Internal-Token"


class ApiError(Exception):
    """A request the function refuses, answered with ``status`` and a JSON body naming the
    problem: ``{"error": {"code": ..., "message": ..., "field": ...}}``."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        field: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.field = field
        self.headers = headers or {}

    def response(self) -> JSONResponse:
        error: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.field is not None:
            error["field"] = self.field
        response = _AsciiJSONResponse({"error": error}, status_code=self.status, headers=self.headers)
        response.error_code = self.code  # for the errors metric, read by serve()
        return response


class _AsciiJSONResponse(JSONResponse):
    """JSON with every non-ASCII character escaped. Errors may quote what the caller sent (an
    unknown field's name), and a lone surrogate in it cannot be encoded as UTF-8: the answer to
    a bad request must never fail to render."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, allow_nan=False, separators=(",", ":")).encode("ascii")


async def read_body(request: Request, max_bytes: int = DEFAULT_MAX_BODY) -> bytes:
    """The request body, refused with 413 as soon as it grows past ``max_bytes``."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise ApiError(400, "invalid_header", "Content-Length is not a number")
        if int(declared) > max_bytes:
            raise ApiError(413, "body_too_large", f"the body must be at most {max_bytes} bytes")
    chunks: list[bytes] = []
    size = 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_bytes:
                raise ApiError(413, "body_too_large", f"the body must be at most {max_bytes} bytes")
            chunks.append(chunk)
    except ClientDisconnect:
        raise ApiError(400, "client_disconnected", "the request body was cut short") from None
    return b"".join(chunks)


async def read_json(request: Request, max_bytes: int = DEFAULT_MAX_BODY) -> Any:
    """The request's JSON body: 415 unless it is declared JSON, 400 unless it parses (nesting
    deep enough to exhaust the parser's recursion limit included)."""
    content_type = request.headers.get("content-type", "")
    media_type = content_type.split(";", 1)[0].strip().lower()
    if media_type != "application/json" and not media_type.endswith("+json"):
        raise ApiError(415, "unsupported_media_type", "the body must be application/json")
    raw = await read_body(request, max_bytes)
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise ApiError(400, "invalid_json", "the body is not valid JSON") from None
    except RecursionError:
        raise ApiError(400, "invalid_json", "the body nests too deeply") from None


def require_method(request: Request, allowed: tuple[str, ...]) -> None:
    if request.method not in allowed:
        raise ApiError(
            405,
            "method_not_allowed",
            f"use {' or '.join(allowed)}",
            headers={"Allow": ", ".join(allowed)},
        )


Handler = Callable[[Request], Awaitable[Response]]

_internal_token: tuple[tuple[str, ...], bytes | None] | None = None


def internal_token() -> bytes | None:
    """``PUSH_INTERNAL_TOKEN`` (read as every secret is, :func:`shared.config.secret`), or None.
    Read once per process, and again only if the settings naming it change."""
    global _internal_token
    where = tuple(os.environ.get(name, "") for name in (
        INTERNAL_TOKEN_SETTING, f"{INTERNAL_TOKEN_SETTING}_FILE", "PUSH_SECRETS_DIR"))
    if _internal_token is None or _internal_token[0] != where:
        value = secret(INTERNAL_TOKEN_SETTING)
        _internal_token = (where, value.encode() if value else None)
    return _internal_token[1]


def internal_headers() -> dict[str, str]:
    """What a request to an internal function carries when the shared secret is configured."""
    token = internal_token()
    return {INTERNAL_TOKEN_HEADER: token.decode()} if token else {}


def _not_internal(request: Request) -> ApiError | None:
    """401 when the shared secret is configured and the request does not carry it (compared in
    constant time: the answer's timing tells nothing of the secret)."""
    expected = internal_token()
    if expected is None or request.url.path in READY_PATHS:
        return None
    given = request.headers.get(INTERNAL_TOKEN_HEADER, "").encode("latin-1", "replace")
    if hmac.compare_digest(given, expected):
        return None
    return ApiError(401, "unauthorized", f"this function takes requests only with {INTERNAL_TOKEN_HEADER}")



_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


async def serve(
    request: Request,
    handler: Handler,
    ready: Callable[[], Awaitable[None]],
    function: str,
    cors: CorsPolicy | None = None,
    internal: bool = False,
) -> Response:
    """Answer the platform's probes, then run ``handler``, turning refusals into JSON errors,
    and measure it: duration, count and errors by status class, requests in flight.

    ``ready`` raises when the function cannot serve (schema behind, database down): the readiness
    probe then fails, and so does every request, with a 503 that says why. An ``internal``
    function refuses requests without the shared secret, when one is configured.

    ``cors`` (browser-facing functions only): preflights are answered before any other work, and
    every answer, errors included, carries the CORS headers the caller's origin is allowed.
    """
    metrics.serve_metrics()  # started by the first request, in the process that serves it
    if request.url.path in HEALTH_PATHS:
        return JSONResponse({"status": "ok"})
    refused = _head_too_large(request) or (_not_internal(request) if internal else None)
    given = request.headers.get("x-request-id", "")
    rid = given if _REQUEST_ID.match(given) else uuid.uuid4().hex
    logs.request_id.set(rid)
    logs.event_id.set(None)
    started = time.perf_counter()
    in_flight = metrics.IN_FLIGHT.labels(function)
    in_flight.inc()
    try:
        if refused:
            response = refused.response()
        elif cors is not None and cors.is_preflight(request):
            response = cors.preflight(request)
        else:
            response = await _answer(request, handler, ready)
    finally:
        in_flight.dec()
    if cors is not None:
        cors.decorate(request, response)
    if request.url.path not in READY_PATHS:
        labels = (function, request.method, metrics.status_class(response.status_code))
        metrics.REQUEST_DURATION.labels(*labels).observe(time.perf_counter() - started)
        metrics.REQUESTS.labels(*labels).inc()
        if response.status_code >= 400:
            metrics.ERRORS.labels(function, getattr(response, "error_code", "unknown")).inc()
    response.headers["X-Request-Id"] = rid
    return response


def _head_too_large(request: Request) -> ApiError | None:
    """431 for a request head with too many header fields or too many bytes of them (a huge
    Authorization header among them), before the request is otherwise looked at."""
    raw = request.scope.get("headers") or []
    if len(raw) > MAX_HEADERS:
        return ApiError(
            431, "headers_too_large", f"a request may carry at most {MAX_HEADERS} header fields"
        )
    if sum(len(name) + len(value) for name, value in raw) > MAX_HEADER_BYTES:
        return ApiError(
            431, "headers_too_large", f"the request's header fields must total at most {MAX_HEADER_BYTES} bytes"
        )
    return None


async def _answer(request: Request, handler: Handler, ready: Callable[[], Awaitable[None]]) -> Response:
    try:
        await ready()
        if request.url.path in READY_PATHS:
            return JSONResponse({"status": "ready"})
        return await handler(request)
    except ApiError as error:
        return error.response()
    except SchemaBehind as exc:
        log.error("refusing to serve: %s", exc)
        return ApiError(503, "schema_behind", str(exc)).response()
    except DatabaseUnavailable:
        log.warning("database unavailable")
        return ApiError(
            503,
            "database_unavailable",
            "the database cannot be reached; try again later",
            headers={"Retry-After": str(DATABASE_RETRY_AFTER)},
        ).response()
    except Exception:
        log.exception("unexpected error")
        return ApiError(500, "internal_error", "the function failed; the error is logged").response()
