"""Reading configuration from the environment, with secrets from files.

Every setting is an environment variable named ``PUSH_*``. A secret setting (a key, a credential)
is found, in this order:

1. ``NAME_FILE``: the path of a file that holds it;
2. ``NAME``: the value itself, or the path of a file that holds it (a PEM key can be given either
   way). A secret a function needs (:func:`require_secret`) whose value starts like a path
   (``/``, ``./``, ``../``, ``~/``) but names no file stops the function, naming setting and
   path; a function that does not use the secret ignores it (one shared setting may name a file
   mounted only where it is needed);
3. a file named after the variable, lower-case with dashes (``PUSH_APNS_KEY`` ->
   ``push-apns-key``), in ``PUSH_SECRETS_DIR`` (default ``/var/openfaas/secrets``, where OpenFaaS
   and our Knative manifests mount secrets).

Problems raise :class:`ConfigError` with the variable's name, at start-up, never later.
"""
from __future__ import annotations

import os
from pathlib import Path

DEFAULT_SECRETS_DIR = "/var/openfaas/secrets"


class ConfigError(Exception):
    """A setting is missing or malformed. The message names the variable."""


def env(name: str, default: str | None = None) -> str | None:
    """The variable's value with surrounding blanks removed; ``default`` when unset or empty."""
    value = os.environ.get(name, "").strip()
    return value if value else default


def require_env(name: str, why: str) -> str:
    """A setting that must be present; ``why`` says what needs it."""
    value = env(name)
    if value is None:
        raise ConfigError(f"{name} is not set: {why}")
    return value


def env_int(name: str, default: int, minimum: int = 0, maximum: int | None = None) -> int:
    """An integer setting, checked against its bounds."""
    raw = env(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a whole number, not {raw!r}") from None
    if value < minimum or (maximum is not None and value > maximum):
        upper = "" if maximum is None else f" and at most {maximum}"
        raise ConfigError(f"{name} must be at least {minimum}{upper}, not {value}")
    return value


def env_float(name: str, default: float, minimum: float = 0.0) -> float:
    """A number setting (seconds, mostly), checked against its lower bound."""
    raw = env(name)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a number, not {raw!r}") from None
    if value < minimum:
        raise ConfigError(f"{name} must be at least {minimum}, not {value}")
    return value


def env_list(name: str, default: tuple[str, ...] = ()) -> tuple[str, ...]:
    """A comma-separated list setting, blanks and empty items dropped."""
    raw = env(name)
    if raw is None:
        return default
    return tuple(item.strip() for item in raw.split(",") if item.strip())


def secret(name: str) -> str | None:
    """A secret's text, looked up as the module docstring says; ``None`` when not configured."""
    file_var = env(f"{name}_FILE")
    if file_var is not None:
        return _read(f"{name}_FILE", Path(file_var))
    value = env(name)
    if value is not None:
        return file_or_value(name, value)
    mounted = Path(env("PUSH_SECRETS_DIR", DEFAULT_SECRETS_DIR)) / name.lower().replace("_", "-")
    if mounted.is_file():
        return _read(name, mounted)
    return None


def file_or_value(name: str, value: str) -> str:
    """``value``, or the text of the file it names."""
    if "\n" in value or len(value) >= 4096:
        return value
    path = os.path.expanduser(value)
    if os.path.isfile(path):  # never raises: a long PEM or JSON is simply not a file name
        return _read(name, Path(path))
    return value


def no_missing_file(name: str, value: str) -> str:
    """``value``, unless it starts like a path and names no file: then it is a key file not
    mounted or a typo, not a key, and the error names the setting and the path (rather than
    the key's parser failing on the path)."""
    if "\n" not in value and value.startswith(("/", "./", "../", "~/")) and len(value) < 4096:
        raise ConfigError(f"{name} names the file {value}, which does not exist: check the path")
    return value


def require_secret(name: str, why: str) -> str:
    """A secret that must be configured; ``why`` says what needs it."""
    value = secret(name)
    if value is None:
        raise ConfigError(f"{name} is not set: {why}")
    return no_missing_file(name, value)


def _read(name: str, path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError as exc:
        raise ConfigError(f"{name}: cannot read {path}: {exc.strerror}") from None
