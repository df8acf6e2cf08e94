"""Several apps in one deployment: per-app credentials, and the router that picks them per device.

Without ``PUSH_APPS`` a deployment serves one app, configured by the ``PUSH_FCM_*``,
``PUSH_APNS_*`` and ``PUSH_VAPID_*`` settings. With it, ``PUSH_APPS`` is a JSON document (the
text, or the path of a file holding it) naming each app and its credentials per provider::

    {
      "wikipedia": {
        "apns": {"key": "/var/openfaas/secrets/wikipedia-apns-key", "key_id": "ABC123DEFG",
                 "team_id": "DEF123GHIJ", "topics": ["org.wikimedia.wikipedia"]},
        "fcm": {"credentials": "/var/openfaas/secrets/wikipedia-fcm.json"},
        "webpush": {"vapid_private_key": "/var/openfaas/secrets/wikipedia-vapid",
                    "vapid_subject": "mailto:push@wikimedia.org"}
      },
      "commons": {"apns": {"key": "...", "key_id": "...", "team_id": "...",
                           "topics": ["org.wikimedia.commons"]}}
    }

A provider section takes that provider's constructor arguments (``key``, ``key_id``,
``team_id``, ``production_url``, ``sandbox_url``, ``ca_file``, ``timeout_seconds``,
``max_connections`` for APNs; ``credentials``, ``project_id``, ``endpoint``... for FCM;
``vapid_private_key``, ``vapid_subject``, ``urgency``... for Web Push); secrets may be given as file
paths. An APNs section lists the bundle ids (``topics``) it signs for. A subscription names its
app (``"app"`` in the subscribe request; for APNs the topic implies it). The default app (the
``PUSH_*`` settings), when configured, serves subscriptions that name none. Every mistake stops the
function at start-up with an error naming the key, e.g. ``PUSH_APPS.commons.apns.key_id``.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from shared.config import ConfigError, file_or_value
from shared.core import PROVIDERS
from shared.settings import read_setting

APP_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
SECRET_KEYS = {"key", "credentials", "vapid_private_key"}


@dataclass(frozen=True)
class Apps:
    """The validated ``PUSH_APPS``: per app, per provider, the provider's settings."""

    settings: dict[str, dict[str, dict[str, Any]]]

    def names(self, provider: str) -> set[str]:
        return {app for app, sections in self.settings.items() if provider in sections}

    def app_for_topic(self, topic: str) -> str | None:
        for app, sections in self.settings.items():
            if topic in sections.get("apns", {}).get("topics", ()):
                return app
        return None


def load_apps() -> Apps:
    raw = read_setting("PUSH_APPS")
    if raw is None:
        return Apps({})
    try:
        document = json.loads(raw)
    except ValueError:
        raise ConfigError("PUSH_APPS is not valid JSON (nor the path of a file holding it)") from None
    if not isinstance(document, dict) or not document:
        raise ConfigError("PUSH_APPS must be a JSON object naming at least one app")
    settings: dict[str, dict[str, dict[str, Any]]] = {}
    for app, sections in document.items():
        where = f"PUSH_APPS.{app}"
        if not APP_NAME.match(app):
            raise ConfigError(f"{where}: app names are lower-case letters, digits, '.', '_' and '-'")
        if not isinstance(sections, dict) or not sections:
            raise ConfigError(f"{where} must be an object with fcm, apns or webpush settings")
        settings[app] = {}
        for provider, values in sections.items():
            if provider not in PROVIDERS:
                raise ConfigError(f"{where}.{provider} is not a provider (fcm, apns, webpush)")
            if not isinstance(values, dict):
                raise ConfigError(f"{where}.{provider} must be an object")
            settings[app][provider] = {
                key: _resolve(f"{where}.{provider}.{key}", key, value) for key, value in values.items()
            }
        topics = settings[app].get("apns", {}).get("topics")
        if "apns" in settings[app] and (
            not isinstance(topics, list) or not topics or not all(isinstance(t, str) for t in topics)
        ):
            raise ConfigError(f"{where}.apns.topics must list the app's bundle ids")
    return Apps(settings)


def _resolve(where: str, key: str, value: Any) -> Any:
    """A secret given as a file path is read; everything else is taken as it is."""
    if key in SECRET_KEYS:
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{where} must be a string")
        return file_or_value(where, value)
    return value
