"""The interface every push provider implements.

A provider turns one wake-up for one device into one :class:`~shared.core.SendResult`. Everything
the dispatcher decides (retry the event, delete the token, record the delivery) follows from the
result's :class:`~shared.core.Outcome` (those types live in :mod:`shared.core`, below storage and
providers alike), so provider quirks (status codes, error bodies, client-library exceptions) stay
inside the provider's own module.
"""
from __future__ import annotations

import email.utils
import math
import time
from dataclasses import dataclass
from datetime import timezone
from typing import Protocol

from shared.core import Device, SendResult, WakeUp


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
