"""The event contract: parsing the CloudEvents the functions receive, and making the ones they send.

Producers (Echo, other services) post ``org.wikimedia.push.notification.requested.v1``; the
dispatchers report dead tokens as ``org.wikimedia.push.subscription.invalid.v1``; a schedule sends
``dev.knative.sources.ping``. Binary and structured CloudEvents are both accepted. A malformed
event is answered 400 (not an event, missing attribute, data not JSON) or 422 (data of the wrong
shape), which the broker does not retry.

The data of both event types is published as JSON Schema in ``openapi/events/``, for producers;
``tests/test_event_schemas.py`` holds those schemas and the parsers here to the same verdicts, so
a rule changed here is changed there too.
"""
from __future__ import annotations

import hashlib
import json
import re
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from cloudevents.conversion import to_binary
from cloudevents.exceptions import GenericException
from cloudevents.http import CloudEvent, from_http
from starlette.requests import Request

from shared.core import NOTIFICATION_REQUESTED, PING, SUBSCRIPTION_INVALID
from shared.http import ApiError, internal_headers, read_body
from shared.settings import NotificationSettings
from shared.validation import is_text


MAX_EVENT_BYTES = 256 * 1024
MAX_USER_ID_LENGTH = 64
MAX_EVENT_TYPE_LENGTH = 64
MAX_TTL_SECONDS = 28 * 24 * 3600  # FCM's and Web Push services' longest
MAX_SUBSCRIPTION_ID = 2**63 - 1  # the largest id a signed 64-bit column holds
MAX_REASON_LENGTH = 64
MAX_REPORTED_SUBSCRIPTIONS = 10_000
SHA256_HEX = re.compile(r"[0-9a-fA-F]{64}")
# RFC 3339's date-time, as written: a date, T, a time, an offset (Z or +hh:mm), T and Z in either
# case; not year 0, which RFC 3339 allows and datetime has not. datetime.fromisoformat alone takes
# much more (a date alone, a time without offset read as UTC, ISO week dates, any separator). The
# subscription.invalid.v1 schema's pattern for observed_at is this one; the calendar (February
# 30) is left to fromisoformat.
RFC3339_DATE_TIME = re.compile(
    r"(?!0000)[0-9]{4}-(?:0[1-9]|1[0-2])-(?:0[1-9]|[12][0-9]|3[01])[Tt]"
    r"(?:[01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](?:\.[0-9]+)?"
    r"(?:[Zz]|[+-](?:[01][0-9]|2[0-3]):[0-5][0-9])"
)


async def read_cloud_event(request: Request, max_bytes: int = MAX_EVENT_BYTES) -> CloudEvent:
    """The request as a CloudEvent, binary or structured; 400 when it is not one.

    Where ``PUSH_CONNECTOR_EVENT_TYPE`` is set, an OpenFaaS connector's plain request is read as
    the CloudEvent it stands for (see :mod:`shared.connectors`); real CloudEvents never are."""
    from shared.connectors import connector_event

    body = await read_body(request, max_bytes)
    event = _binary_event(request.scope["headers"], body)
    if event is not None:
        return event
    try:
        event = connector_event(request.headers, body)
        if event is None:
            event = from_http(dict(request.headers), body)
    except GenericException as exc:
        raise ApiError(400, "not_a_cloudevent", f"not a valid CloudEvent: {exc}") from None
    except (ValueError, TypeError, AttributeError, KeyError, RecursionError):
        # The SDK lets some malformed structured bodies (not UTF-8, JSON of the wrong shape or
        # nested past the parser's recursion limit) escape as plain exceptions.
        raise ApiError(400, "not_a_cloudevent", "not a valid CloudEvent") from None
    for name, value in event.get_attributes().items():
        if isinstance(value, str) and not is_text(value):
            raise ApiError(400, "not_a_cloudevent", f"the {name} attribute is not UTF-8 text", name)
    return event


_ATTRIBUTE_NAME = re.compile(r"[a-z0-9]+")
_REQUIRED = frozenset(("id", "source", "type"))


def _binary_event(headers: list[tuple[bytes, bytes]], body: bytes) -> CloudEvent | None:
    """The event of a well-formed binary-mode CloudEvents 1.0 request, read straight from the
    request's raw headers: what Echo and the broker send, the events a dispatcher's CPU goes to.
    ``None`` for anything else (structured mode, version 0.3, a required attribute missing, odd
    attribute names, data past the JSON parser's limits), which goes through the SDK and its
    errors as before.

    The event is the one the SDK's ``from_http`` makes of the same request: every ``ce-``
    header an attribute (the first of repeated ones), ``Content-Type`` as ``datacontenttype``,
    the body parsed as JSON where it is JSON and kept as bytes where not, no body as no data.
    The SDK's route there (a marshaller choosing among converters, an event object of
    per-attribute property objects, then a copy into the ``CloudEvent``) cost three times as much
    CPU: 19-20 us per event against 6.6 (``python bench/micro.py``)."""
    attributes: dict[str, str] = {}
    content_type = None
    for name, raw in headers:
        if name.startswith(b"ce-"):
            key = name[3:].decode("latin-1")
            if key not in attributes:
                if not _ATTRIBUTE_NAME.fullmatch(key) or key in ("data", "extensions", "datacontenttype"):
                    return None
                attributes[key] = raw.decode("latin-1")  # as Starlette's headers decode values
        elif name == b"content-type" and content_type is None:
            content_type = raw.decode("latin-1")
    if attributes.get("specversion") != "1.0" or not _REQUIRED <= attributes.keys():
        return None
    if content_type is not None:
        if content_type.startswith("application/cloudevents"):
            return None
        attributes["datacontenttype"] = content_type
    data: Any = None
    if body:
        try:
            data = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError):
            data = body  # what the SDK keeps of a body that is not JSON
        except (ValueError, RecursionError):
            return None  # JSON past the parser's limits: the SDK refuses it
    return CloudEvent(attributes, data)


def is_cloud_event(request: Request) -> bool:
    """Whether the request claims to carry a CloudEvent (binary headers or structured type)."""
    content_type = request.headers.get("content-type", "")
    return "ce-specversion" in request.headers or content_type.startswith("application/cloudevents")


def event_key(event: CloudEvent) -> str:
    """What identifies an event across redeliveries: CloudEvents' own rule, source plus id."""
    return hashlib.sha256(f"{event['source']}\n{event['id']}".encode()).hexdigest()


def data_object(event: CloudEvent) -> dict[str, Any]:
    data = event.data
    if isinstance(data, (bytes, str)):
        try:
            data = json.loads(data)
        except (ValueError, RecursionError):
            raise ApiError(400, "invalid_json", "the event data is not valid JSON") from None
    if not isinstance(data, dict):
        raise ApiError(422, "invalid_data", "the event data must be a JSON object")
    return data


@dataclass(frozen=True)
class NotificationRequest:
    users: tuple[str, ...]
    message_type: str
    event_type: str | None
    dry_run: bool
    ttl_seconds: int


def parse_notification(data: dict[str, Any], policy: NotificationSettings) -> NotificationRequest:
    """Validate ``notification.requested.v1`` data; 422 naming the field when it is wrong."""
    for key in data:
        if key not in ("users", "message_type", "event_type", "dry_run", "ttl_seconds"):
            raise _invalid(key, f"{key} is not a field of {NOTIFICATION_REQUESTED}")
    users = data.get("users")
    if not isinstance(users, list) or not users:
        raise _invalid("users", "users must be a non-empty list of user ids")
    if len(users) > policy.max_users:
        raise _invalid("users", f"at most {policy.max_users} users per event")
    for user in users:
        if not isinstance(user, str) or not user or len(user) > MAX_USER_ID_LENGTH or not is_text(user):
            raise _invalid(
                "users", f"each user id must be UTF-8 text of 1 to {MAX_USER_ID_LENGTH} characters"
            )
    message_type = data.get("message_type")
    if message_type not in policy.message_types:
        raise _invalid("message_type", f"message_type must be one of {', '.join(policy.message_types)}")
    event_type = data.get("event_type")
    if event_type is not None and (
        not isinstance(event_type, str) or not 0 < len(event_type) <= MAX_EVENT_TYPE_LENGTH
        or not is_text(event_type)
    ):
        raise _invalid(
            "event_type", f"event_type must be UTF-8 text of 1 to {MAX_EVENT_TYPE_LENGTH} characters"
        )
    dry_run = data.get("dry_run", False)
    if not isinstance(dry_run, bool):
        raise _invalid("dry_run", "dry_run must be true or false")
    ttl = data.get("ttl_seconds", policy.default_ttl_seconds)
    if not isinstance(ttl, int) or isinstance(ttl, bool) or not 0 <= ttl <= MAX_TTL_SECONDS:
        raise _invalid("ttl_seconds", f"ttl_seconds must be a whole number from 0 to {MAX_TTL_SECONDS}")
    return NotificationRequest(
        tuple(dict.fromkeys(users)), message_type, event_type, dry_run, ttl
    )


@dataclass(frozen=True)
class EchoRequest:
    """Today's Echo job request to its push service: ``POST /v1/message/{fcm,apns}``."""

    tokens: tuple[str, ...]
    message_type: str
    topic: str | None
    dry_run: bool


def parse_echo_request(body: Any, policy: NotificationSettings) -> EchoRequest:
    if not isinstance(body, dict):
        raise ApiError(400, "invalid_body", "the body must be a JSON object")
    tokens = body.get("deviceTokens")
    if not isinstance(tokens, list) or not tokens:
        raise ApiError(400, "invalid_field", "deviceTokens must be a non-empty list", "deviceTokens")
    if len(tokens) > policy.max_users:
        raise ApiError(400, "invalid_field", f"at most {policy.max_users} tokens", "deviceTokens")
    if not all(isinstance(token, str) and 0 < len(token) <= 4096 and is_text(token) for token in tokens):
        raise ApiError(
            400, "invalid_field", "each device token must be UTF-8 text of 1 to 4096 characters", "deviceTokens"
        )
    message_type = body.get("messageType")
    if message_type not in policy.message_types:
        raise ApiError(
            400, "invalid_field",
            f"messageType must be one of {', '.join(policy.message_types)}", "messageType",
        )
    topic = body.get("topic")
    if topic is not None and (not isinstance(topic, str) or not is_text(topic)):
        raise ApiError(400, "invalid_field", "topic must be UTF-8 text", "topic")
    dry_run = body.get("dryRun", False)
    if not isinstance(dry_run, bool):
        raise ApiError(400, "invalid_field", "dryRun must be true or false", "dryRun")
    return EchoRequest(tuple(dict.fromkeys(tokens)), message_type, topic, dry_run)


@dataclass(frozen=True)
class InvalidToken:
    """A subscription a provider called dead: by id and token hash, never the token."""

    id: int
    token_sha256: str
    reason: str
    observed_at: datetime

    def as_json(self) -> dict[str, Any]:
        """The report's item. ``reason`` is what the provider answered, which is not bounded
        (FCM's error code is any string of its body): it is cut to what clean-up accepts, so a
        strange answer cannot get the whole report refused."""
        reason = self.reason.encode("utf-8", "replace").decode()[:MAX_REASON_LENGTH]
        return {
            "id": self.id,
            "token_sha256": self.token_sha256,
            "reason": reason,
            "observed_at": self.observed_at.isoformat(timespec="microseconds") + "Z",
        }


def invalid_tokens_event(source: str, provider: str, invalid: list[InvalidToken]) -> CloudEvent:
    return CloudEvent(
        {
            "type": SUBSCRIPTION_INVALID,
            "source": source,
            "id": str(uuid.uuid4()),
            "datacontenttype": "application/json",
        },
        {"provider": provider, "subscriptions": [item.as_json() for item in invalid]},
    )


FLUSH_TICK = "flush"
"""The ``pushtick`` of a tick that asks the dispatchers to flush (their ``flush-tick-to-*``
Triggers take it): the privacy delay's PingSource, clean-up when held work is due, and
``pushctl resume --tick-to``."""


def flush_tick_event(source: str) -> CloudEvent:
    """A flush tick, as the privacy delay's PingSource sends it."""
    return CloudEvent({"type": PING, "source": source, "id": str(uuid.uuid4()), "pushtick": FLUSH_TICK})


def flush_tick_headers(source: str) -> dict[str, str]:
    """:func:`flush_tick_event` in binary mode: the headers (it has no body)."""
    headers, _ = binary_http(flush_tick_event(source))
    return headers


def binary_http(event: CloudEvent) -> tuple[dict[str, str], bytes]:
    """Headers and body of ``event`` in binary mode, the broker's default."""
    headers, body = to_binary(event)
    return dict(headers), body


def parse_invalid_tokens(data: dict[str, Any]) -> list[InvalidToken]:
    """Validate ``subscription.invalid.v1`` data; 422 naming the field when it is wrong."""
    items = data.get("subscriptions")
    if not isinstance(items, list) or len(items) > MAX_REPORTED_SUBSCRIPTIONS:
        raise _invalid(
            "subscriptions", f"subscriptions must be a list of at most {MAX_REPORTED_SUBSCRIPTIONS} items"
        )
    parsed = []
    for item in items:
        if not isinstance(item, dict):
            raise _invalid("subscriptions", "each subscription must be an object")
        sub_id, digest, reason, observed = (
            item.get("id"), item.get("token_sha256"), item.get("reason", ""), item.get("observed_at")
        )
        if not isinstance(sub_id, int) or isinstance(sub_id, bool) or not 1 <= sub_id <= MAX_SUBSCRIPTION_ID:
            raise _invalid("subscriptions.id", f"id must be a whole number from 1 to {MAX_SUBSCRIPTION_ID}")
        if not isinstance(digest, str) or not SHA256_HEX.fullmatch(digest):
            raise _invalid("subscriptions.token_sha256", "token_sha256 must be 64 hex digits")
        if not isinstance(reason, str) or len(reason) > MAX_REASON_LENGTH or not is_text(reason):
            raise _invalid(
                "subscriptions.reason", f"reason must be UTF-8 text of at most {MAX_REASON_LENGTH} characters"
            )
        parsed.append(InvalidToken(sub_id, digest.lower(), reason, _timestamp(observed)))
    return parsed


def _timestamp(value: Any) -> datetime:
    """An RFC 3339 date-time as naive UTC. Its offset is required: a time without one would be
    read as UTC whatever zone its writer meant, and could then keep a dead subscription or
    delete one the device had just refreshed."""
    not_rfc3339 = _invalid(
        "subscriptions.observed_at", "observed_at must be an RFC 3339 date-time with an offset"
    )
    if not isinstance(value, str) or not RFC3339_DATE_TIME.fullmatch(value):
        raise not_rfc3339
    try:
        moment = datetime.fromisoformat(value.upper().replace("Z", "+00:00"))
    except ValueError:  # not in the calendar: February 30
        raise not_rfc3339 from None
    try:
        return moment.astimezone(timezone.utc).replace(tzinfo=None)
    except OverflowError:  # 0001-01-01T00:00+01:00 is in year 0 in UTC, which has none
        raise _invalid("subscriptions.observed_at", "observed_at is out of range") from None


def _invalid(field: str, message: str) -> ApiError:
    return ApiError(422, "invalid_data", message, field)


def post_flush_tick(url: str, source: str, timeout: float = 30.0) -> str | None:
    """Post a flush tick to ``url`` (the broker, or a dispatcher's route): ``None`` when it was
    taken, else what went wrong. Blocking (urllib: clean-up's image has no httpx)."""
    import urllib.error
    import urllib.request

    request = urllib.request.Request(
        url, data=b"", method="POST", headers=flush_tick_headers(source) | internal_headers())
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return None if response.status < 300 else f"HTTP {response.status}"
    except urllib.error.HTTPError as exc:
        return f"HTTP {exc.code}"
    except OSError as exc:
        return f"not reachable ({getattr(exc, 'reason', exc)})"
