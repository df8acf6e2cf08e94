"""The dispatcher's own settings, and the event policy read from the environment.

Read once at start-up by :meth:`shared.dispatch.Dispatcher.from_env`; the collaborators of the
package take the values they need from here.
"""
from __future__ import annotations

from dataclasses import dataclass

from shared.config import env_int, env_list
from shared.events import NotificationPolicy

#: Seconds the broker waits before redelivering when no provider named a Retry-After.
DEFAULT_RETRY_AFTER = 30


@dataclass(frozen=True)
class DispatchSettings:
    concurrency: int = 100
    """Sends in flight at once for one event."""
    deadline_seconds: float = 60.0
    """Sends not finished by then count as transient: the event is redelivered for them. Keep it
    below the platform's request timeout and below the claim lease."""
    echo_apns_environment: str = "production"
    """The APNs environment of tokens that Echo's request names and we do not know."""
    max_in_flight: int = 100
    """Requests one process works on at once; more are answered 503 so the broker backs off
    (load shedding instead of unbounded memory)."""


def notification_policy_from_env() -> NotificationPolicy:
    return NotificationPolicy(
        message_types=env_list("PUSH_MESSAGE_TYPES", ("checkEchoV1",)),
        max_users=env_int("PUSH_MAX_USERS_PER_EVENT", 1000, minimum=1),
        default_ttl_seconds=env_int("PUSH_DEFAULT_TTL_SECONDS", 86400, minimum=0),
    )
