"""pushctl: the operator's command-line tool.

Each subcommand is one function registered with :func:`command`; what it does lives in the
shared package (``shared.db``, ``shared.sendtest``, ``shared.subscriptions``), and this module
only reads its arguments and prints. A failure the operator can fix ends in one line on stderr
naming the problem and the fix, and exit status 2; a command whose outcome is negative (a test
send not delivered) exits 1.

Run from a checkout where ``make run`` has written ``.local/local.env``, and with no
``PUSH_DATABASE_URL`` set, the commands that need settings take them from that file, so they
work against the local stack.
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import Engine
from sqlalchemy.engine import make_url

from shared.config import ConfigError, secret
from shared.core import PROVIDERS
from shared.db import SCHEMA_REVISION, DatabaseUnavailable, SchemaBehind, database_url, get_engine
from shared.localenv import FILE_NAME, load_local_settings, local_dir

DESCRIPTION = """\
pushctl: the operator's tool for push-functions.

Settings come from the environment, as for the functions (docs/configuration.md). Run from the
repository while `make run` is up, without PUSH_DATABASE_URL set, it uses the local stack's
settings (.local/local.env). See docs/operations.md."""


class Failed(Exception):
    """A problem the operator can fix: the message names both."""


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    run: Callable[[argparse.Namespace], int]
    arguments: list[tuple[tuple[str, ...], dict[str, Any]]] = field(default_factory=list)
    needs_settings: bool = False
    """Whether it reads the deployment's settings (and so the local stack's, when they apply)."""


COMMANDS: list[Command] = []
#: Subcommands named ``"GROUP ACTION"`` are the actions of ``pushctl GROUP``, described here.
GROUPS = {"dead-letters": "the events the broker gave up on (list, replay)"}


def arg(*names: str, **options: Any) -> tuple[tuple[str, ...], dict[str, Any]]:
    """One argument of a subcommand, as ``argparse.ArgumentParser.add_argument`` takes it."""
    return names, options


def command(name: str, help: str, *arguments: tuple[tuple[str, ...], dict[str, Any]],
            needs_settings: bool = False) -> Callable:
    """Register the decorated function as the subcommand ``name``."""

    def register(run: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
        COMMANDS.append(Command(name, help, run, list(arguments), needs_settings))
        return run

    return register


# --- the subcommands ----------------------------------------------------------------------------


@command("migrate", "apply the schema migrations to PUSH_DATABASE_URL", needs_settings=True)
def migrate(_args: argparse.Namespace) -> int:
    from shared.db import migrate as apply_migrations

    engine = get_engine()
    before, applied = apply_migrations(engine)
    where = engine.url.render_as_string(hide_password=True)
    if applied:
        span = applied[0] if len(applied) == 1 else f"{applied[0]}..{applied[-1]}"
        print(f"database {where}: applied {span}")
    elif before is not None and before.isdigit() and int(before) > int(SCHEMA_REVISION):
        print(f"database {where} is already at {before}, newer than this pushctl's {SCHEMA_REVISION}: nothing to do")
    else:
        print(f"database {where} is already at {before}")
    return 0


@command("vapid-keygen", "make a VAPID key pair for Web Push")
def vapid_keygen(_args: argparse.Namespace) -> int:
    from shared.vapid import generate_vapid_keys

    private_key, public_key = generate_vapid_keys()
    print(f"PUSH_VAPID_PRIVATE_KEY={private_key}")
    print(f"applicationServerKey (for the apps)={public_key}")
    return 0


@command(
    "send-test", "send a wake-up to one user's devices, or to one device token",
    arg("--user", help="the user whose devices to wake"),
    arg("--token", help="one raw device token instead (for webpush: the subscription JSON); "
        "needs --provider"),
    arg("--provider", choices=PROVIDERS, help="only this provider"),
    arg("--topic", help="with --token for apns: the app's bundle id"),
    arg("--environment", choices=["production", "sandbox"], default="production",
        help="with --token for apns (default: %(default)s)"),
    arg("--app", help="with --token: the app (of PUSH_APPS) whose credentials to use"),
    arg("--dry-run", action="store_true", help="validate only; nothing reaches devices"),
    arg("--message-type", default="checkEchoV1", help="the wake-up's type (default: %(default)s)"),
    needs_settings=True,
)
def send_test(args: argparse.Namespace) -> int:
    from shared.core import WakeUp
    from shared.sendtest import send, token_device, user_devices

    if (args.user is None) == (args.token is None):
        raise Failed("send-test needs --user ID or --token TOKEN (one of them)")
    if args.token is not None and args.provider is None:
        raise Failed("--token needs --provider (fcm, apns or webpush)")
    if args.token is not None and args.provider == "apns" and not args.topic:
        raise Failed("--token with --provider apns needs --topic (the app's bundle id)")
    engine = _database()
    if args.token is not None:
        targets = {args.provider: [token_device(args.provider, args.token, args.topic, args.environment, args.app)]}
    else:
        targets = user_devices(engine, args.user, args.provider)
    wakeup = WakeUp(args.message_type, ttl_seconds=300, dry_run=args.dry_run)
    attempted = delivered = 0
    for provider, devices in targets.items():
        if not devices:
            print(f"no {provider} subscriptions for user {args.user}")
            continue
        attempted += len(devices)
        try:
            sent = asyncio.run(send(engine, provider, devices, wakeup))
        except ConfigError as exc:
            print(f"{provider}: nothing sent: {exc}")
            continue
        for each in sent:
            print(each.describe())
            delivered += each.delivered
    if not attempted:
        print(f"user {args.user} has no subscriptions to send to: nothing sent")
        return 1
    print(f"{delivered} of {attempted} delivered")
    return 0 if delivered == attempted else 1


@command("subscriptions", "list one user's devices", arg("--user", required=True, help="the user id"),
         needs_settings=True)
def subscriptions(args: argparse.Namespace) -> int:
    from shared.core import utcnow
    from shared.subscriptions import SubscriptionStore

    rows = SubscriptionStore(_database()).list_for_user(args.user)
    if not rows:
        print(f"user {args.user} has no subscriptions")
        return 0
    now = utcnow()
    table = [("id", "provider", "app", "device (sha256)", "topic", "created", "updated")]
    table += [(
        str(row.id), row.provider, row.app or "-", row.token_sha256[:16],
        f"{row.topic} ({row.environment})" if row.topic else "-",
        _age(now, row.created_at), _age(now, row.updated_at),
    ) for row in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(table[0]))]
    for line in table:
        print("  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip())
    return 0


@command(
    "import-echo", "copy Echo's push subscriptions into PUSH_DATABASE_URL",
    arg("--from", dest="source", required=True, metavar="URL", help="Echo's database (mysql+pymysql://...)"),
    arg("--dry-run", action="store_true", help="report what it would do; write nothing"),
    arg("--apns-environment", choices=("production", "sandbox"), default="production"),
    arg("--batch", type=int, default=1000, metavar="N", help="Echo rows per transaction"),
    arg("--refreshed-at-import", action="store_true",
        help="write the import's start as the last refresh of the rows it writes, not eps_updated"),
    arg("--default-topic", metavar="TOPIC", help="the APNs topic of Echo's rows that have none"),
    needs_settings=True,
)
def import_echo(args: argparse.Namespace) -> int:
    from shared import echo_import
    from shared.progress import progress

    try:
        job = echo_import.from_settings(
            args.source, args.apns_environment, args.batch, args.dry_run, args.refreshed_at_import, args.default_topic
        )
        shown = progress(job.count(), sys.stdout)
        try:
            summary = job.run(lambda eps_id, reason: shown.note(f"skipped eps_id {eps_id}: {reason}"), shown.advance)
        finally:
            shown.close()
    except echo_import.EchoImportError as exc:
        print(f"pushctl import-echo: {exc}", file=sys.stderr)
        return 2
    if note := summary.stale_note():
        print(note)
    print(("dry run, nothing written: " if args.dry_run else "") + summary.line())
    return 0


@command("dead-letters list", "show the dead letters, oldest first",
         arg("--limit", type=int, default=None, help="show at most this many"), needs_settings=True)
def dead_letters_list(args: argparse.Namespace) -> int:
    from shared.dead_letters import DeadLetterStore

    found = 0
    for letter in DeadLetterStore(_database()).letters(limit=args.limit):
        found += 1
        failed = f" replays failed: {letter.replay_attempts} ({letter.last_replay_error})" if letter.replay_attempts else ""
        print(f"{letter.id}\t{letter.received_at:%Y-%m-%dT%H:%M:%SZ}\t{letter.event_type}\tid={letter.event_id}"
              f"\tcode={letter.error_code}\tdest={letter.destination}{failed}")
    print(f"{found} dead letter(s)", file=sys.stderr)
    return 0


@command(
    "dead-letters replay", "post the dead letters again; delete those taken",
    arg("--to", required=True, help="where to post them: the broker's URL (kubectl get broker)"),
    arg("--id", type=int, action="append", help="only this dead letter (repeat)"),
    arg("--limit", type=int, default=None, help="replay at most this many"),
    arg("--timeout", type=float, default=30.0, help="seconds to wait for each answer"),
    needs_settings=True,
)
def dead_letters_replay(args: argparse.Namespace) -> int:
    """Post each dead letter to ``--to`` in binary mode, as the broker would; delete it on 2xx."""
    import urllib.error
    import urllib.request

    from shared.dead_letters import DeadLetterStore
    from shared.http import internal_headers

    store = DeadLetterStore(_database())
    replayed = failed = 0
    for letter in store.letters(limit=args.limit, ids=args.id):
        attributes = letter.replay_attributes()
        headers = {f"ce-{k}": v for k, v in attributes.items() if k != "datacontenttype"}
        headers["Content-Type"] = attributes.get("datacontenttype", "application/json")
        request = urllib.request.Request(
            args.to, data=letter.data, headers=headers | internal_headers(), method="POST"
        )
        try:
            with urllib.request.urlopen(request, timeout=args.timeout) as response:
                status, error = response.status, None
        except urllib.error.HTTPError as exc:
            status, error = exc.code, f"HTTP {exc.code}"
        except OSError as exc:
            status, error = None, f"not reachable: {getattr(exc, 'reason', exc)}"
        if status is not None and 200 <= status < 300:
            store.replayed(letter.id)
            replayed += 1
            print(f"{letter.id}: {letter.event_type} id={letter.event_id}: HTTP {status}, replayed")
        else:
            store.replay_failed(letter.id, error or f"HTTP {status}")
            failed += 1
            print(f"{letter.id}: {letter.event_type} id={letter.event_id}: {error}, kept")
    print(f"{replayed} replayed, {failed} kept", file=sys.stderr)
    return 1 if failed else 0


@command("dev-keys", "make a key pair standing in for the wiki's OAuth server (local stack)",
         arg("dir", help="folder for auth-private.pem and auth-public.pem"))
def dev_keys(args: argparse.Namespace) -> int:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    folder = Path(args.dir)
    private_path, public_path = folder / "auth-private.pem", folder / "auth-public.pem"
    if private_path.exists():
        print(f"{private_path} exists; keeping it")
        return 0
    folder.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    private_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    private_path.chmod(0o600)
    public_path.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    print(f"wrote {private_path} and {public_path}")
    return 0


@command(
    "dev-token", "sign a local access token for a user (with the dev-keys key)",
    arg("--user", required=True, help="the user id (the token's sub)"),
    arg("--key", help="private key PEM (default: auth-private.pem in PUSH_LOCAL_DIR, .local)"),
    arg("--lifetime", type=int, default=3600, help="seconds until it expires (default: %(default)s)"),
)
def dev_token(args: argparse.Namespace) -> int:
    import jwt

    path = Path(args.key) if args.key else local_dir() / "auth-private.pem"
    try:
        key = path.read_text()
    except OSError as exc:
        raise Failed(f"cannot read the signing key {path} ({exc.strerror}): run `make run` once "
                     f"(it makes one), or `pushctl dev-keys {path.parent}`") from None
    now = int(time.time())
    claims = {"sub": args.user, "iat": now, "exp": now + args.lifetime}
    print(jwt.encode(claims, key, algorithm="ES256"))
    return 0


_SCOPE = (
    arg("--provider", choices=("apns", "fcm", "webpush"), help="only this provider (default: all)"),
    arg("--app", metavar="NAME", help="only this app of PUSH_APPS, or default (default: all)"),
)


def _scope(args: argparse.Namespace) -> tuple[str, str]:
    """The (provider, app) a pause or resume names: ``*`` for what is left out, ``""`` for the
    default app (``--app default``)."""
    from shared.core import DEFAULT_APP
    from shared.holds import ALL

    app = ALL if args.app is None else DEFAULT_APP if args.app == "default" else args.app
    return args.provider or ALL, app


def _what(provider: str, app: str) -> str:
    from shared.core import app_name
    from shared.holds import ALL

    providers = "every provider" if provider == ALL else provider
    return providers + (", every app" if app == ALL else f", app {app_name(app)}")


@command(
    "pause", "stop sending to a provider and/or app at once (every replica within 5 s)", *_SCOPE,
    arg("--reason", required=True, help="why: shown by `pushctl status` and kept with the pause"),
    arg("--by", help="who (default: the login name)"),
    arg("--discard", action="store_true", help="drop the wake-ups (counted) instead of keeping them for the resume"),
    needs_settings=True,
)
def pause(args: argparse.Namespace) -> int:
    """The emergency stop: wake-ups are kept for the resume, or dropped with ``--discard``."""
    import getpass

    from shared.holds import HoldStore

    provider, app = _scope(args)
    hold = HoldStore(_database()).pause(provider, app, args.reason, args.by or getpass.getuser(), args.discard)
    kept = "counted and dropped (--discard)" if hold.discard else "kept, and sent once on resume"
    print(f"paused {_what(provider, app)} since {hold.since:%Y-%m-%dT%H:%M:%SZ}: wake-ups are {kept}")
    return 0


@command(
    "resume", "end a pause: the kept wake-ups are sent once", *_SCOPE,
    arg("--tick-to", metavar="URL", help="post a flush tick there (the broker's URL) so kept wake-ups leave now"),
    arg("--timeout", type=float, default=30.0, help="seconds to wait for the tick's answer"),
    needs_settings=True,
)
def resume(args: argparse.Namespace) -> int:
    from shared.events import post_flush_tick
    from shared.holds import HoldStore

    provider, app = _scope(args)
    if not HoldStore(_database()).resume(provider, app):
        print(f"pushctl resume: {_what(provider, app)} is not paused (`pushctl status` lists the pauses)",
              file=sys.stderr)
        return 1
    print(f"resumed {_what(provider, app)}: the kept wake-ups go out with the next flush")
    if args.tick_to:
        problem = post_flush_tick(args.tick_to, "/push-functions/pushctl", args.timeout)
        if problem is not None:
            print(f"pushctl resume: the flush tick to {args.tick_to} failed: {problem}", file=sys.stderr)
            return 1
        print(f"flush tick posted to {args.tick_to}")
    return 0


@command("status", "what is paused or held, since when, by whom and why, and the wake-ups kept",
         needs_settings=True)
def status(_args: argparse.Namespace) -> int:
    from shared.core import app_name
    from shared.holds import CREDENTIALS, HoldStore
    from shared.pending import REFUSED, PendingStore

    engine = _database()
    holds = HoldStore(engine).read().holds
    for hold in sorted(holds, key=lambda h: (h.kind, h.provider, h.app)):
        since = f"{hold.since:%Y-%m-%dT%H:%M:%SZ}"
        probe = f", next probe {hold.probe_at:%Y-%m-%dT%H:%M:%SZ}" if hold.probe_at else ""
        if hold.kind == CREDENTIALS:
            print(f"credentials refused: {_what(hold.provider, hold.app)} since {since} "
                  f"({hold.reason}; {hold.failures} probe(s) failed{probe})")
        elif hold.kind == REFUSED:
            print(f"key refused by some devices: {_what(hold.provider, hold.app)} since {since} "
                  f"({hold.reason}; their wake-ups wait for a delivery to the app{probe}; nothing held)")
        else:
            mode = ", discarding" if hold.discard else ""
            print(f"paused: {_what(hold.provider, hold.app)} since {since} by {hold.held_by or '?'}{mode}: {hold.reason}")
    if not holds:
        print("nothing is paused or held")
    for (provider, app), (count, kept) in sorted(PendingStore(engine).waiting().items()):
        print(f"waiting: {provider} app {app_name(app)}: {kept} kept, {count - kept} in the privacy delay")
    return 0


# --- plumbing -----------------------------------------------------------------------------------


def _database() -> Engine:
    """The engine of an existing database, its schema checked; an SQLite file that does not
    exist is a mistake in the settings, not a database to create."""
    from shared.db import check_schema

    url = make_url(database_url())
    if url.get_backend_name() == "sqlite" and url.database not in (None, "", ":memory:"):
        if not Path(url.database).exists():
            named = "names it" if secret("PUSH_DATABASE_URL") else "is not set"
            raise Failed(
                f"no database at {url.database} (PUSH_DATABASE_URL {named}): set PUSH_DATABASE_URL, "
                f"or run pushctl from the repository after `make run` (it reads .local/{FILE_NAME})"
            )
    engine = get_engine()
    check_schema(engine)
    return engine


def _age(now: datetime, then: datetime) -> str:
    seconds = max(0, int((now - then).total_seconds()))
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds // size} {unit} ago"
    return f"{seconds} s ago"


def _unreachable(exc: DatabaseUnavailable) -> str:
    where = make_url(database_url()).render_as_string(hide_password=True)
    cause = exc.__cause__
    detail = getattr(cause, "orig", None) or cause or exc
    return (f"cannot reach the database {where}: {detail}; check PUSH_DATABASE_URL and that the "
            f"database server is running")


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(
        prog="pushctl", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = top.add_subparsers(dest="command", required=True, metavar="COMMAND")
    groups: dict[str, Any] = {}
    for each in COMMANDS:
        group, _, action = each.name.partition(" ")
        if action and group not in groups:
            groups[group] = commands.add_parser(group, help=GROUPS[group], description=GROUPS[group]).add_subparsers(
                dest="action", required=True, metavar="ACTION"
            )
        where = groups[group] if action else commands
        sub = where.add_parser(action or each.name, help=each.help, description=each.help)
        for names, options in each.arguments:
            sub.add_argument(*names, **options)
        sub.set_defaults(command_spec=each)
    return top


def main(argv: list[str] | None = None) -> int:
    # What each command prints says what went wrong and what to check; the provider clients'
    # own warnings (a refused connection, retried) would only repeat it less clearly.
    logging.basicConfig(level=logging.ERROR, format="pushctl: %(name)s: %(message)s")
    args = parser().parse_args(argv)
    spec: Command = args.command_spec
    try:
        if spec.needs_settings and (settings := load_local_settings()) is not None:
            print(f"pushctl: using the local stack's settings in {settings}", file=sys.stderr)
        return spec.run(args)
    except (Failed, ConfigError, SchemaBehind) as exc:
        message = str(exc)
    except DatabaseUnavailable as exc:
        message = _unreachable(exc)
    except KeyboardInterrupt:
        return 130
    print(f"pushctl: {message}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
