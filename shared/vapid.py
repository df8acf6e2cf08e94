"""VAPID keys (RFC 8292): loading, generating, and the public key browsers subscribe with.

Kept apart from the Web Push provider because two sides need them: dispatch-webpush signs with
the private key, and subscribe publishes the public key (``GET /vapid-public-key``) that a web
page passes to ``PushManager.subscribe()`` as ``applicationServerKey``. This module needs only
``cryptography``, which every image has; http_ece and py-vapid stay in dispatch-webpush's image.
"""
from __future__ import annotations

import base64
import hashlib
import os
from dataclasses import dataclass
from typing import NamedTuple

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from shared.apps import Apps
from shared.config import ConfigError
from shared.settings import read_setting

PRIVATE_KEY_VAR = "PUSH_VAPID_PRIVATE_KEY"
PUBLIC_KEY_VAR = "PUSH_VAPID_PUBLIC_KEY"


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
    return VapidKeys(b64url_encode(raw_private), public_key_b64(key))


def load_private_key(text: str, setting: str = PRIVATE_KEY_VAR) -> ec.EllipticCurvePrivateKey:
    """The VAPID signing key from a raw base64url scalar or a PEM; errors name ``setting`` and
    never echo the value."""
    text = text.strip()
    if text.startswith("-----BEGIN"):
        try:
            key = serialization.load_pem_private_key(text.encode(), password=None)
        except (ValueError, TypeError, UnsupportedAlgorithm):
            raise ConfigError(f"{setting} is not a readable unencrypted PEM private key") from None
        if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != "secp256r1":
            raise ConfigError(f"{setting} must be a P-256 (prime256v1) EC key")
        return key
    try:
        raw = b64url_decode(text)
    except ValueError:
        raise ConfigError(f"{setting} must be a PEM or the base64url raw 32-byte private key") from None
    if len(raw) != 32:
        raise ConfigError(
            f"{setting} must be a PEM or the base64url raw 32-byte private key, not {len(raw)} bytes"
        )
    try:
        return ec.derive_private_key(int.from_bytes(raw, "big"), ec.SECP256R1())
    except ValueError:
        raise ConfigError(f"{setting} is not a valid P-256 private key") from None


def public_key_b64(key: ec.EllipticCurvePrivateKey) -> str:
    """The uncompressed public point, base64url: VAPID's ``k=`` and ``applicationServerKey``."""
    point = key.public_key().public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )
    return b64url_encode(point)


def check_public_key(text: str, setting: str = PUBLIC_KEY_VAR) -> str:
    """A published public key in its canonical form (base64url, no padding), checked to be a
    point on P-256: a browser refuses any other ``applicationServerKey``."""
    try:
        point = b64url_decode(text.strip())
        ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), point)
    except ValueError:
        raise ConfigError(
            f"{setting} must be the base64url uncompressed P-256 public key "
            "(`pushctl vapid-keygen` prints it)"
        ) from None
    if len(point) != 65:
        raise ConfigError(f"{setting} must be the uncompressed (65-byte) P-256 public key")
    return b64url_encode(point)


def matching_public_key(
    public: str | None, private: str | None, public_setting: str, private_setting: str
) -> str | None:
    """The public key to publish, from the published setting or derived from the private key.

    With both, they must be one pair: pages would otherwise subscribe with a key the dispatcher
    does not sign with, and every push service would refuse every push (403). A private key
    given as the path of a file this function is not given (mounted in dispatch-webpush only, as
    it should be) counts as absent: subscribe needs only the public key.
    """
    if private is not None and private.startswith("/") and not os.path.exists(private):
        private = None
    derived = public_key_b64(load_private_key(private, private_setting)) if private else None
    if public is None:
        return derived
    published = check_public_key(public, public_setting)
    if derived is not None and derived != published:
        raise ConfigError(f"{public_setting} is not the public key of {private_setting}")
    return published


@dataclass(frozen=True)
class PublishedKey:
    """One app's public key, as ``GET /vapid-public-key`` serves it."""

    public_key: str
    etag: str
    """A strong validator: the key's digest, so a rotated key is never served from a cache that
    revalidates."""


def published_keys(apps: Apps) -> dict[str | None, PublishedKey]:
    """Per app (``None``: the default app), the VAPID public key subscribe publishes.

    From ``PUSH_VAPID_PUBLIC_KEY`` and ``PUSH_APPS.<app>.webpush.vapid_public_key``, or derived
    from the private key where this function is given it; an app with neither publishes none.
    """
    found = {
        None: matching_public_key(read_setting(PUBLIC_KEY_VAR), read_setting(PRIVATE_KEY_VAR), PUBLIC_KEY_VAR, PRIVATE_KEY_VAR)
    }
    for app in sorted(apps.names("webpush")):
        section = apps.settings[app]["webpush"]
        where = f"PUSH_APPS.{app}.webpush"
        public = section.get("vapid_public_key")
        if public is not None and not isinstance(public, str):
            raise ConfigError(f"{where}.vapid_public_key must be a string")
        found[app] = matching_public_key(
            public, section.get("vapid_private_key"), f"{where}.vapid_public_key", f"{where}.vapid_private_key"
        )
    return {
        app: PublishedKey(key, '"' + hashlib.sha256(key.encode()).hexdigest()[:32] + '"')
        for app, key in found.items()
        if key is not None
    }


def b64url_encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64url_decode(text: str) -> bytes:
    """Base64url with or without padding (standard base64, which some stores keep, too).

    Raises ``ValueError`` (``binascii.Error``) on anything else, rather than silently skipping
    stray characters as the non-validating decoder would.
    """
    return base64.b64decode(text + "=" * (-len(text) % 4), altchars=b"-_", validate=True)
