"""pushctl: the operator's commands other than migrate (tested in test_schema.py)."""
from __future__ import annotations

import base64
import json

from cryptography.hazmat.primitives.asymmetric import ec

from shared.cli import main as pushctl
from shared.vapid import generate_vapid_keys
from shared.subscriptions import NewSubscription, SubscriptionStore


def test_vapid_keygen_prints_a_matching_key_pair(capsys):
    assert pushctl(["vapid-keygen"]) == 0
    lines = dict(line.split("=", 1) for line in capsys.readouterr().out.splitlines())
    private = base64.urlsafe_b64decode(lines["PUSH_VAPID_PRIVATE_KEY"] + "==")
    public = base64.urlsafe_b64decode(lines["applicationServerKey (for the apps)"] + "==")
    key = ec.derive_private_key(int.from_bytes(private, "big"), ec.SECP256R1())
    assert ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), public) == key.public_key()


def test_send_test_prints_each_outcome_and_reaches_the_device(rig, engine, capsys):
    alive, dead = rig.add(engine, "7"), rig.add(engine, "7")
    rig.dead(dead)
    assert pushctl(["send-test", "--user", "7"]) == 0
    out = capsys.readouterr().out
    assert f"{rig.provider} subscription {alive.id}: delivered" in out
    assert f"{rig.provider} subscription {dead.id}: dead" in out
    assert rig.wakeups(alive) == ["checkEchoV1"]
    assert alive.token not in out


def test_send_test_dry_run_reaches_no_device(rig, engine, capsys):
    row = rig.add(engine, "7")
    assert pushctl(["send-test", "--user", "7", "--dry-run"]) == 0
    assert rig.wakeups(row) == []


def test_send_test_for_a_user_without_devices_fails(engine, capsys):
    assert pushctl(["send-test", "--user", "nobody"]) == 1
    assert "no subscriptions" in capsys.readouterr().out


def test_send_test_names_missing_configuration(engine, capsys, monkeypatch):
    from shared.subscriptions import NewSubscription, SubscriptionStore

    SubscriptionStore(engine).subscribe("7", NewSubscription("apns", "ab" * 32, "ab" * 32, "org.example", "production"))
    monkeypatch.delenv("PUSH_APNS_KEY", raising=False)
    monkeypatch.setenv("PUSH_SECRETS_DIR", "/nonexistent")
    assert pushctl(["send-test", "--user", "7"]) == 1
    out = capsys.readouterr().out
    assert "PUSH_APNS_KEY is not set" in out
    assert "nothing was sent" in out


def test_send_test_sends_each_device_with_its_apps_credentials(webpush_rig, engine, capsys, monkeypatch):
    """As the dispatchers do: a device of a ``PUSH_APPS`` app signed with the default app's VAPID
    key would be refused by its push service, and the operator misled about the credentials."""
    commons = generate_vapid_keys()
    monkeypatch.setenv("PUSH_APPS", json.dumps({"commons": {"webpush": {
        "vapid_private_key": commons.private_key, "vapid_subject": "mailto:push@example.org",
        "ca_file": webpush_rig.fake.ca_file}}}))
    browser = webpush_rig.fake.subscribe(commons.public_key)
    device = SubscriptionStore(engine).subscribe(
        "7", NewSubscription("webpush", json.dumps(browser), browser["endpoint"], app="commons")
    ).subscription
    assert pushctl(["send-test", "--user", "7"]) == 0
    assert f"webpush subscription {device.id}: delivered" in capsys.readouterr().out
    assert [(p.status, p.vapid_key) for p in webpush_rig.fake.pushes_to(browser)] == [(201, commons.public_key)]
