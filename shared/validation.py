"""Turning the JSON bodies apps send to subscribe and unsubscribe into validated requests.

Every problem raises :class:`shared.http.ApiError` (400) naming the field, so apps learn exactly
what to fix and nothing half-valid reaches the database.
"""
from __future__ import annotations

import base64
import binascii
import ipaddress
import json
import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from cryptography.hazmat.primitives.asymmetric import ec

from shared.apps import Apps, load_apps
from shared.core import PROVIDERS
from shared.endpoints import HOST_LABEL, EndpointRules
from shared.http import ApiError
from shared.settings import read_setting
from shared.subscriptions import NewSubscription

MAX_TOKEN_LENGTH = 4096
MAX_ENDPOINT_LENGTH = 2048
# Apple's device tokens are 32 bytes today and documented as variable length; 100 bytes is the
# largest Apple has said to expect.
MAX_APNS_TOKEN_LENGTH = 200
APNS_TOKEN = re.compile(r"^[0-9a-fA-F]{64,200}$")
# Bundle ids: alphanumerics, hyphens and dots, with Apple's suffixes (".voip", ".complication").
APNS_TOPIC = re.compile(r"^[A-Za-z0-9][A-Za-z0-9.-]{0,254}$")
FCM_TOKEN = re.compile(r"^[\x21-\x7e]+$")  # visible ASCII, no blanks
# These patterns are used with fullmatch: with re.match, "$" also matches before a final "\n",
# which let a token or topic ending in a newline through.
ENVIRONMENTS = ("production", "sandbox")


def is_text(value: str) -> bool:
    """Whether ``value`` is text UTF-8 can encode. JSON's ``"\\ud800"`` escape decodes to a lone
    surrogate, which hashing, the database driver and the providers all fail to encode: such a
    string is refused where it comes in, naming its field."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def valid_fcm_token(token: str) -> bool:
    """Whether ``token`` is what subscribe accepts as an FCM registration token."""
    return len(token) <= MAX_TOKEN_LENGTH and FCM_TOKEN.fullmatch(token) is not None


def apns_device_token(token: str) -> str | None:
    """The APNs device token as stored (lower-case hex, so one device has one hash), or
    ``None`` when ``token`` is not a device token in hex."""
    if len(token) > MAX_APNS_TOKEN_LENGTH or len(token) % 2 or not APNS_TOKEN.fullmatch(token):
        return None
    return token.lower()


def valid_apns_topic(topic: str) -> bool:
    """Whether ``topic`` has the form of an app bundle id."""
    return APNS_TOPIC.fullmatch(topic) is not None


@dataclass(frozen=True)
class SubscribeSettings:
    """What subscribe accepts beyond the formats: the APNs topics (bundle ids) of our apps, and
    where Web Push endpoints may lead (:mod:`shared.endpoints`: the browser push services)."""

    allowed_apns_topics: tuple[str, ...] = ()
    apps: Apps = Apps({})
    endpoint_rules: EndpointRules = EndpointRules()

    @classmethod
    def from_env(cls, apps: Apps | None = None) -> SubscribeSettings:
        """Subscribe's, and the Echo import's: ``PUSH_APNS_ALLOWED_TOPICS``, ``PUSH_APPS`` unless
        ``apps`` is given, ``PUSH_WEBPUSH_ALLOWED_HOSTS`` and ``PUSH_WEBPUSH_ALLOW_LOCAL_ENDPOINTS``."""
        return cls(
            allowed_apns_topics=read_setting("PUSH_APNS_ALLOWED_TOPICS"),
            apps=load_apps() if apps is None else apps,
            endpoint_rules=EndpointRules.from_env(),
        )


def apns_topic_allowed(topic: str, policy: SubscribeSettings) -> bool:
    """Whether this service takes subscriptions for ``topic`` (``PUSH_APNS_ALLOWED_TOPICS``;
    unset: any)."""
    return not policy.allowed_apns_topics or topic in policy.allowed_apns_topics


def parse_subscribe(body: Any, policy: SubscribeSettings) -> NewSubscription:
    subscription = _parse_subscribe(body, policy)
    app = _app(body, subscription, policy.apps)
    return NewSubscription(
        subscription.provider, subscription.token, subscription.identity,
        subscription.topic, subscription.environment, app,
    )


def _app(body: dict[str, Any], subscription: NewSubscription, apps: Apps) -> str | None:
    """The app a subscription names: given as ``app``, or for APNs implied by the topic."""
    app = body.get("app")
    if app is not None:
        if not isinstance(app, str) or app not in apps.names(subscription.provider):
            raise ApiError(400, "invalid_field", f"app is not a {subscription.provider} app of this service", "app")
    if subscription.provider == "apns" and apps.settings:
        implied = apps.app_for_topic(subscription.topic or "")
        if app is not None and implied != app:
            raise ApiError(400, "invalid_field", f"topic is not one of the bundle ids of {app}", "topic")
        return implied
    return app


def _parse_subscribe(body: Any, policy: SubscribeSettings) -> NewSubscription:
    obj = _object(body)
    provider = _provider(obj)
    if provider == "fcm":
        _only(obj, {"provider", "token", "app"})
        token = _string(obj, "token", MAX_TOKEN_LENGTH)
        if not valid_fcm_token(token):
            raise ApiError(400, "invalid_field", "token must be visible ASCII without blanks", "token")
        return NewSubscription("fcm", token, token)
    if provider == "apns":
        _only(obj, {"provider", "token", "topic", "environment", "app"})
        token = _apns_token(obj)
        topic = _string(obj, "topic", 255)
        if not valid_apns_topic(topic):
            raise ApiError(400, "invalid_field", "topic must be an app bundle id", "topic")
        if not apns_topic_allowed(topic, policy):
            raise ApiError(400, "invalid_field", "topic is not one of this service's apps", "topic")
        environment = obj.get("environment", "production")
        if environment not in ENVIRONMENTS:
            raise ApiError(
                400, "invalid_field", "environment must be production or sandbox", "environment"
            )
        return NewSubscription("apns", token, token, topic=topic, environment=environment)
    _only(obj, {"provider", "subscription", "app"})
    subscription = obj.get("subscription")
    if not isinstance(subscription, dict):
        raise ApiError(400, "invalid_field", "subscription must be an object", "subscription")
    endpoint, p256dh, auth = _webpush_subscription(subscription, policy.endpoint_rules)
    canonical = json.dumps(
        {"endpoint": endpoint, "keys": {"p256dh": p256dh, "auth": auth}}, separators=(",", ":")
    )
    return NewSubscription("webpush", canonical, endpoint)


@dataclass(frozen=True)
class UnsubscribeRequest:
    """Either every subscription of the caller (``all``), or the one device ``identity`` names."""

    all: bool
    identity: str | None = None
    provider: str | None = None


def parse_unsubscribe(body: Any) -> UnsubscribeRequest:
    obj = _object(body)
    if "all" in obj:
        _only(obj, {"all"})
        if obj["all"] is not True:
            raise ApiError(400, "invalid_field", "all must be true", "all")
        return UnsubscribeRequest(all=True)
    provider = _provider(obj)
    if provider == "webpush":
        _only(obj, {"provider", "endpoint"})
        return UnsubscribeRequest(False, _endpoint(obj.get("endpoint"), "endpoint"), provider)
    _only(obj, {"provider", "token"})
    if provider == "apns":
        return UnsubscribeRequest(False, _apns_token(obj), provider)
    return UnsubscribeRequest(False, _string(obj, "token", MAX_TOKEN_LENGTH), provider)


def _object(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise ApiError(400, "invalid_body", "the body must be a JSON object")
    return body


def _provider(obj: dict[str, Any]) -> str:
    provider = obj.get("provider")
    if provider is None:
        raise ApiError(400, "missing_field", "provider is required", "provider")
    if provider not in PROVIDERS:
        raise ApiError(
            400, "invalid_field", f"provider must be one of {', '.join(PROVIDERS)}", "provider"
        )
    return provider


def _only(obj: dict[str, Any], allowed: set[str]) -> None:
    for key in obj:
        if key not in allowed:
            raise ApiError(400, "unknown_field", f"{key} is not a field of this request", key)


def _string(obj: dict[str, Any], field: str, max_length: int) -> str:
    value = obj.get(field)
    if value is None:
        raise ApiError(400, "missing_field", f"{field} is required", field)
    if not isinstance(value, str) or not value:
        raise ApiError(400, "invalid_field", f"{field} must be a non-empty string", field)
    if not is_text(value):
        raise ApiError(400, "invalid_field", f"{field} must be UTF-8 text", field)
    if len(value) > max_length:
        raise ApiError(400, "invalid_field", f"{field} is longer than {max_length}", field)
    return value


def _apns_token(obj: dict[str, Any]) -> str:
    token = apns_device_token(_string(obj, "token", MAX_APNS_TOKEN_LENGTH))
    if token is None:
        raise ApiError(400, "invalid_field", "token must be the device token in hex", "token")
    return token


def _webpush_subscription(subscription: dict[str, Any], rules: EndpointRules) -> tuple[str, str, str]:
    for key in subscription:
        if key not in ("endpoint", "keys", "expirationTime"):
            raise ApiError(
                400, "unknown_field", f"subscription.{key} is not a field", f"subscription.{key}"
            )
    endpoint = _endpoint(subscription.get("endpoint"), "subscription.endpoint")
    _reachable(endpoint, "subscription.endpoint")
    parts = urlsplit(endpoint)
    if "@" in parts.netloc:  # user information, even empty ("https://@host/"): never a push service's
        raise ApiError(
            400, "invalid_field", "subscription.endpoint must not hold user information", "subscription.endpoint"
        )
    refusal = rules.refusal(parts.hostname or "", parts.port)
    if refusal is not None:
        raise ApiError(
            400, "invalid_field", f"subscription.endpoint {refusal.message}", "subscription.endpoint"
        )
    keys = subscription.get("keys")
    if not isinstance(keys, dict):
        raise ApiError(400, "missing_field", "subscription.keys is required", "subscription.keys")
    p256dh = _base64url(keys.get("p256dh"), "subscription.keys.p256dh", 200)
    try:
        ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), p256dh[1])
        if len(p256dh[1]) != 65:
            raise ValueError("compressed")
    except ValueError:
        raise ApiError(
            400,
            "invalid_field",
            "subscription.keys.p256dh must be an uncompressed P-256 public key",
            "subscription.keys.p256dh",
        ) from None
    auth = _base64url(keys.get("auth"), "subscription.keys.auth", 64)
    if len(auth[1]) != 16:
        raise ApiError(
            400, "invalid_field", "subscription.keys.auth must be 16 bytes", "subscription.keys.auth"
        )
    return endpoint, p256dh[0], auth[0]


def _endpoint(value: Any, field: str) -> str:
    if value is None:
        raise ApiError(400, "missing_field", f"{field} is required", field)
    if not isinstance(value, str) or len(value) > MAX_ENDPOINT_LENGTH:
        raise ApiError(400, "invalid_field", f"{field} must be a URL of at most 2048 characters", field)
    if not is_text(value):
        raise ApiError(400, "invalid_field", f"{field} must be UTF-8 text", field)
    try:
        parts = urlsplit(value)
        host = parts.hostname
    except ValueError:
        host = None
        parts = None
    if parts is None or parts.scheme != "https" or not host or parts.username or parts.password:
        raise ApiError(400, "invalid_field", f"{field} must be an https URL", field)
    return value


def _reachable(endpoint: str, field: str) -> None:
    """Refuse, at subscribe, an endpoint no request can ever reach, which would otherwise fail
    inside the provider at every send: a port outside 1-65535, or a host that is neither an IP
    literal nor a host name IDNA can encode. Blanks and control characters are refused anywhere
    in it (push services' URLs never hold them), as urlsplit silently drops tabs and newlines:
    the host checked would not be the one sent to. Unsubscribe does not check this, so every
    endpoint stored before can still be removed."""
    refused = ApiError(400, "invalid_field", f"{field} must be an https URL with a valid host and port", field)
    if " " in endpoint or not endpoint.isprintable():
        raise refused
    parts = urlsplit(endpoint)
    try:
        port = parts.port
    except ValueError:  # not a number, or over 65535
        raise refused from None
    if port == 0:
        raise refused
    host = (parts.hostname or "").removesuffix(".")
    try:
        ipaddress.ip_address(host)
        return
    except ValueError:
        pass
    try:
        ascii_host = host.encode("idna").decode("ascii")
    except UnicodeError:  # an empty label, or one longer than 63
        raise refused from None
    labels = ascii_host.split(".")
    # A last label of digits only makes an IPv4 address, and this is not one.
    if len(ascii_host) > 253 or labels[-1].isdigit():
        raise refused
    if not all(HOST_LABEL.fullmatch(label) for label in labels):
        raise refused


def _base64url(value: Any, field: str, max_length: int) -> tuple[str, bytes]:
    """The value without padding, and its bytes. Browsers send unpadded base64url; some
    libraries pad it, so both are accepted and stored unpadded."""
    if value is None:
        raise ApiError(400, "missing_field", f"{field} is required", field)
    if not isinstance(value, str) or not value or len(value) > max_length:
        raise ApiError(400, "invalid_field", f"{field} must be a base64url string", field)
    stripped = value.rstrip("=")
    if not re.fullmatch(r"[A-Za-z0-9_-]+", stripped):
        raise ApiError(400, "invalid_field", f"{field} must be a base64url string", field)
    try:
        raw = base64.urlsafe_b64decode(stripped + "=" * (-len(stripped) % 4))
    except (binascii.Error, ValueError):
        raise ApiError(400, "invalid_field", f"{field} must be a base64url string", field) from None
    return stripped, raw
