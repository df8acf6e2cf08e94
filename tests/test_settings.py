"""Settings are declared once (shared/settings.py), read once when a function starts, checked
there, rules between them included, with errors naming the variables; the configuration page's
table is generated from the declarations."""
from __future__ import annotations

import ast
import importlib.util
import re
from pathlib import Path

import pytest

from shared import settings
from shared.config import ConfigError
from shared.settings import (
    DECLARED,
    RULES,
    SETTINGS,
    CleanupSettings,
    DatabaseSettings,
    DispatchSettings,
    SubscriptionApiSettings,
    read_setting,
)

REPO = Path(__file__).resolve().parent.parent
LOCAL_STACK = {"PUSH_LOCAL_DIR", "PUSH_LOCAL_BASE_PORT", "PUSH_TEST_MARIADB_URL"}
"""Settings of the local stack and the tests, in the page's second table, not the functions'."""


@pytest.fixture
def clean_env(monkeypatch):
    """No declared setting set: every one at its default."""
    for name in DECLARED:
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(f"{name}_FILE", raising=False)
    monkeypatch.setenv("PUSH_SECRETS_DIR", "/nonexistent")


def generator():
    spec = importlib.util.spec_from_file_location("gen_config_docs", REPO / "scripts" / "gen_config_docs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_setting_the_code_names_is_declared() -> None:
    named = set()
    for path in [*(REPO / "shared").rglob("*.py"), *(REPO / "functions").glob("*/main.py")]:
        named |= set(re.findall(r"\"((?:PUSH_[A-Z0-9_]+)|K_SINK)\"", path.read_text()))
    # NAME_FILE is how a secret NAME may be given as a file.
    named = {name if name in DECLARED else name.removesuffix("_FILE") for name in named} - LOCAL_STACK
    assert sorted(named - set(DECLARED)) == []


def test_no_module_reads_a_setting_with_a_default_of_its_own() -> None:
    """Defaults and bounds live in the declarations: outside shared/config.py and
    shared/settings.py a setting is read with read_setting (required secrets and ids with
    shared.config's require_*)."""
    readers = {"env", "env_int", "env_float", "env_list"}
    found = []
    for path in sorted((REPO / "shared").rglob("*.py")):
        if path.name in ("config.py", "settings.py"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in readers:
                found.append(f"{path.relative_to(REPO)}:{node.lineno} {node.func.id}()")
    assert found == []


def test_each_setting_is_declared_once() -> None:
    names = [setting.name for setting in SETTINGS]
    assert sorted({name for name in names if names.count(name) > 1}) == []


def test_each_setting_is_read_by_a_function_or_pushctl() -> None:
    readers = {*settings.FUNCTIONS, settings.IMPORT_ECHO}
    assert [s.name for s in SETTINGS if not s.used_by or not set(s.used_by) <= readers] == []


def test_the_typed_settings_defaults_are_the_declared_ones(clean_env) -> None:
    assert DispatchSettings.from_env() == DispatchSettings()
    assert CleanupSettings.from_env() == CleanupSettings()
    assert SubscriptionApiSettings.from_env() == SubscriptionApiSettings()
    assert DatabaseSettings.from_env() == DatabaseSettings()


@pytest.mark.parametrize("name", [s.name for s in SETTINGS if s.kind in (settings.INT, settings.FLOAT)])
def test_a_number_setting_malformed_or_out_of_range_stops_the_start_naming_it(name, clean_env, monkeypatch) -> None:
    monkeypatch.setenv(name, "lots")
    with pytest.raises(ConfigError, match=name):
        read_setting(name)
    low = DECLARED[name].minimum or 0
    monkeypatch.setenv(name, str(low - 1))
    with pytest.raises(ConfigError, match=name):
        read_setting(name)


@pytest.mark.parametrize("rule", RULES, ids=lambda rule: rule.above)
def test_a_rule_between_settings_stops_a_dispatcher_naming_both(rule, clean_env, monkeypatch) -> None:
    monkeypatch.setenv(rule.above, "30")
    monkeypatch.setenv(rule.below, "30")
    with pytest.raises(ConfigError, match=f"{rule.above} \\(30\\) must be above {rule.below} \\(30\\)"):
        DispatchSettings.from_env()


def test_the_delivery_lease_must_outlast_the_deadline(clean_env, monkeypatch) -> None:
    """A claim that runs out while its send still runs lets a redelivery push to the device too."""
    monkeypatch.setenv("PUSH_DISPATCH_DEADLINE_SECONDS", "130")
    monkeypatch.setenv("PUSH_PENDING_LEASE_SECONDS", "200")
    with pytest.raises(ConfigError, match="^PUSH_DELIVERY_LEASE_SECONDS \\(120\\) must be above"):
        DispatchSettings.from_env()
    monkeypatch.setenv("PUSH_DELIVERY_LEASE_SECONDS", "150")
    assert DispatchSettings.from_env().deadline_seconds == 130


def test_every_broken_rule_is_named_at_once(clean_env, monkeypatch) -> None:
    monkeypatch.setenv("PUSH_DISPATCH_DEADLINE_SECONDS", "200")
    with pytest.raises(ConfigError) as raised:
        DispatchSettings.from_env()
    assert "PUSH_PENDING_LEASE_SECONDS" in str(raised.value)
    assert "PUSH_DELIVERY_LEASE_SECONDS" in str(raised.value)


def test_the_configuration_page_shows_the_declared_settings() -> None:
    gen = generator()
    assert gen.PAGE.read_text() == gen.page(gen.PAGE.read_text()), "run python scripts/gen_config_docs.py"


def test_the_generated_table_has_a_row_per_setting_and_keeps_the_prose() -> None:
    gen = generator()
    text = gen.page("before\n" + gen.BEGIN + "\nold table\n" + gen.END + "\nafter\n")
    assert text.startswith("before\n") and text.endswith("\nafter\n")
    assert "old table" not in text
    assert all(f"| `{setting.name}`" in text for setting in SETTINGS)
