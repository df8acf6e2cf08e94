"""pushctl: the operator's commands (migrate's schema rules are in test_schema.py).

Outcomes are read from what pushctl prints and from what reached the fake providers; errors are
checked in a separate process, as an operator sees them: one line on stderr, no traceback."""
from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import trustme
from alembic import command
from alembic.config import Config
from cryptography.hazmat.primitives.asymmetric import ec

from shared.cli import main as pushctl
from shared.db import SCHEMA_REVISION, get_engine
from shared.localenv import write_settings
from shared.subscriptions import NewSubscription, SubscriptionStore
from shared.vapid import generate_vapid_keys
from tests import subscription_bodies as bodies
from tests.stores import subscribe

REPO = Path(__file__).resolve().parent.parent


def run_pushctl(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """pushctl in a process of its own, with no PUSH_ setting but those given."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("PUSH_")}
    return subprocess.run(
        [sys.executable, "-m", "shared.cli", *args], cwd=cwd, env=clean | (env or {}) | {"PYTHONPATH": str(REPO)},
        capture_output=True, text=True, timeout=60,
    )


def assert_one_line_error(result: subprocess.CompletedProcess, *words: str) -> None:
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for word in words:
        assert word in lines[0]


# --- help, keys ----------------------------------------------------------------------------------


def test_help_is_plain_text_listing_every_command(tmp_path):
    result = run_pushctl("--help", cwd=tmp_path)
    assert result.returncode == 0
    for name in ("migrate", "send-test", "subscriptions", "vapid-keygen", "dev-keys", "dev-token"):
        assert name in result.stdout
    for markup in ("``", ":func:", ":class:", ":mod:", ".. "):
        assert markup not in result.stdout


def test_vapid_keygen_prints_a_matching_key_pair(capsys):
    assert pushctl(["vapid-keygen"]) == 0
    lines = dict(line.split("=", 1) for line in capsys.readouterr().out.splitlines())
    private = base64.urlsafe_b64decode(lines["PUSH_VAPID_PRIVATE_KEY"] + "==")
    public = base64.urlsafe_b64decode(lines["applicationServerKey (for the apps)"] + "==")
    key = ec.derive_private_key(int.from_bytes(private, "big"), ec.SECP256R1())
    assert ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), public) == key.public_key()


def test_dev_token_without_its_key_says_how_to_make_one(tmp_path):
    assert_one_line_error(run_pushctl("dev-token", "--user", "1", cwd=tmp_path), "auth-private.pem", "make run", "dev-keys")


def test_dev_token_signs_with_the_local_stacks_key(tmp_path):
    assert run_pushctl("dev-keys", ".local", cwd=tmp_path).returncode == 0
    token = run_pushctl("dev-token", "--user", "1", cwd=tmp_path).stdout.strip()
    claims = json.loads(base64.urlsafe_b64decode(token.split(".")[1] + "=="))
    assert claims["sub"] == "1"


# --- migrate -------------------------------------------------------------------------------------


def test_migrate_says_what_it_applied_and_then_that_there_was_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PUSH_DATABASE_URL", f"sqlite:///{tmp_path / 'new.sqlite3'}")
    assert pushctl(["migrate"]) == 0
    assert capsys.readouterr().out.rstrip().endswith(f"applied 0001..{SCHEMA_REVISION}")
    assert pushctl(["migrate"]) == 0
    assert capsys.readouterr().out.rstrip().endswith(f"is already at {SCHEMA_REVISION}")


def test_migrate_from_an_older_schema_names_the_revisions_it_applied(tmp_path, monkeypatch, capsys):
    url = f"sqlite:///{tmp_path / 'old.sqlite3'}"
    config = Config()
    config.set_main_option("script_location", str(REPO / "shared" / "migrations"))
    with get_engine(url).begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, "0001")
    monkeypatch.setenv("PUSH_DATABASE_URL", url)
    assert pushctl(["migrate"]) == 0
    assert capsys.readouterr().out.rstrip().endswith(f"applied 0002..{SCHEMA_REVISION}")


# --- send-test -----------------------------------------------------------------------------------


def test_send_test_exits_0_when_every_device_got_the_wake_up(rig, engine, capsys):
    device = rig.add(engine, "7")
    assert pushctl(["send-test", "--user", "7"]) == 0
    out = capsys.readouterr().out
    assert f"{rig.provider} subscription {device.id} (device {device.token_sha256[:12]}): delivered" in out
    assert "1 of 1 delivered" in out
    assert rig.wakeups(device) == ["checkEchoV1"]
    assert device.token not in out


def test_send_test_exits_1_when_a_send_was_not_delivered(rig, engine, capsys):
    alive, dead = rig.add(engine, "7"), rig.add(engine, "7")
    rig.dead(dead)
    assert pushctl(["send-test", "--user", "7"]) == 1
    out = capsys.readouterr().out
    assert f"{rig.provider} subscription {alive.id} (device {alive.token_sha256[:12]}): delivered" in out
    assert f"{rig.provider} subscription {dead.id} (device {dead.token_sha256[:12]}): dead" in out
    assert "1 of 2 delivered" in out


def test_send_test_dry_run_reaches_no_device(rig, engine, capsys):
    row = rig.add(engine, "7")
    assert pushctl(["send-test", "--user", "7", "--dry-run"]) == 0
    assert rig.wakeups(row) == []


def test_send_test_says_which_providers_the_user_has_no_subscriptions_with(webpush_rig, engine, capsys):
    webpush_rig.add(engine, "7")
    assert pushctl(["send-test", "--user", "7"]) == 0
    out = capsys.readouterr().out
    assert "no fcm subscriptions for user 7" in out
    assert "no apns subscriptions for user 7" in out


def test_send_test_for_one_provider_the_user_lacks_fails(webpush_rig, engine, capsys):
    webpush_rig.add(engine, "7")
    assert pushctl(["send-test", "--user", "7", "--provider", "fcm"]) == 1
    out = capsys.readouterr().out
    assert "no fcm subscriptions for user 7" in out
    assert webpush_rig.fake.pushes == []


def test_send_test_for_a_user_without_devices_fails(engine, capsys):
    assert pushctl(["send-test", "--user", "nobody"]) == 1
    assert "user nobody has no subscriptions" in capsys.readouterr().out


def test_send_test_names_the_ca_file_when_the_provider_is_not_trusted(rig, engine, capsys, monkeypatch, tmp_path):
    setting = f"PUSH_{rig.provider.upper()}_CA_FILE"
    row = rig.add(engine, "7")
    stranger = tmp_path / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(stranger))
    monkeypatch.setenv(setting, str(stranger))
    monkeypatch.setenv(f"PUSH_{rig.provider.upper()}_TIMEOUT_SECONDS", "3")
    assert pushctl(["send-test", "--user", "7"]) == 1
    out = capsys.readouterr().out
    assert f"subscription {row.id}" in out
    assert setting in out.split(f"subscription {row.id}", 1)[1].splitlines()[0]
    assert rig.wakeups(row) == []


def test_send_test_names_a_missing_key_file(engine, capsys, monkeypatch):
    subscribe(SubscriptionStore(engine), "7", NewSubscription("apns", "ab" * 32, "ab" * 32, "org.example", "production"))
    monkeypatch.setenv("PUSH_APNS_KEY", "/nonexistent/AuthKey.p8")
    assert pushctl(["send-test", "--user", "7"]) == 1
    out = capsys.readouterr().out
    assert "apns: nothing sent: PUSH_APNS_KEY names the file /nonexistent/AuthKey.p8, which does not exist" in out


def test_send_test_names_missing_configuration(engine, capsys, monkeypatch):
    subscribe(SubscriptionStore(engine), "7", NewSubscription("apns", "ab" * 32, "ab" * 32, "org.example", "production"))
    monkeypatch.delenv("PUSH_APNS_KEY", raising=False)
    monkeypatch.setenv("PUSH_SECRETS_DIR", "/nonexistent")
    assert pushctl(["send-test", "--user", "7"]) == 1
    out = capsys.readouterr().out
    assert "PUSH_APNS_KEY is not set" in out
    assert "0 of 1 delivered" in out


def test_send_test_to_one_raw_token_reaches_that_device(rig, engine, capsys):
    device = rig.new_subscription()  # not subscribed: only the token is given
    extra = ["--topic", device.topic] if rig.provider == "apns" else []
    assert pushctl(["send-test", "--provider", rig.provider, "--token", device.token, *extra]) == 0
    assert f"{rig.provider} token (device " in capsys.readouterr().out
    assert rig.wakeups(device) == ["checkEchoV1"]


@pytest.mark.parametrize("args, words", [
    (["--token", "abc"], ["--provider"]),
    (["--token", "ab" * 32, "--provider", "apns"], ["--topic"]),
    ([], ["--user", "--token"]),
])
def test_send_test_arguments_that_do_not_go_together_are_refused(args, words, tmp_path):
    assert_one_line_error(run_pushctl("send-test", *args, cwd=tmp_path), *words)


def test_send_test_sends_each_device_with_its_apps_credentials(webpush_rig, engine, capsys, monkeypatch):
    """As the dispatchers do: a device of a ``PUSH_APPS`` app signed with the default app's VAPID
    key would be refused by its push service, and the operator misled about the credentials."""
    commons = generate_vapid_keys()
    monkeypatch.setenv("PUSH_APPS", json.dumps({"commons": {"webpush": {
        "vapid_private_key": commons.private_key, "vapid_subject": "mailto:push@example.org",
        "ca_file": webpush_rig.fake.ca_file}}}))
    browser = webpush_rig.fake.subscribe(commons.public_key)
    device = subscribe(SubscriptionStore(engine), 
        "7", NewSubscription("webpush", json.dumps(browser), browser["endpoint"], app="commons")
    ).subscription
    assert pushctl(["send-test", "--user", "7"]) == 0
    assert f"webpush subscription {device.id} (device {device.token_sha256[:12]}): delivered" in capsys.readouterr().out
    assert [(p.status, p.vapid_key) for p in webpush_rig.fake.pushes_to(browser)] == [(201, commons.public_key)]


# --- subscriptions -------------------------------------------------------------------------------


def test_subscriptions_lists_a_users_devices_by_hash_never_by_token(engine, capsys):
    store = SubscriptionStore(engine)
    fcm_token, apns_token = bodies.fcm_token(), bodies.apns_token()
    fcm = subscribe(store, "7", NewSubscription("fcm", fcm_token, fcm_token)).subscription
    apns = subscribe(store, "7", NewSubscription("apns", apns_token, apns_token, bodies.TOPIC, "sandbox")).subscription
    subscribe(store, "8", NewSubscription("fcm", "someone-else", "someone-else"))
    assert pushctl(["subscriptions", "--user", "7"]) == 0
    header, *lines = capsys.readouterr().out.splitlines()
    assert header.split()[:4] == ["id", "provider", "app", "device"]
    assert [line.split()[:2] for line in lines] == [[str(fcm.id), "fcm"], [str(apns.id), "apns"]]
    assert fcm.token_sha256[:16] in lines[0] and "s ago" in lines[0]
    assert f"{bodies.TOPIC} (sandbox)" in lines[1]
    assert fcm_token not in "".join(lines) and apns_token not in "".join(lines)


def test_subscriptions_of_a_user_without_devices(engine, capsys):
    assert pushctl(["subscriptions", "--user", "nobody"]) == 0
    assert capsys.readouterr().out.strip() == "user nobody has no subscriptions"


# --- settings, and errors as an operator sees them ----------------------------------------------


def test_run_from_a_checkout_pushctl_uses_the_local_stacks_settings(tmp_path):
    database_url = f"sqlite:///{tmp_path / '.local' / 'push.sqlite3'}"
    (tmp_path / ".local").mkdir()
    assert run_pushctl("migrate", cwd=tmp_path, env={"PUSH_DATABASE_URL": database_url}).returncode == 0
    subscribe(SubscriptionStore(get_engine(database_url)), "1", NewSubscription("fcm", "t", "t"))
    write_settings(tmp_path / ".local" / "local.env", {"PUSH_DATABASE_URL": database_url})
    result = run_pushctl("subscriptions", "--user", "1", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "using the local stack's settings" in result.stderr
    assert "fcm" in result.stdout


def test_a_database_url_in_the_environment_wins_over_the_local_settings(tmp_path):
    (tmp_path / ".local").mkdir()
    write_settings(tmp_path / ".local" / "local.env", {"PUSH_DATABASE_URL": "sqlite:////nonexistent/local.sqlite3"})
    result = run_pushctl("subscriptions", "--user", "1", cwd=tmp_path,
                         env={"PUSH_DATABASE_URL": f"sqlite:///{tmp_path / 'mine.sqlite3'}"})
    assert_one_line_error(result, "mine.sqlite3")
    assert "local stack" not in result.stderr


def test_without_settings_pushctl_says_so_and_leaves_no_stray_database(tmp_path):
    result = run_pushctl("send-test", "--user", "1", cwd=tmp_path)
    assert_one_line_error(result, "PUSH_DATABASE_URL is not set", "make run")
    assert list(tmp_path.iterdir()) == []


def test_an_unreachable_database_is_one_line_naming_the_setting(tmp_path, unused_tcp_port):
    url = f"mysql+pymysql://push:secret-password@127.0.0.1:{unused_tcp_port}/push"
    for args in (["migrate"], ["subscriptions", "--user", "1"], ["send-test", "--user", "1"]):
        result = run_pushctl(*args, cwd=tmp_path, env={"PUSH_DATABASE_URL": url})
        assert_one_line_error(result, "cannot reach the database", "PUSH_DATABASE_URL")
        assert "secret-password" not in result.stderr


def test_a_schema_behind_is_one_line_saying_to_migrate(tmp_path):
    (tmp_path / "empty.sqlite3").touch()
    result = run_pushctl("subscriptions", "--user", "1", cwd=tmp_path,
                         env={"PUSH_DATABASE_URL": f"sqlite:///{tmp_path / 'empty.sqlite3'}"})
    assert_one_line_error(result, "pushctl migrate")
