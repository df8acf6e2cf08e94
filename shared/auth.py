"""Who is calling: the wiki user named by the OAuth 2 access token in ``Authorization: Bearer``.

The wiki signs its access tokens as JWTs (RS256 or ES256). We only verify them: the public key
comes from ``PUSH_AUTH_PUBLIC_KEY`` (PEM text or file) or from the JWKS at ``PUSH_AUTH_JWKS_URL``.
Only asymmetric algorithms matching the key are accepted, so ``alg: none`` and HS256 tokens
"signed" with the public key are refused by construction. ``exp`` is required; ``iss`` and ``aud``
are checked when ``PUSH_AUTH_ISSUER`` / ``PUSH_AUTH_AUDIENCE`` are set; ``sub`` is the user id,
exactly: one with blanks around it or control characters in it is refused (:func:`is_user_id`).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from shared.config import ConfigError
from shared.http import ApiError
from shared.settings import read_setting
from shared.validation import is_text

log = logging.getLogger(__name__)

MAX_TOKEN_LENGTH = 8192
MAX_USER_ID_LENGTH = 64


@dataclass(frozen=True)
class Authenticator:
    """Checks bearer tokens. Build it with :meth:`from_env` at start-up."""

    public_key: object | None
    algorithms: tuple[str, ...]
    jwks: jwt.PyJWKClient | None = None
    issuer: str | None = None
    audience: str | None = None
    leeway: int = 30

    @classmethod
    def from_env(cls) -> Authenticator:
        issuer = read_setting("PUSH_AUTH_ISSUER")
        audience = read_setting("PUSH_AUTH_AUDIENCE")
        leeway = read_setting("PUSH_AUTH_LEEWAY_SECONDS")
        jwks_url = read_setting("PUSH_AUTH_JWKS_URL")
        pem = read_setting("PUSH_AUTH_PUBLIC_KEY")
        if pem is None and jwks_url is None:
            raise ConfigError(
                "PUSH_AUTH_PUBLIC_KEY (or PUSH_AUTH_JWKS_URL) is not set: subscribe and "
                "unsubscribe need the wiki's public key to check access tokens"
            )
        if pem is not None:
            key, algorithm = load_public_key(pem)
            return cls(key, (algorithm,), None, issuer, audience, leeway)
        jwks = jwt.PyJWKClient(jwks_url, cache_keys=True, lifespan=300, timeout=5)
        return cls(None, ("RS256", "ES256"), jwks, issuer, audience, leeway)

    def user_id(self, authorization: str | None) -> str:
        """The caller's user id, or :class:`ApiError` 401. With a JWKS it may block on fetching
        the keys: call it from a worker thread then."""
        if not authorization:
            raise _unauthorized("missing_token", "an Authorization: Bearer token is required")
        scheme, _, token = authorization.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise _unauthorized("invalid_token", "the Authorization header must be Bearer <token>")
        if len(token) > MAX_TOKEN_LENGTH:
            raise _unauthorized("invalid_token", "the access token is too long")
        try:
            key = self.public_key
            if self.jwks is not None:
                key = self.jwks.get_signing_key_from_jwt(token).key
            claims = jwt.decode(
                token,
                key,
                algorithms=list(self.algorithms),
                issuer=self.issuer,
                audience=self.audience,
                leeway=self.leeway,
                options={
                    "require": ["exp", "sub"],
                    "verify_aud": self.audience is not None,
                    "verify_iss": self.issuer is not None,
                },
            )
        except jwt.ExpiredSignatureError:
            raise _unauthorized("expired_token", "the access token has expired") from None
        except jwt.PyJWKClientConnectionError:
            log.warning("cannot fetch the JWKS to check an access token")
            raise ApiError(
                503, "auth_unavailable", "cannot check access tokens now; try again later",
                headers={"Retry-After": "5"},
            ) from None
        except jwt.PyJWTError:
            raise _unauthorized("invalid_token", "the access token is not valid") from None
        sub = claims.get("sub")
        if not isinstance(sub, str) or not is_user_id(sub):
            raise _unauthorized("invalid_token", "the access token names no user")
        return sub


def is_user_id(value: str) -> bool:
    """Whether ``value`` can be a user id: 1 to 64 characters of UTF-8 text, without white
    space around it and without control or other unprintable characters in it. A user id is
    compared exactly everywhere (the database included, migration 0005), so ``"123 "`` would
    be another user than ``"123"``: no wiki names one so, and a token that does is refused."""
    return (
        0 < len(value) <= MAX_USER_ID_LENGTH
        and is_text(value)
        and value.strip() == value
        and value.isprintable()
    )


def load_public_key(pem: str) -> tuple[object, str]:
    """The key and the one algorithm it may verify: RS256 for RSA, ES256 for EC P-256."""
    try:
        key = load_pem_public_key(pem.encode())
    except ValueError:
        raise ConfigError("PUSH_AUTH_PUBLIC_KEY is not a PEM public key") from None
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size < 2048:
            raise ConfigError("PUSH_AUTH_PUBLIC_KEY: RSA keys must have at least 2048 bits")
        return key, "RS256"
    if isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP256R1):
        return key, "ES256"
    raise ConfigError("PUSH_AUTH_PUBLIC_KEY must be an RSA or EC P-256 public key")


def _unauthorized(code: str, message: str) -> ApiError:
    # RFC 6750 section 3: no error attribute when no token was sent, invalid_token otherwise.
    challenge = "Bearer" if code == "missing_token" else 'Bearer error="invalid_token"'
    return ApiError(401, code, message, headers={"WWW-Authenticate": challenge})
