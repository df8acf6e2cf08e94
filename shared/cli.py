"""``pushctl``: the operator's command-line tool.

- ``pushctl migrate`` applies the schema migrations to ``PUSH_DATABASE_URL`` (run it before the
  functions roll out; a function refuses a database whose schema is behind).
- ``pushctl vapid-keygen`` makes a VAPID key pair for Web Push: the private key for
  ``PUSH_VAPID_PRIVATE_KEY`` and the public key apps pass as ``applicationServerKey``.
- ``pushctl send-test --user ID [--dry-run]`` sends a wake-up to one user's devices with every
  configured provider, each device with its app's credentials (``PUSH_APPS``), and prints each
  outcome: for checking credentials.
- ``pushctl import-echo --from URL [--dry-run] [--apns-environment production|sandbox]
  [--batch N] [--refreshed-at-import] [--default-topic TOPIC]`` copies the push subscriptions
  Echo holds into ours (:mod:`shared.echo_import`).
- ``pushctl dead-letters list`` shows the events the broker gave up on (kept by clean-up), and
  ``pushctl dead-letters replay --to URL`` posts them again (to the broker's URL, say) and deletes
  each one the URL takes: safe, since a redelivered event never wakes a device twice
  (:mod:`shared.dead_letters`).
- ``pushctl dev-keys DIR`` and ``pushctl dev-token --user ID``: a local signing key standing in for
  the wiki's OAuth server, so a developer can call subscribe on a laptop.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from shared.config import ConfigError
from shared.db import get_engine


def migrate(_args: argparse.Namespace) -> int:
    from alembic import command
    from alembic.config import Config

    engine = get_engine()
    config = Config()
    config.set_main_option("script_location", str(Path(__file__).with_name("migrations")))
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, "head")
    url = engine.url.render_as_string(hide_password=True)
    print(f"database {url} is at the newest schema")
    return 0


def vapid_keygen(_args: argparse.Namespace) -> int:
    from shared.vapid import generate_vapid_keys

    private_key, public_key = generate_vapid_keys()
    print(f"PUSH_VAPID_PRIVATE_KEY={private_key}")
    print(f"applicationServerKey (for the apps)={public_key}")
    return 0


PROVIDER_MODULES = {"fcm": "FcmProvider", "apns": "ApnsProvider", "webpush": "WebPushProvider"}


def send_test(args: argparse.Namespace) -> int:
    import asyncio
    import importlib

    from shared.apns_tokens import ApnsTokenStore
    from shared.apps import providers_from_env
    from shared.db import check_schema
    from shared.endpoints import EndpointRules
    from shared.providers.base import WakeUp
    from shared.subscriptions import SubscriptionStore

    engine = get_engine()
    check_schema(engine)
    store = SubscriptionStore(engine)
    wakeup = WakeUp(args.message_type, ttl_seconds=300, dry_run=args.dry_run)

    async def run() -> int:
        sent = found = 0
        for name, class_name in PROVIDER_MODULES.items():
            if args.provider and name != args.provider:
                continue
            subscriptions = store.for_users([args.user], name)
            if not subscriptions:
                continue
            found += len(subscriptions)
            try:
                module = importlib.import_module(f"shared.providers.{name}")
                # The dispatchers' routing: each device through its app's credentials, with what
                # the dispatcher gives every app's provider (functions/dispatch-*/main.py).
                shared: dict[str, object] = {}
                if name == "apns":
                    shared = {"token_store": ApnsTokenStore.from_env(engine)}
                elif name == "webpush":
                    shared = {"endpoint_rules": EndpointRules.from_env()}
                provider = providers_from_env(getattr(module, class_name), **shared)
            except ConfigError as exc:
                print(f"{name}: not configured: {exc}")
                continue
            try:
                for device in subscriptions:
                    result = await provider.send(device, wakeup)
                    sent += 1
                    detail = f" ({result.reason})" if result.reason else ""
                    print(f"{name} subscription {device.id}: {result.outcome.value}{detail}")
            finally:
                await provider.aclose()
        if not found:
            print(f"user {args.user} has no subscriptions to send to")
        elif not sent:
            print("nothing was sent: configure the providers named above")
        return 0 if sent else 1

    return asyncio.run(run())


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


def dead_letters_list(args: argparse.Namespace) -> int:
    from shared.db import check_schema
    from shared.dead_letters import DeadLetterStore

    engine = get_engine()
    check_schema(engine)
    found = 0
    for letter in DeadLetterStore(engine).letters(limit=args.limit):
        found += 1
        failed = f" replays failed: {letter.replay_attempts} ({letter.last_replay_error})" if letter.replay_attempts else ""
        print(f"{letter.id}\t{letter.received_at:%Y-%m-%dT%H:%M:%SZ}\t{letter.event_type}\tid={letter.event_id}"
              f"\tcode={letter.error_code}\tdest={letter.destination}{failed}")
    print(f"{found} dead letter(s)", file=sys.stderr)
    return 0


def dead_letters_replay(args: argparse.Namespace) -> int:
    """Post each dead letter to ``--to`` in binary mode, as the broker would; delete it on 2xx."""
    import urllib.error
    import urllib.request

    from shared.db import check_schema
    from shared.dead_letters import DeadLetterStore
    from shared.http import internal_headers

    engine = get_engine()
    check_schema(engine)
    store = DeadLetterStore(engine)
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


def dev_token(args: argparse.Namespace) -> int:
    import jwt

    key = Path(args.key).read_text()
    now = int(time.time())
    claims = {"sub": args.user, "iat": now, "exp": now + args.lifetime}
    print(jwt.encode(claims, key, algorithm="ES256"))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pushctl", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    commands.add_parser("migrate", help="apply schema migrations to PUSH_DATABASE_URL").set_defaults(
        run=migrate
    )

    commands.add_parser("vapid-keygen", help="make a VAPID key pair for Web Push").set_defaults(
        run=vapid_keygen
    )

    test = commands.add_parser("send-test", help="send a wake-up to one user's devices")
    test.add_argument("--user", required=True, help="the user id")
    test.add_argument("--dry-run", action="store_true", help="validate only; nothing reaches devices")
    test.add_argument("--provider", choices=sorted(PROVIDER_MODULES), help="only this provider")
    test.add_argument("--message-type", default="checkEchoV1", help="the wake-up's type")
    test.set_defaults(run=send_test)

    echo = commands.add_parser("import-echo", help="copy Echo's push subscriptions into PUSH_DATABASE_URL")
    echo.add_argument("--from", dest="source", required=True, metavar="URL", help="Echo's database (mysql+pymysql://...)")
    echo.add_argument("--dry-run", action="store_true", help="report what it would do; write nothing")
    echo.add_argument("--apns-environment", choices=("production", "sandbox"), default="production")
    echo.add_argument("--batch", type=int, default=1000, metavar="N", help="Echo rows per transaction")
    echo.add_argument(
        "--refreshed-at-import", action="store_true",
        help="write the import's start as the last refresh of the rows it writes, not eps_updated",
    )
    echo.add_argument("--default-topic", metavar="TOPIC", help="the APNs topic of Echo's rows that have none")
    echo.set_defaults(run=import_echo)
    letters = commands.add_parser("dead-letters", help="the events the broker gave up on")
    letter_commands = letters.add_subparsers(dest="action", required=True)
    listing = letter_commands.add_parser("list", help="show the dead letters, oldest first")
    listing.add_argument("--limit", type=int, default=None, help="show at most this many")
    listing.set_defaults(run=dead_letters_list)
    replay = letter_commands.add_parser("replay", help="post the dead letters again; delete those taken")
    replay.add_argument("--to", required=True, help="where to post them: the broker's URL (kubectl get broker)")
    replay.add_argument("--id", type=int, action="append", help="only this dead letter (repeat)")
    replay.add_argument("--limit", type=int, default=None, help="replay at most this many")
    replay.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for each answer")
    replay.set_defaults(run=dead_letters_replay)

    keys = commands.add_parser("dev-keys", help="make a local key pair for signing dev tokens")
    keys.add_argument("dir", help="folder for auth-private.pem and auth-public.pem")
    keys.set_defaults(run=dev_keys)

    token = commands.add_parser("dev-token", help="sign a local access token for a user")
    token.add_argument("--user", required=True, help="the user id (the token's sub)")
    token.add_argument("--key", default=".local/auth-private.pem", help="private key PEM")
    token.add_argument("--lifetime", type=int, default=3600, help="seconds until it expires")
    token.set_defaults(run=dev_token)

    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except ConfigError as exc:
        print(f"pushctl: configuration error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
