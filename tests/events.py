"""Building CloudEvents as Echo, the broker and the dispatchers post them."""
from __future__ import annotations

import json
import uuid

from cloudevents.conversion import to_binary, to_structured
from cloudevents.http import CloudEvent

from shared.events import NOTIFICATION_REQUESTED, PING, SUBSCRIPTION_INVALID


def cloud_event(type_: str, data: object, *, id_: str | None = None, source: str = "/test") -> CloudEvent:
    return CloudEvent(
        {"type": type_, "source": source, "id": id_ or str(uuid.uuid4()), "datacontenttype": "application/json"},
        data,
    )


def binary(event: CloudEvent) -> dict:
    headers, body = to_binary(event)
    return {"headers": dict(headers), "content": body}


def structured(event: CloudEvent) -> dict:
    headers, body = to_structured(event)
    return {"headers": dict(headers), "content": body}


def notification(users: list[str], *, id_: str | None = None, **fields: object) -> dict:
    data = {"users": users, "message_type": "checkEchoV1", "event_type": "edit-user-talk", **fields}
    return binary(cloud_event(NOTIFICATION_REQUESTED, data, id_=id_))


def invalid_tokens(provider: str, items: list[dict], *, id_: str | None = None) -> dict:
    return binary(cloud_event(SUBSCRIPTION_INVALID, {"provider": provider, "subscriptions": items}, id_=id_))


def ping() -> dict:
    return binary(cloud_event(PING, {"message": "expire"}))


def reply_event(response) -> tuple[dict, dict]:
    """The CloudEvent a function replied with (binary mode): its ce- attributes and its data."""
    attributes = {k[3:]: v for k, v in response.headers.items() if k.startswith("ce-")}
    return attributes, json.loads(response.content)
