"""Secrets given as values or as file paths (shared.config): a secret a function needs whose path
names no file stops it, naming the setting and the path, rather than being taken for the secret
itself; a function that does not use it is not stopped (one shared setting, or one PUSH_APPS
file, may name a file mounted only in the functions that need it)."""
from __future__ import annotations

import json

import pytest

from shared.apps import load_apps
from shared.config import ConfigError, require_secret, secret
from shared.providers.fcm import FcmProvider
from shared.providers.router import providers_from_env


def test_a_secret_may_be_the_path_of_a_file(tmp_path, monkeypatch):
    (tmp_path / "key.pem").write_text("the key\n")
    monkeypatch.setenv("PUSH_APNS_KEY", str(tmp_path / "key.pem"))
    assert require_secret("PUSH_APNS_KEY", "test") == "the key"


@pytest.mark.parametrize("path", ["/nonexistent/AuthKey.p8", "./AuthKey.p8", "../keys/AuthKey.p8", "~/no/AuthKey.p8"])
def test_a_needed_secret_whose_path_names_no_file_is_refused_naming_setting_and_path(path, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PUSH_APNS_KEY", path)
    with pytest.raises(ConfigError, match=f"PUSH_APNS_KEY names the file {path}, which does not exist"):
        require_secret("PUSH_APNS_KEY", "test")


def test_a_long_one_line_value_is_the_value_not_a_file_name(monkeypatch):
    value = json.dumps({"private_key": "x" * 600})  # longer than a file name may be
    monkeypatch.setenv("PUSH_FCM_CREDENTIALS", value)
    assert secret("PUSH_FCM_CREDENTIALS") == value


def test_an_apps_missing_key_file_stops_only_the_provider_that_needs_it(monkeypatch):
    monkeypatch.setenv("PUSH_APPS", json.dumps({"commons": {
        "fcm": {"credentials": "/nonexistent/sa.json"},
        "webpush": {"vapid_private_key": "/nonexistent/vapid", "vapid_subject": "mailto:push@example.org"},
    }}))
    assert load_apps().names("fcm") == {"commons"}  # subscribe, say, reads the file and goes on
    with pytest.raises(ConfigError, match=r"PUSH_APPS\.commons\.fcm\.credentials names the file /nonexistent/sa.json"):
        providers_from_env(FcmProvider)
