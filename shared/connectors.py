"""OpenFaaS event connectors' requests, read as the CloudEvents the functions expect.

OpenFaaS connectors invoke a function with a plain POST and no CloudEvent headers: the NATS and
Kafka connectors (connector-sdk) post the message as the body with ``X-Topic`` naming its topic;
the cron-connector posts an empty body. Where ``PUSH_CONNECTOR_EVENT_TYPE`` is set (stack.yml sets
it on the dispatchers; Knative deployments leave it unset), :func:`shared.events.read_cloud_event`
reads such a request as:

- an empty body (a cron-connector tick): a ``dev.knative.sources.ping`` event, as a Knative
  PingSource would send;
- a body that is itself a structured CloudEvent (a JSON object with ``specversion``): not touched
  here, the CloudEvents parser reads it. Producers that can should publish these: they carry
  their own id;
- any other body: the ``data`` of an event of type ``PUSH_CONNECTOR_EVENT_TYPE``, source
  ``/openfaas/connector/<topic>``, and an id that is the same when the same message comes again,
  so the delivery ledger still recognises a redelivery: the first header of
  ``PUSH_CONNECTOR_ID_HEADERS`` that is present (default ``X-Call-Id``, which the OpenFaaS gateway
  sets on every call and the queue-worker repeats on every retry of an async call), else the
  SHA-256 of the topic and body. Mind the latter: two messages with the same body within
  ``PUSH_DELIVERY_RECORD_HOURS`` then count as one, so a device woken by the first is not woken
  again by the second.

A request carrying CloudEvent headers (``ce-specversion``) or a CloudEvents content type is never
touched: real CloudEvents are read exactly as without this module.
"""
from __future__ import annotations

import hashlib
import json
import re
import uuid
from collections.abc import Mapping

from cloudevents.http import CloudEvent

from shared.core import PING
from shared.settings import read_setting

EVENT_TYPE_VAR = "PUSH_CONNECTOR_EVENT_TYPE"
ID_HEADERS_VAR = "PUSH_CONNECTOR_ID_HEADERS"
TOPIC_HEADER = "x-topic"
SOURCE_PREFIX = "/openfaas/connector"

_UNSAFE = re.compile(r"[^A-Za-z0-9._~:@!$&'()*+,;=/-]")


def connector_event_type() -> str | None:
    """The event type a connector's message becomes; ``None``: connectors are not expected."""
    return read_setting(EVENT_TYPE_VAR)


def is_cloud_event_request(headers: Mapping[str, str]) -> bool:
    """Whether the request carries a CloudEvent itself (binary headers or a CloudEvents type)."""
    lowered = {key.lower(): value for key, value in headers.items()}
    return "ce-specversion" in lowered or lowered.get("content-type", "").lower().startswith(
        "application/cloudevents"
    )


def connector_event(headers: Mapping[str, str], body: bytes) -> CloudEvent | None:
    """The CloudEvent a connector's request stands for; ``None`` when the request is not one
    (connectors not configured, a real CloudEvent, or a body that is a structured CloudEvent)."""
    event_type = connector_event_type()
    if event_type is None or is_cloud_event_request(headers):
        return None
    lowered = {key.lower(): value for key, value in headers.items()}
    topic = lowered.get(TOPIC_HEADER, "").strip()
    source = f"{SOURCE_PREFIX}/{_UNSAFE.sub('_', topic) or 'unknown'}"
    if not body.strip():
        return CloudEvent(
            {"type": PING, "source": f"{SOURCE_PREFIX}/cron", "id": _header_id(lowered) or str(uuid.uuid4())}
        )
    if _is_structured_event(body):
        return None
    event_id = _header_id(lowered) or hashlib.sha256(topic.encode() + b"\n" + body).hexdigest()
    return CloudEvent(
        {"type": event_type, "source": source, "id": event_id, "datacontenttype": "application/json"},
        body,
    )


def _header_id(lowered: Mapping[str, str]) -> str | None:
    for name in read_setting(ID_HEADERS_VAR):
        value = lowered.get(name.lower(), "").strip()
        if value:
            return value[:256]
    return None


def _is_structured_event(body: bytes) -> bool:
    if not body.lstrip().startswith(b"{"):
        return False
    try:
        document = json.loads(body)
    except ValueError:
        return False
    return isinstance(document, dict) and "specversion" in document
