"""CORS for the browser-facing functions (subscribe, unsubscribe): which web pages may call them.

A page on a wiki's origin calling subscribe on the service's origin sends a preflight first: the
request carries ``Authorization`` and a JSON body, neither of which a browser sends cross-origin
unasked. Only the origins listed in ``PUSH_CORS_ALLOWED_ORIGINS`` are answered with
``Access-Control-*`` headers; a browser blocks every other page from reading the answer. The
list holds exact origins and never ``*``: the wildcard would let any site that obtained a user's
token drive the API from its own pages, and it says nothing a reviewer can check.

Every answer, errors included, carries the headers for an allowed origin, so a page can read why
it was refused (401, 400, 413, 429 with Retry-After, 503). ``Vary: Origin`` goes on every answer,
because the answer differs by origin and a shared cache must not hand one origin's to another.
No ``Access-Control-Allow-Credentials``: the bearer token travels in a header the page sets, not
in a cookie, so requests need no credentials mode.

The dispatchers and clean-up are not browser-facing and build no policy: no cost there.
"""
from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlsplit

from starlette.requests import Request
from starlette.responses import Response

from shared.config import ConfigError
from shared.http import ApiError
from shared.settings import read_setting

ORIGINS_VAR = "PUSH_CORS_ALLOWED_ORIGINS"
#: How long a browser may reuse a preflight's answer. Chromium caps it at 7200 s; Firefox at a day.
MAX_AGE_SECONDS = 7200
#: What a page may send: the token, a JSON body, and our request id for tracing.
ALLOWED_HEADERS = "Authorization, Content-Type, X-Request-Id"
#: What a page may read beyond the CORS-safelisted headers: the reason for a 401, when to retry
#: after a 429 or 503, the request id to quote in a report, the key's validator.
EXPOSED_HEADERS = "Retry-After, WWW-Authenticate, X-Request-Id, ETag"
DEFAULT_PORTS = {"http": 80, "https": 443}


def allowed_origins_from_env() -> frozenset[str]:
    """``PUSH_CORS_ALLOWED_ORIGINS``, each origin checked; empty when unset (no page may call)."""
    return frozenset(canonical_origin(origin) for origin in read_setting(ORIGINS_VAR))


@dataclass(frozen=True)
class CorsPolicy:
    """The origins allowed to call one function, and the methods it serves."""

    origins: frozenset[str]
    methods: tuple[str, ...]

    def is_preflight(self, request: Request) -> bool:
        return request.method == "OPTIONS" and "access-control-request-method" in request.headers

    def preflight(self, request: Request) -> Response:
        """The answer to a preflight: 204 with the allowances for a listed origin; for any other,
        403 without them, and the browser blocks the request it was asking about."""
        origin = request.headers.get("origin")
        if origin not in self.origins:
            return ApiError(403, "origin_not_allowed", f"this origin is not in {ORIGINS_VAR}").response()
        return Response(
            status_code=204,
            headers={
                "Access-Control-Allow-Methods": ", ".join(self.methods),
                "Access-Control-Allow-Headers": ALLOWED_HEADERS,
                "Access-Control-Max-Age": str(MAX_AGE_SECONDS),
            },
        )

    def decorate(self, request: Request, response: Response) -> None:
        """Add the CORS headers an answer to ``request`` needs (a preflight's included)."""
        vary = response.headers.get("vary")
        response.headers["Vary"] = f"{vary}, Origin" if vary else "Origin"
        origin = request.headers.get("origin")
        if origin in self.origins:
            response.headers["Access-Control-Allow-Origin"] = origin
            response.headers["Access-Control-Expose-Headers"] = EXPOSED_HEADERS


def canonical_origin(text: str) -> str:
    """An origin as browsers send it in ``Origin`` (lower-case scheme and host, no default
    port), or :class:`ConfigError` saying what is wrong with it."""
    if "*" in text:
        raise ConfigError(
            f"{ORIGINS_VAR} must list exact origins (e.g. https://en.wikipedia.org), not {text!r}: "
            "a wildcard would let any site's pages call the API with a user's token"
        )
    try:
        url = urlsplit(text)
        port = url.port
    except ValueError:
        raise ConfigError(f"{ORIGINS_VAR}: {text!r} is not an origin") from None
    if url.scheme not in DEFAULT_PORTS or not url.hostname:
        raise ConfigError(f"{ORIGINS_VAR}: {text!r} is not an http or https origin (scheme://host[:port])")
    if url.path or url.query or url.fragment or url.username is not None or url.password is not None:
        raise ConfigError(
            f"{ORIGINS_VAR}: {text!r} is not an origin: write scheme://host[:port], "
            "without a path (not even a trailing /), query or user"
        )
    if not url.hostname.isascii():
        raise ConfigError(f"{ORIGINS_VAR}: write {text!r}'s host in its ASCII (punycode) form, as browsers send it")
    host = url.hostname if ":" not in url.hostname else f"[{url.hostname}]"
    if port is None or port == DEFAULT_PORTS[url.scheme]:
        return f"{url.scheme}://{host}"
    return f"{url.scheme}://{host}:{port}"
