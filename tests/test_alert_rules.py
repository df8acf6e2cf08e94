"""The shipped Prometheus alert rules: valid, unit-tested with promtool, and naming only metrics
the functions export."""
from __future__ import annotations

import os
import re
import shutil
import subprocess

import pytest
from prometheus_client import generate_latest

from shared import metrics
from tests.conftest import IN_CI, REPO

RULES = REPO / "monitoring" / "alerts.yml"
RULE_TESTS = REPO / "monitoring" / "alerts_test.yml"


@pytest.fixture(scope="module")
def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        message = "promtool not found (Debian package prometheus; `make test` installs it)"
        if IN_CI:
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    return path


def test_rules_are_valid(promtool):
    result = subprocess.run([promtool, "check", "rules", str(RULES)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_rule_unit_tests_pass(promtool):
    result = subprocess.run(
        [promtool, "test", "rules", RULE_TESTS.name], capture_output=True, text=True, cwd=RULE_TESTS.parent,
        env={**os.environ, "TZ": "UTC"},
    )
    assert result.returncode == 0, result.stdout + result.stderr


def exported_names() -> set[str]:
    text = generate_latest().decode()
    return {line.split()[2] for line in text.splitlines() if line.startswith("# TYPE ")}


def test_every_metric_the_rules_name_is_exported(monkeypatch):
    """Every metric exported when its feature is on: the pending queue's only with the privacy
    delay, which gives its collector something to read, the dead letters' only in clean-up."""
    monkeypatch.setattr(metrics.PENDING_TOTALS, "stats", lambda: {"fcm": (1, 60.0)})
    monkeypatch.setattr(metrics.PENDING_TOTALS, "ttl", 0.0)
    monkeypatch.setattr(metrics.DEAD_LETTER_TOTAL, "count", lambda: 0)
    from datetime import datetime

    from shared.holds import Hold, Holds

    since = datetime(2026, 1, 1)
    monkeypatch.setattr(metrics.HOLD_TOTALS, "read", lambda: Holds((
        Hold("pause", "fcm", "*", "r", "ops", since), Hold("credentials", "apns", "", "r", None, since))))
    monkeypatch.setattr(metrics.HOLD_TOTALS, "waiting", lambda: {("apns", ""): (1, 1)})
    monkeypatch.setattr(metrics.HOLD_TOTALS, "ttl", 0.0)
    named = set(re.findall(r"\bpush_[a-z_]+", RULES.read_text()))
    exported = exported_names()
    suffixes = ("_bucket", "_count", "_sum", "_total")
    missing = {
        name for name in named
        if name not in exported and not any(name.endswith(s) and name[: -len(s)] in exported for s in suffixes)
    }
    assert named and missing == set()
