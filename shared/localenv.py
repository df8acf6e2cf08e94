"""The local stack's settings file, ``.local/local.env``: what ``make run`` gave the functions
(database URL, provider keys and endpoints, CA files, the auth key), so that ``pushctl`` run from
the repository works against the stack it started.

The file holds ``NAME=value`` lines quoted for a POSIX shell (``set -a; . .local/local.env``
loads it too). It is written with mode 0600: it names key files, and may hold a database URL with
a password.

``pushctl`` reads it only when ``PUSH_DATABASE_URL`` is not set: an operator who named a database
never gets the local stack's providers mixed into theirs.
"""
from __future__ import annotations

import os
import shlex
from pathlib import Path

FILE_NAME = "local.env"


def local_dir(base: Path | None = None) -> Path:
    """``PUSH_LOCAL_DIR``, default ``.local`` in ``base`` (the working directory)."""
    configured = os.environ.get("PUSH_LOCAL_DIR")
    return Path(configured) if configured else (base or Path.cwd()) / ".local"


def write_settings(path: Path, settings: dict[str, str]) -> None:
    """Write ``settings`` to ``path`` (replacing it whole, never leaving half a file)."""
    lines = ["# Written by `make run` (scripts/run_local.py): the local stack's settings."]
    lines += [f"{name}={shlex.quote(value)}" for name, value in sorted(settings.items())]
    partial = path.with_name(path.name + ".partial")
    partial.write_text("\n".join(lines) + "\n")
    partial.chmod(0o600)
    partial.replace(path)


def read_settings(path: Path) -> dict[str, str]:
    """The settings of a file :func:`write_settings` wrote."""
    settings = {}
    for line in path.read_text().splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        name, separator, quoted = line.partition("=")
        words = shlex.split(quoted)
        if not separator or len(words) > 1:
            raise ValueError(f"{path}: not a NAME=value line: {line[:40]!r}")
        settings[name.strip()] = words[0] if words else ""
    return settings


def load_local_settings(base: Path | None = None) -> Path | None:
    """Fill in the environment from the local stack's settings file, when there is one and
    ``PUSH_DATABASE_URL`` is not set; variables already set are kept. The file read, or ``None``."""
    if os.environ.get("PUSH_DATABASE_URL") or os.environ.get("PUSH_DATABASE_URL_FILE"):
        return None
    path = local_dir(base) / FILE_NAME
    if not path.is_file():
        return None
    for name, value in read_settings(path).items():
        os.environ.setdefault(name, value)
    return path
