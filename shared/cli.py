"""``pushctl``: the operator's command-line tool.

- ``pushctl migrate`` applies the schema migrations to ``PUSH_DATABASE_URL`` (run it before the
  functions roll out; a function refuses a database whose schema is behind).
- ``pushctl dev-keys DIR`` and ``pushctl dev-token --user ID``: a local signing key standing in for
  the wiki's OAuth server, so a developer can call subscribe on a laptop.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from shared.config import ConfigError


def migrate(_args: argparse.Namespace) -> int:
    from alembic import command
    from alembic.config import Config

    from shared.db import get_engine

    engine = get_engine()
    config = Config()
    config.set_main_option("script_location", str(Path(__file__).with_name("migrations")))
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, "head")
    url = engine.url.render_as_string(hide_password=True)
    print(f"database {url} is at the newest schema")
    return 0


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
