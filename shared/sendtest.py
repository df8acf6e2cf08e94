"""``pushctl send-test``: one wake-up to chosen devices through the dispatchers' own providers,
each device with its app's credentials, to check a deployment's settings; and, for each send
that was not delivered, the setting to look at.

The providers classify every failure into a short reason (:class:`shared.core.SendResult`);
:func:`setting_to_check` turns that reason into the settings an operator can change.
"""
from __future__ import annotations

import importlib
from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import Engine

from shared.apns_tokens import ApnsTokenStore
from shared.core import Device, Outcome, SendResult, WakeUp
from shared.endpoints import EndpointRules
from shared.providers.router import providers_from_env
from shared.subscriptions import SubscriptionStore, token_sha256

PROVIDER_CLASSES = {"fcm": "FcmProvider", "apns": "ApnsProvider", "webpush": "WebPushProvider"}

#: Per provider: the settings naming where it sends, what it trusts, and who we are to it.
_SETTINGS = {
    "fcm": {
        "endpoint": "PUSH_FCM_ENDPOINT",
        "ca": "PUSH_FCM_CA_FILE",
        "credentials": "PUSH_FCM_CREDENTIALS (and PUSH_FCM_PROJECT_ID)",
    },
    "apns": {
        "endpoint": "PUSH_APNS_PRODUCTION_URL / PUSH_APNS_SANDBOX_URL",
        "ca": "PUSH_APNS_CA_FILE",
        "credentials": "PUSH_APNS_KEY, PUSH_APNS_KEY_ID and PUSH_APNS_TEAM_ID",
    },
    "webpush": {
        "endpoint": "the subscription's endpoint",
        "ca": "PUSH_WEBPUSH_CA_FILE",
        "credentials": "PUSH_VAPID_PRIVATE_KEY (the key the browser subscribed with) and PUSH_VAPID_SUBJECT",
    },
}
#: Reasons that mean "the provider does not accept who we are" (FCM's error codes, APNs'
#: reasons, Web Push services' statuses).
_CREDENTIAL_REASONS = frozenset({
    "oauth_refused", "UNAUTHENTICATED", "PERMISSION_DENIED", "SENDER_ID_MISMATCH",
    "THIRD_PARTY_AUTH_ERROR", "InvalidProviderToken", "ExpiredProviderToken",
    "MissingProviderToken", "http_401", "http_403",
})
_TOPIC_REASONS = frozenset({"BadTopic", "TopicDisallowed", "MissingTopic", "DeviceTokenNotForTopic"})


@dataclass(frozen=True)
class Sent:
    """One test send: the device and what its provider answered."""

    provider: str
    device: Device
    result: SendResult

    @property
    def delivered(self) -> bool:
        return self.result.outcome is Outcome.DELIVERED

    def describe(self) -> str:
        """One line: the device (by id and hash, never its token), the outcome, what to check."""
        name = f"subscription {self.device.id}" if self.device.id else "token"
        reason = f" ({self.result.reason})" if self.result.reason else ""
        check = setting_to_check(self.provider, self.device, self.result)
        return (f"{self.provider} {name} (device {self.device.token_sha256[:12]}): "
                f"{self.result.outcome.value}{reason}" + (f": {check}" if check else ""))


def user_devices(engine: Engine, user: str, provider: str | None = None) -> dict[str, list[Device]]:
    """The user's devices by provider (every provider, or only ``provider``)."""
    store = SubscriptionStore(engine)
    return {name: store.for_users([user], name) for name in PROVIDER_CLASSES if provider in (None, name)}


def token_device(provider: str, token: str, topic: str | None = None, environment: str = "production",
                 app: str | None = None) -> Device:
    """A device named by its raw token alone, as the dispatchers would see it subscribed."""
    if provider == "apns":
        token = token.lower()
        return Device(0, token, topic, environment, app, token_sha256(token))
    return Device(0, token, app=app, token_sha256=token_sha256(token))


def setting_to_check(provider: str, device: Device, result: SendResult) -> str | None:
    """What to look at when a send was not delivered, in words; ``None`` when delivered."""
    if result.outcome is Outcome.DELIVERED:
        return None
    names = _SETTINGS[provider]
    if device.app:
        names = {key: f"{value} (app {device.app}: its entry in PUSH_APPS)" for key, value in names.items()}
    reason = result.reason
    if reason == "tls_error":
        return f"check {names['ca']}: the endpoint's certificate is not trusted"
    if reason == "connection_error":
        return f"check {names['endpoint']} (reachable?) and {names['ca']} (its certificate trusted?)"
    if reason == "timeout":
        return f"check {names['endpoint']}: no answer in time"
    if reason == "oauth_unavailable":
        return f"check {names['credentials']}: its token_uri must be reachable, and {names['ca']}"
    if reason in _CREDENTIAL_REASONS:
        return f"check {names['credentials']}: the provider refused them"
    if reason in _TOPIC_REASONS:
        return "check the subscription's topic (the app's bundle id) against the APNs key's apps"
    if result.outcome is Outcome.DEAD:
        return "the device is gone: the dispatchers report it to clean-up, which deletes it"
    return None


async def send(engine: Engine, provider: str, devices: Sequence[Device], wakeup: WakeUp) -> list[Sent]:
    """Send ``wakeup`` to ``devices`` as the dispatcher of ``provider`` would. Raises
    :class:`shared.config.ConfigError` when the provider is not configured."""
    module = importlib.import_module(f"shared.providers.{provider}")
    # What the dispatcher gives every app's provider (functions/dispatch-*/main.py).
    shared: dict[str, object] = {}
    if provider == "apns":
        shared = {"token_store": ApnsTokenStore.from_env(engine)}
    elif provider == "webpush":
        shared = {"endpoint_rules": EndpointRules.from_env()}
    client = providers_from_env(getattr(module, PROVIDER_CLASSES[provider]), **shared)
    try:
        return [Sent(provider, device, await client.send(device, wakeup)) for device in devices]
    finally:
        await client.aclose()
