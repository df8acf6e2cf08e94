"""The interface every push provider implements, and the outcome classes the dispatcher acts on.

A provider turns one wake-up for one device into one :class:`SendResult`. Everything the dispatcher
decides (retry the event, delete the token, record the delivery) follows from the result's
:class:`Outcome`, so provider quirks (status codes, error bodies, client-library exceptions) stay
inside the provider's own module.
"""
from __future__ import annotations

import email.utils
import enum
import math
import time
from dataclasses import dataclass
from datetime import timezone
from typing import Protocol


class Outcome(enum.Enum):
    """What a provider's answer means for the device and for the event."""

    DELIVERED = "delivered"
    """The provider accepted the message (or validated it, on a dry run)."""
    DEAD = "dead"
    """The token will never work again: the subscription should be deleted."""
    TRANSIENT = "transient"
    """Try again later (429, 5xx, timeout, connection error): never delete on this."""
    REJECTED = "rejected"
    """The provider refused this message for a reason retrying it will not fix (payload too
    large, wrong topic configuration...): not retried, token kept."""
    CREDENTIALS = "credentials"
    """The provider refused our credentials, not this message (a key deleted, rotated wrongly,
    lacking a permission): any message would be refused the same way until a person fixes
    them. The dispatcher's hold gate (:mod:`shared.holds`) keeps such a wake-up in the database
    and holds the app's sends to the provider until a probe gets through; a result with this
    outcome that leaves the gate means "kept"."""
    KEY_REFUSED = "key_refused"
    """The push service refused our key for this device (Web Push 401/403), which is either the
    device's fault (its subscription was made with another key: a per-subscription fact after a
    key rotation) or ours (the key is wrong for every device); no status tells them apart. The
    hold gate (:mod:`shared.holds`) keeps the wake-up and decides by what the app's other devices
    answer; a result with this outcome that leaves the gate means "kept"."""
    KEPT = "kept"
    """Not sent: an operator's pause holds the provider or app, and the wake-up is kept in the
    database to be sent once the pause ends (set by the hold gate, never by a provider)."""
    DISCARDED = "discarded"
    """Not sent and dropped on purpose: a pause with ``--discard`` (set by the hold gate)."""


@dataclass(frozen=True)
class WakeUp:
    """The content-free message sent to a device. ``message_type`` is the only payload."""

    message_type: str
    ttl_seconds: int
    dry_run: bool = False


@dataclass(frozen=True, slots=True)
class Device:
    """One subscription as the dispatcher and the providers see it.

    ``token`` is the provider token: an FCM registration token, an APNs device token (lower-case
    hex), or for Web Push the subscription JSON text
    (``{"endpoint": ..., "keys": {"p256dh": ..., "auth": ...}}``).
    ``topic`` and ``environment`` are set for APNs only. ``id`` is 0 for a device that is not
    subscribed (one named by an Echo request).
    """

    id: int
    token: str
    topic: str | None = None
    environment: str | None = None
    app: str | None = None
    """The app whose credentials reach the device (see :mod:`shared.apps`); ``None``: default."""
    token_sha256: str = ""
    """The subscription's device hash: what dead-token reports name instead of the token."""


@dataclass(frozen=True)
class SendResult:
    """A provider's answer for one device.

    ``reason`` is a short machine-readable word (``"Unregistered"``, ``"UNREGISTERED"``,
    ``"http_410"``, ``"timeout"``...) that is safe to log and to use as a metric label: it never
    holds the token. ``retry_after`` is the provider's Retry-After in seconds, when it gave one.
    """

    outcome: Outcome
    reason: str = ""
    retry_after: float | None = None
    rate_limited: bool = False
    """A TRANSIENT answer that means "slow down" (the provider's 429, whatever its reason): the
    dispatcher then answers the broker 429 rather than 503, and counts it as rate_limited."""


@dataclass(frozen=True)
class EchoTokens:
    """How a provider reads the device tokens of Echo's ``POST /v1/message/{provider}`` (the
    Echo-compatible path, :mod:`shared.dispatch.echo`)."""

    lower_case: bool = False
    """Tokens are compared in lower case (APNs tokens are hex, stored lower-case)."""
    environment: bool = False
    """Devices have an APNs environment: a known device its own, an unknown one the default
    (``PUSH_ECHO_APNS_ENVIRONMENT``)."""


class Provider(Protocol):
    """A push provider client, created once per process and reused across invocations."""

    name: str
    """``"fcm"``, ``"apns"`` or ``"webpush"``: the value stored in ``subscriptions.provider``."""
    echo: EchoTokens | None
    """How Echo's request names this provider's devices; ``None``: Echo does not serve it."""

    async def send(self, device: Device, wakeup: WakeUp) -> SendResult:
        """Send one wake-up to one device. Never raises for provider or network errors: every
        failure is classified into a :class:`SendResult`."""
        ...

    async def aclose(self) -> None:
        """Close pooled connections (tests and graceful shutdown)."""
        ...


MAX_RETRY_AFTER_SECONDS = 3600.0
"""The longest wait a provider's Retry-After can ask for. A Web Push service is whatever host a
subscriber named, so its header is untrusted input: ``inf`` or a date in the year 9999 must not
reach the broker (or a ``timedelta``) as is."""


def retry_after_seconds(value: str | None) -> float | None:
    """An HTTP ``Retry-After`` header as seconds from now, at most
    :data:`MAX_RETRY_AFTER_SECONDS`: it is either delta-seconds or an HTTP date (RFC 9110,
    10.2.3). ``None`` when absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, OverflowError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=timezone.utc)
        seconds = when.timestamp() - time.time()
    if not math.isfinite(seconds):
        return None if math.isnan(seconds) else MAX_RETRY_AFTER_SECONDS
    return min(max(seconds, 0.0), MAX_RETRY_AFTER_SECONDS)
