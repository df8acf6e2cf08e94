"""Subscribe request bodies as apps send them, with fresh tokens and real Web Push keys."""
from __future__ import annotations

import base64
import secrets

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

TOPIC = "org.wikimedia.wikipedia"


def b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def fcm_token() -> str:
    return "fcm:" + secrets.token_urlsafe(120)


def apns_token() -> str:
    return secrets.token_hex(32)


def fcm(token: str | None = None) -> dict:
    return {"provider": "fcm", "token": token or fcm_token()}


def apns(token: str | None = None, topic: str = TOPIC, environment: str = "production") -> dict:
    return {"provider": "apns", "token": token or apns_token(), "topic": topic, "environment": environment}


def webpush_keys() -> dict:
    public = ec.generate_private_key(ec.SECP256R1()).public_key()
    point = public.public_bytes(serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)
    return {"p256dh": b64url(point), "auth": b64url(secrets.token_bytes(16))}


def webpush(endpoint: str | None = None) -> dict:
    endpoint = endpoint or f"https://updates.push.services.mozilla.com/wpush/v2/{secrets.token_urlsafe(24)}"
    return {"provider": "webpush", "subscription": {"endpoint": endpoint, "keys": webpush_keys()}}
