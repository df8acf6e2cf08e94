"""The types every layer shares: what a device is, what is sent to it, what a provider answered,
the clock storage stamps its rows with, and the names of the events and of the default app.

They sit below everything else (storage, providers, the dispatcher, the functions all import
them; this module imports nothing of ours), so that a store never imports a provider to learn what
a device is, nor a provider a store to learn what time it is. The layers and the rule between
them are written down in ``tests/test_import_layers.py``.
"""
from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone

PROVIDERS = ("fcm", "apns", "webpush")
"""The push providers, as ``subscriptions.provider`` and every metric label name them."""

NOTIFICATION_REQUESTED = "org.wikimedia.push.notification.requested.v1"
"""The event a producer (the wiki) sends to have users' devices woken."""
SUBSCRIPTION_INVALID = "org.wikimedia.push.subscription.invalid.v1"
"""The event a dispatcher sends clean-up naming the devices a provider called dead."""
PING = "dev.knative.sources.ping"
"""A tick (Knative's PingSource, or clean-up's own): flush what is due, tidy up."""

DEFAULT_APP = ""
"""How the default app (subscriptions naming none) is stored; operators (``pushctl``, metric
labels) call it ``default``."""


def app_name(app: str) -> str:
    """An app as operators name it: ``default`` for the default app, ``*`` for all."""
    return "default" if app == DEFAULT_APP else app


Clock = Callable[[], datetime]
"""Where a store or a provider reads the time: :func:`utcnow`, or a test's clock."""


def utcnow() -> datetime:
    """Now, as the naive UTC datetime the database stores."""
    return datetime.now(timezone.utc).replace(tzinfo=None)


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
    them. The dispatcher's hold gate (:mod:`shared.hold_gate`) keeps such a wake-up in the
    database and holds the app's sends to the provider until a probe gets through; a result with
    this outcome that leaves the gate means "kept"."""
    KEY_REFUSED = "key_refused"
    """The push service refused our key for this device (Web Push 401/403), which is either the
    device's fault (its subscription was made with another key: a per-subscription fact after a
    key rotation) or ours (the key is wrong for every device); no status tells them apart. The
    hold gate (:mod:`shared.hold_gate`) keeps the wake-up and decides by what the app's other
    devices answer; a result with this outcome that leaves the gate means "kept"."""
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
class IssuedToken:
    """An APNs provider token and its issue time: what the shared token store
    (:mod:`shared.apns_tokens`) keeps and the APNs provider presents."""

    token: str
    issued_at: datetime
    """Naive UTC, whole seconds: the token's ``iat``."""
