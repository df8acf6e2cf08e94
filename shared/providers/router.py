"""The dispatcher's provider when a deployment serves several apps (:mod:`shared.apps`): one
provider client per app, and the router that sends each device through its app's.
"""
from __future__ import annotations

import inspect
from typing import Any

from shared.apps import SECRET_KEYS, load_apps
from shared.config import ConfigError, no_missing_file, secret
from shared.core import Device, Outcome, SendResult, WakeUp
from shared.providers.base import EchoTokens, Provider

#: The ``PUSH_*`` settings that give the default app its credentials, per provider: when any is
#: present, the default app is meant to exist, and a mistake in it must stop the function.
DEFAULT_APP_SETTINGS = {
    "fcm": ("PUSH_FCM_CREDENTIALS", "PUSH_FCM_PROJECT_ID"),
    "apns": ("PUSH_APNS_KEY", "PUSH_APNS_KEY_ID", "PUSH_APNS_TEAM_ID"),
    "webpush": ("PUSH_VAPID_PRIVATE_KEY", "PUSH_VAPID_SUBJECT"),
}


class AppRouter:
    """A :class:`Provider` that sends each device through its app's own provider client."""

    def __init__(
        self, name: str, providers: dict[str | None, Provider], echo: EchoTokens | None = None
    ) -> None:
        self.name = name
        self.providers = providers
        self.echo = echo  # every app's provider is of one class, which reads Echo's request alike

    async def send(self, device: Device, wakeup: WakeUp) -> SendResult:
        provider = self.providers.get(device.app)
        if provider is None:
            return SendResult(Outcome.REJECTED, "unknown_app")
        return await provider.send(device, wakeup)

    async def aclose(self) -> None:
        for provider in self.providers.values():
            await provider.aclose()


def providers_from_env(provider_class: Any, **shared: Any) -> Provider:
    """The dispatcher's provider: the default app's from the ``PUSH_*`` settings and one per app
    of ``PUSH_APPS`` with a section for this provider, behind an :class:`AppRouter`. ``shared``
    goes to every one of them (e.g. the APNs provider-token store)."""
    name = provider_class.name
    apps = load_apps()
    per_app: dict[str | None, Provider] = {}
    accepted = set(inspect.signature(provider_class.__init__).parameters) - {"self", *shared}
    for app in sorted(apps.names(name)):
        values = {k: v for k, v in apps.settings[app][name].items() if k != "topics"}
        for key in values:
            if key not in accepted:
                raise ConfigError(f"PUSH_APPS.{app}.{name}.{key} is not a {name} setting")
            if key in SECRET_KEYS:  # still a path after load_apps: the file is missing here
                no_missing_file(f"PUSH_APPS.{app}.{name}.{key}", values[key])
        try:
            per_app[app] = provider_class(**values, **shared)
        except TypeError as exc:
            raise ConfigError(f"PUSH_APPS.{app}.{name}: {exc}") from None
        except ConfigError as exc:
            raise ConfigError(f"PUSH_APPS.{app}.{name}: {exc}") from None
    try:
        per_app[None] = provider_class.from_env(**shared)
    except ConfigError:
        # Without any of its settings there is no default app, only PUSH_APPS' apps.
        if not per_app or any(secret(setting) is not None for setting in DEFAULT_APP_SETTINGS[name]):
            raise
    if list(per_app) == [None]:
        return per_app[None]
    return AppRouter(name, per_app, provider_class.echo)
