"""What one event, Echo request or flush came to for one provider: the counts behind its answer
and its one log line."""
from __future__ import annotations

from dataclasses import dataclass, field

from shared.core import Outcome, SendResult
from shared.events import InvalidToken, NotificationRequest


@dataclass
class DispatchReport:
    """What one event (or Echo request) came to for one provider."""

    found: int = 0
    """The devices of the event's users with this provider (for a flush: the due wake-ups)."""
    delivered: int = 0
    dead_count: int = 0
    rejected: int = 0
    transient: int = 0
    skipped: int = 0
    """Devices an earlier delivery of the same event already served (or found dead)."""
    limited: int = 0
    """Devices over their per-event-type limit: nothing sent."""
    queued: int = 0
    """Wake-ups left for the privacy delay's flush."""
    kept: int = 0
    """Wake-ups an operator's pause kept in the database (:mod:`shared.holds`)."""
    credentials: int = 0
    """Wake-ups kept because the provider refuses our credentials for their app."""
    key_refused: int = 0
    """Web Push wake-ups kept because their device refused our key (its fault or ours: to be
    told by the next delivery)."""
    discarded: int = 0
    """Wake-ups a pause with ``--discard`` dropped."""
    expired: int = 0
    """Kept wake-ups whose TTL ran out before they could be sent (flushes only)."""
    dead: list[InvalidToken] = field(default_factory=list)
    retry_after: float | None = None
    only_rate_limited: bool = True

    def count(self, result: SendResult) -> None:
        if result.outcome is Outcome.TRANSIENT:
            self.transient += 1
            self.only_rate_limited &= result.rate_limited
            if result.retry_after is not None:
                self.retry_after = max(self.retry_after or 0, result.retry_after)
        else:
            setattr(self, _COUNTED[result.outcome], getattr(self, _COUNTED[result.outcome]) + 1)

    def summary(self, provider: str, notification: NotificationRequest | None) -> str:
        """What the event came to, in words: a user without devices, a redelivery with nothing
        left to send, a flush and a delivery each read differently."""
        devices = _count(self.found, f"{provider} device")
        if notification is None:
            if not self.found and not self.expired and not self.discarded:
                return "flush, nothing due"
            return f"flush, {self.found} due: {self.counts()}"
        users = _count(len(notification.users), "user")
        dry_run = "dry run: " if notification.dry_run else ""
        if not self.found:
            return f"{dry_run}no {provider} devices for the event's {users}; nothing sent"
        if self.skipped == self.found:
            return f"redelivery: {devices}, all already served; nothing sent again"
        return f"{dry_run}{devices} of {users}: {self.counts()}"

    def counts(self) -> str:
        counts = [f"{self.delivered} delivered", f"{self.dead_count} dead", f"{self.transient} transient",
                  f"{self.skipped} skipped (already served)", f"{self.limited} limited"]
        optional = [
            (self.rejected, "rejected"), (self.queued, "queued for the privacy delay"),
            (self.kept, "kept (paused)"), (self.credentials, "kept (credentials refused)"),
            (self.key_refused, "kept (device refused our key)"), (self.discarded, "discarded (paused)"),
            (self.expired, "expired"),
        ]
        return ", ".join(counts + [f"{number} {what}" for number, what in optional if number])

    def fields(self) -> dict[str, int]:
        """The counts, as fields of the event's log line."""
        return {
            "devices": self.found, "delivered": self.delivered, "dead": self.dead_count,
            "transient": self.transient, "skipped": self.skipped, "limited": self.limited,
            "rejected": self.rejected, "kept": self.kept, "credentials": self.credentials,
            "key_refused": self.key_refused, "discarded": self.discarded, "expired": self.expired,
        }


#: The report's count of each final outcome.
_COUNTED = {
    Outcome.DELIVERED: "delivered", Outcome.DEAD: "dead_count", Outcome.REJECTED: "rejected",
    Outcome.KEPT: "kept", Outcome.CREDENTIALS: "credentials", Outcome.KEY_REFUSED: "key_refused",
    Outcome.DISCARDED: "discarded",
}


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}{'' if number == 1 else 's'}"

