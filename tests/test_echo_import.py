"""``pushctl import-echo``: Echo's subscriptions, read from Echo's own tables on MariaDB (built
with their real column types in a scratch database), written into ours on both engines."""
from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import struct
import termios
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import create_engine, event, select, text

from shared.cli import main as pushctl
from shared.core import utcnow
from shared.db import get_engine
from shared.echo_import import REASONS, EchoImport, Summary, source_engine
from shared.models import Subscription
from shared.progress import _Lines, progress
from shared.subscriptions import NewSubscription, SubscriptionStore, token_sha256
from shared.validation import SubscribeSettings
from tests.echo import Echo, create_tables
from tests.stores import subscribe

T0 = datetime(2024, 1, 2, 3, 4, 5)
START = datetime(2025, 6, 1, 12, 0, 0, 123456)  # the import's start, where a test fixes it
WIKIPEDIA = "org.wikimedia.wikipedia"
FCM_A, FCM_B, FCM_C = "fcm-token-a:APA91b" + "a" * 140, "fcm-token-b:APA91b" + "b" * 140, "fcm-c:APA91b" + "c" * 9
APNS_A, APNS_B = "ab" * 32, "cd" * 32


@pytest.fixture(scope="module")
def echo_url(mariadb_scratch_url) -> str:
    engine = create_engine(mariadb_scratch_url)
    create_tables(engine)
    engine.dispose()
    return mariadb_scratch_url


@pytest.fixture
def echo(echo_url):
    engine = create_engine(echo_url)
    echo = Echo(engine)
    echo.clear()
    yield echo
    engine.dispose()


@pytest.fixture
def source(echo_url):
    engine = source_engine(echo_url)
    yield engine
    engine.dispose()


class Run:
    """Runs of the import into the test's database, recording what each skipped."""

    def __init__(self, source, target) -> None:
        self.source, self.target = source, target
        self.skipped: list[tuple[int, str]] = []

    def __call__(self, accepted: SubscribeSettings = SubscribeSettings(), on_batch=None, **options) -> Summary:
        self.skipped = []
        job = EchoImport(self.source, self.target, accepted, **options)
        return job.run(lambda eps_id, reason: self.skipped.append((eps_id, reason)), on_batch)


@pytest.fixture
def run(source, engine) -> Run:
    return Run(source, engine)


def table(engine, with_ids: bool = True) -> list[dict]:
    """Every subscription we hold, by device."""
    with engine.connect() as connection:
        rows = connection.execute(select(Subscription.__table__).order_by(Subscription.token_sha256))
        return [{k: v for k, v in row._mapping.items() if with_ids or k != "id"} for row in rows]


def ours(engine, user: str, new: NewSubscription, at: datetime) -> Subscription:
    """A subscription made by subscribe at ``at``."""
    return subscribe(SubscriptionStore(engine, clock=lambda: at), user, new).subscription


def fcm(token: str) -> NewSubscription:
    return NewSubscription("fcm", token, token)


# --- what maps to what ------------------------------------------------------------------------


def test_an_fcm_row_becomes_a_subscription_of_its_central_user(echo, run, engine):
    echo.add(4711, FCM_A, "fcm", updated=T0)
    assert run().imported == 1
    [row] = table(engine)
    assert row["user_id"] == "4711"
    assert (row["provider"], row["token"], row["token_sha256"]) == ("fcm", FCM_A, token_sha256(FCM_A))
    assert (row["topic"], row["environment"], row["app"]) == (None, None, None)
    assert row["updated_at"] == row["created_at"] == T0


def test_an_apns_row_keeps_its_topic_in_production_and_a_lower_case_token(echo, run, engine):
    echo.add(7, APNS_A.upper(), "apns", WIKIPEDIA)
    run()
    [row] = table(engine)
    assert (row["provider"], row["token"], row["topic"]) == ("apns", APNS_A, WIKIPEDIA)
    assert row["token_sha256"] == token_sha256(APNS_A)
    assert row["environment"] == "production"


def test_apns_environment_can_be_sandbox(echo, run, engine):
    echo.add(7, APNS_A, "apns", WIKIPEDIA)
    echo.add(8, FCM_A, "fcm")
    run(environment="sandbox")
    assert {row["provider"]: row["environment"] for row in table(engine)} == {"apns": "sandbox", "fcm": None}


def test_the_app_comes_from_the_topic_where_push_apps_maps_it(echo, run, engine, monkeypatch):
    monkeypatch.setenv("PUSH_APPS", json.dumps({
        "wikipedia": {"apns": {"key_id": "K", "team_id": "T", "topics": [WIKIPEDIA]}},
        "commons": {"apns": {"key_id": "K", "team_id": "T", "topics": ["org.wikimedia.commons"]},
                    "fcm": {"project_id": "commons"}},
    }))
    echo.add(1, APNS_A, "apns", WIKIPEDIA)
    echo.add(2, APNS_B, "apns", "org.example.other")
    echo.add(3, FCM_A, "fcm")
    run(SubscribeSettings.from_env())
    apps = {row["user_id"]: row["app"] for row in table(engine)}
    # An unmapped topic and Echo's FCM rows go to the default app, as subscribe would store them.
    assert apps == {"1": "wikipedia", "2": None, "3": None}


def test_echo_times_are_read_as_utc_whatever_the_sessions_zone(echo, run, engine):
    eps_id = echo.add(7, FCM_A)
    with echo.engine.begin() as connection:  # written by a client in another zone
        connection.exec_driver_sql("SET time_zone = '+05:00'")
        connection.execute(
            text("UPDATE echo_push_subscription SET eps_updated = '2024-06-01 12:00:00' WHERE eps_id = :id"),
            {"id": eps_id},
        )
    run()
    assert table(engine)[0]["updated_at"] == datetime(2024, 6, 1, 7, 0, 0)


def test_echos_database_is_read_in_utc(source):
    """TIMESTAMPs come out in the session's zone: the server's own, unless set."""
    with source.connect() as connection:
        assert connection.exec_driver_sql("SELECT @@session.time_zone").scalar() == "+00:00"


def test_the_per_user_cap_does_not_apply(echo, run, engine):
    for n in range(12):
        echo.add(7, fcm_token_n(n), updated=T0 + timedelta(minutes=n))
    assert run().imported == 12
    assert len(SubscriptionStore(engine, cap=10).list_for_user("7")) == 12


def fcm_token_n(n: int) -> str:
    return f"token-{n}:APA91b" + "x" * 100


# --- rows that cannot be imported -------------------------------------------------------------


def test_each_row_it_cannot_import_is_named_with_its_reason(echo, run, engine, monkeypatch):
    monkeypatch.setenv("PUSH_APNS_ALLOWED_TOPICS", f"{WIKIPEDIA},org.wikimedia.commons")
    good = echo.add(1, FCM_A)
    expected = {
        echo.add(2, FCM_B, provider=99): "unknown_provider",  # no echo_push_provider row
        echo.add(3, FCM_C, provider="webpush"): "unknown_provider",
        echo.add(4, "tampered:APA91b", sha256="0" * 64): "hash_mismatch",
        echo.add(5, b"\xff\xfe-not-text"): "token_not_utf8",
        echo.add(6, "has a blank"): "malformed_token",
        echo.add(7, "", "fcm"): "malformed_token",
        echo.add(8, "ab" * 31 + "a", "apns", WIKIPEDIA): "malformed_token",  # odd length
        echo.add(9, "zz" * 32, "apns", WIKIPEDIA): "malformed_token",
        echo.add(10, "11" * 32, "apns", None): "missing_topic",
        echo.add(11, "22" * 32, "apns", 200): "missing_topic",  # no echo_push_topic row
        echo.add(12, "33" * 32, "apns", "not a bundle id"): "malformed_topic",
        echo.add(13, "44" * 32, "apns", "org.example.elsewhere"): "topic_not_allowed",
        echo.add(0, "zero-user:APA91b"): "invalid_user",
        echo.add(14, "zero-date:APA91b", updated="0000-00-00 00:00:00"): "invalid_time",
    }
    summary = run(SubscribeSettings.from_env())
    assert dict(run.skipped) == expected
    assert summary.read == len(expected) + 1 and summary.imported == 1
    assert sum(summary.skipped.values()) == len(expected)
    assert [row["user_id"] for row in table(engine)] == ["1"]
    assert good not in dict(run.skipped)


def test_the_operators_docs_explain_every_reason():
    docs = (Path(__file__).resolve().parent.parent / "docs" / "operations.md").read_text()
    explained = set(re.findall(r"^\| `([a-z0-9_]+)` \|", docs, re.M))
    assert set(REASONS) <= explained


@pytest.mark.parametrize("batch", [1, 1000])
def test_tokens_one_device_for_us_import_the_latest_row_in_any_batch(echo, run, engine, batch):
    """APNs tokens that differ only in case are one device here (stored in lower case), though
    Echo's unique hash (of the bytes as sent) let both in."""
    older = echo.add(1, APNS_A.upper(), "apns", WIKIPEDIA, updated=T0)
    newer = echo.add(2, APNS_A, "apns", WIKIPEDIA, updated=T0 + timedelta(days=1))
    tied = [echo.add(3, APNS_B, "apns", WIKIPEDIA), echo.add(4, APNS_B.upper(), "apns", WIKIPEDIA)]
    summary = run(batch=batch)
    assert sorted(run.skipped) == [(older, "duplicate_token"), (tied[0], "duplicate_token")]
    assert summary.skipped == {"duplicate_token": 2}
    assert {row["token"]: row["user_id"] for row in table(engine)} == {APNS_A: "2", APNS_B: "4"}
    assert newer not in dict(run.skipped)


def test_skipped_rows_stay_skipped_on_the_next_run(echo, run, engine):
    bad = echo.add(1, "has a blank")
    run()
    summary = run()
    assert run.skipped == [(bad, "malformed_token")] and summary.skipped == {"malformed_token": 1}


# --- devices we hold already ------------------------------------------------------------------


def test_our_newer_subscription_is_kept_whoever_holds_it(echo, run, engine):
    mine = ours(engine, "7", fcm(FCM_A), T0 + timedelta(seconds=1))
    theirs = ours(engine, "8", fcm(FCM_B), T0 + timedelta(days=300))
    echo.add(7, FCM_A, updated=T0)  # same user, older
    echo.add(9, FCM_B, updated=T0)  # another user, older
    before = table(engine)
    summary = run()
    assert (summary.kept, summary.imported, summary.updated) == (2, 0, 0)
    assert table(engine) == before
    assert {mine.id, theirs.id} == {row["id"] for row in before}


def test_echos_newer_row_updates_ours_in_place(echo, run, engine):
    old = ours(engine, "7", NewSubscription("apns", APNS_A, APNS_A, "org.old", "sandbox"), T0 - timedelta(days=1))
    echo.add(7, APNS_A, "apns", WIKIPEDIA, updated=T0)
    summary = run()
    assert (summary.updated, summary.moved) == (1, 0)
    [row] = table(engine)
    assert (row["id"], row["created_at"]) == (old.id, old.created_at)
    assert (row["topic"], row["environment"], row["updated_at"]) == (WIKIPEDIA, "production", T0)


def test_echos_newer_row_moves_the_device_from_another_user_to_a_new_row(echo, run, engine):
    old = ours(engine, "8", fcm(FCM_A), T0 - timedelta(days=1))
    echo.add(7, FCM_A, updated=T0)
    summary = run()
    assert (summary.updated, summary.moved, summary.imported) == (1, 1, 0)
    [row] = table(engine)
    assert row["user_id"] == "7" and row["id"] != old.id
    assert row["created_at"] == row["updated_at"] == T0
    assert SubscriptionStore(engine).list_for_user("8") == []


def test_an_equal_time_takes_echos_values_so_a_rerun_applies_new_settings(echo, run, engine):
    echo.add(7, APNS_A, "apns", WIKIPEDIA, updated=T0)
    run()
    summary = run(environment="sandbox")
    assert summary.updated == 1
    assert table(engine)[0]["environment"] == "sandbox"


# --- the refresh at import (--refreshed-at-import) --------------------------------------------


def test_by_default_the_next_clean_up_expires_what_echo_has_known_for_long(echo, run, engine):
    echo.add(7, FCM_A, updated=START - timedelta(days=300))
    summary = run(clock=lambda: START, max_age=timedelta(days=270))
    assert summary.stale == 1
    assert SubscriptionStore(engine).expire(START - timedelta(days=270)) == 1


def test_refreshed_at_import_keeps_them_past_the_next_clean_up(echo, run, engine):
    echo.add(7, FCM_A, updated=START - timedelta(days=300))
    summary = run(clock=lambda: START, max_age=timedelta(days=270), refreshed_at_import=True)
    assert summary.stale == 0
    assert SubscriptionStore(engine).expire(START + timedelta(days=1) - timedelta(days=270)) == 0
    assert SubscriptionStore(engine).expire(START + timedelta(days=271) - timedelta(days=270)) == 1


def test_refreshed_at_import_writes_the_start_as_last_refresh_and_eps_updated_as_creation(echo, run, engine):
    echo.add(7, FCM_A, updated=T0)
    assert run(clock=lambda: START, refreshed_at_import=True).imported == 1
    [row] = table(engine)
    assert (row["created_at"], row["updated_at"]) == (T0, START)


def test_refreshed_at_import_still_decides_by_eps_updated_against_our_refresh(echo, run, engine):
    newer = ours(engine, "8", fcm(FCM_A), T0 + timedelta(days=1))  # after Echo's row, before START
    older = ours(engine, "7", fcm(FCM_B), T0 - timedelta(days=1))
    moving = ours(engine, "9", fcm(FCM_C), T0 - timedelta(days=1))
    echo.add(7, FCM_A, updated=T0)  # another user's, and ours is newer: kept
    echo.add(7, FCM_B, updated=T0)  # same user, ours older: refreshed in place
    echo.add(7, FCM_C, updated=T0)  # another user's, ours older: moves
    summary = run(clock=lambda: START, refreshed_at_import=True)
    assert (summary.kept, summary.updated, summary.moved, summary.imported) == (1, 2, 1, 0)
    rows = {row["token"]: (row["id"], row["user_id"], row["created_at"], row["updated_at"]) for row in table(engine)}
    assert rows[FCM_A] == (newer.id, "8", newer.created_at, newer.updated_at)
    assert rows[FCM_B] == (older.id, "7", older.created_at, START)
    assert rows[FCM_C][1:] == ("7", T0, START) and rows[FCM_C][0] != moving.id


def test_refreshed_at_import_after_a_default_import_refreshes_its_rows(echo, run, engine):
    echo.add(7, FCM_A, updated=T0)
    echo.add(8, APNS_A, "apns", WIKIPEDIA, updated=T0)
    run()
    summary = run(clock=lambda: START, refreshed_at_import=True)
    assert (summary.updated, summary.unchanged) == (2, 0)
    assert {(row["created_at"], row["updated_at"]) for row in table(engine)} == {(T0, START)}


def test_a_rerun_with_refreshed_at_import_keeps_the_first_runs_values_and_settings(echo, run, engine):
    """The rows the first run wrote are newer than Echo's now: a rerun with other settings leaves
    them as they are (kept), as it would a device that registered with us since."""
    echo.add(8, APNS_A, "apns", WIKIPEDIA, updated=T0)
    run(clock=lambda: START, refreshed_at_import=True)
    before = table(engine)
    summary = run(clock=lambda: START + timedelta(hours=1), refreshed_at_import=True, environment="sandbox")
    assert (summary.kept, summary.updated, summary.unchanged) == (1, 0, 0)
    assert table(engine) == before and before[0]["environment"] == "production"


# --- the default topic (--default-topic) --------------------------------------------------------


def test_apns_rows_without_a_topic_take_the_default_topic(echo, run, engine):
    without = echo.add(1, APNS_A, "apns", None)
    dangling = echo.add(2, APNS_B, "apns", 200)  # names no echo_push_topic row
    echo.add(3, "11" * 32, "apns", "org.wikimedia.commons")
    echo.add(4, FCM_A)
    summary = run(default_topic=WIKIPEDIA)
    assert (summary.imported, summary.defaulted, run.skipped) == (4, 2, [])
    topics = {row["user_id"]: (row["topic"], row["environment"]) for row in table(engine)}
    assert topics == {
        "1": (WIKIPEDIA, "production"), "2": (WIKIPEDIA, "production"),
        "3": ("org.wikimedia.commons", "production"), "4": (None, None),
    }
    assert {without, dangling}.isdisjoint(dict(run.skipped))


def test_the_default_topic_takes_the_app_push_apps_maps_it_to(echo, run, engine, monkeypatch):
    monkeypatch.setenv("PUSH_APPS", json.dumps(
        {"wikipedia": {"apns": {"key_id": "K", "team_id": "T", "topics": [WIKIPEDIA]}}}
    ))
    echo.add(1, APNS_A, "apns", None)
    run(SubscribeSettings.from_env(), default_topic=WIKIPEDIA)
    assert table(engine)[0]["app"] == "wikipedia"


def test_a_row_whose_own_topic_is_refused_does_not_take_the_default(echo, run, engine, monkeypatch):
    monkeypatch.setenv("PUSH_APNS_ALLOWED_TOPICS", WIKIPEDIA)
    refused = echo.add(1, APNS_A, "apns", "org.example.elsewhere")
    summary = run(SubscribeSettings.from_env(), default_topic=WIKIPEDIA)
    assert run.skipped == [(refused, "topic_not_allowed")] and summary.defaulted == 0


# --- idempotent, resumable, dry ---------------------------------------------------------------


def every_case(echo: Echo, engine) -> None:
    """Echo's rows of every kind, some naming devices we hold (newer, older, another user's)."""
    ours(engine, "7", fcm(FCM_A), T0 + timedelta(days=1))  # ours newer
    ours(engine, "8", fcm(FCM_B), T0 - timedelta(days=1))  # moves to 70
    ours(engine, "9", NewSubscription("apns", APNS_A, APNS_A, "org.old", "sandbox"), T0 - timedelta(days=1))
    echo.add(7, FCM_A, updated=T0)
    echo.add(70, FCM_B, updated=T0)
    echo.add(9, APNS_A, "apns", WIKIPEDIA, updated=T0)
    echo.add(10, APNS_B.upper(), "apns", "org.wikimedia.commons", updated=T0)
    echo.add(11, APNS_B, "apns", "org.wikimedia.commons", updated=T0 - timedelta(days=1))
    echo.add(12, "has a blank")
    echo.add(13, "55" * 32, "apns")
    for n in range(20):
        echo.add(100 + n % 6, fcm_token_n(n), updated=T0 + timedelta(hours=n))


#: The options each run of every_case is tried with, and what that run counts: imported, updated,
#: moved, unchanged, kept, took the default topic. With the refresh at import, the device user 7
#: subscribed with us since Echo stored it holds what Echo's row maps to (refresh time aside):
#: unchanged rather than kept. With a default topic, Echo's APNs row without one is imported.
OPTIONS = {
    "defaults": ({}, (21, 2, 1, 0, 1, 0)),
    "refreshed-at-import": ({"refreshed_at_import": True}, (21, 2, 1, 1, 0, 0)),
    "default-topic": ({"default_topic": WIKIPEDIA}, (22, 2, 1, 0, 1, 1)),
    "both": ({"refreshed_at_import": True, "default_topic": WIKIPEDIA}, (22, 2, 1, 1, 0, 1)),
}
each_option_set = pytest.mark.parametrize("options, counts", OPTIONS.values(), ids=OPTIONS.keys())


def tally(summary: Summary) -> tuple[int, ...]:
    return (summary.imported, summary.updated, summary.moved, summary.unchanged, summary.kept, summary.defaulted)


@each_option_set
def test_a_second_run_changes_nothing(echo, run, engine, options, counts):
    every_case(echo, engine)
    first = run(batch=3, clock=lambda: START, **options)
    after_first = table(engine)
    second = run(batch=3, clock=lambda: START + timedelta(hours=1), **options)
    assert table(engine) == after_first
    assert (second.imported, second.updated, second.defaulted, second.kept) == (0, 0, 0, first.kept)
    assert second.unchanged == first.imported + first.updated + first.unchanged
    assert second.skipped == first.skipped and run.skipped


@each_option_set
def test_a_dry_run_writes_nothing_and_counts_what_the_run_does(echo, run, engine, options, counts):
    every_case(echo, engine)
    before = table(engine)
    dry = run(dry_run=True, batch=4, **options)
    dry_skipped = run.skipped
    assert table(engine) == before
    real = run(batch=4, **options)
    assert dry == real and dry_skipped == run.skipped
    assert tally(real) == counts


class Crash(Exception):
    pass


def reference(echo, run, engine, **options) -> list[dict]:
    """The table one uninterrupted run makes; left empty again for the run under test."""
    every_case(echo, engine)
    run(batch=3, **options)
    done = table(engine, with_ids=False)
    with engine.begin() as connection:
        connection.execute(Subscription.__table__.delete())
    echo.clear()
    every_case(echo, engine)
    return done


@pytest.mark.parametrize("options", [{}, {"refreshed_at_import": True}], ids=["defaults", "refreshed-at-import"])
def test_a_crash_between_batches_then_a_rerun_gives_the_same_rows(echo, run, engine, options):
    """With the refresh at import, the rows written before the crash keep the first run's start
    as their refresh, and the rerun writes its own start on the rest."""
    expected = reference(echo, run, engine, clock=lambda: START, **options)
    batches = []

    def crash_after_two(size: int) -> None:
        batches.append(size)
        if len(batches) == 2:
            raise Crash

    with pytest.raises(Crash):
        run(batch=3, on_batch=crash_after_two, clock=lambda: START, **options)
    after_crash = {row["token_sha256"]: row for row in table(engine, with_ids=False)}
    assert 0 < len(after_crash) < len(expected)
    later = START + timedelta(hours=1)
    run(batch=3, clock=lambda: later, **options)
    after = table(engine, with_ids=False)
    assert [row for row in after if row["token_sha256"] in after_crash] == list(after_crash.values())
    if options:
        assert any(row["updated_at"] == later for row in after)
        for row in after:
            row["updated_at"] = START if row["updated_at"] == later else row["updated_at"]
    assert after == expected


def test_a_crash_inside_a_batchs_transaction_writes_none_of_it_then_a_rerun_completes(echo, run, engine):
    """The fault strikes after the batch's first statement that writes (the move's DELETE of the
    old owner's row) and before its INSERT: the old owner must still hold the device."""
    expected = reference(echo, run, engine)
    writes = []

    def fail_on_insert(_conn, _cursor, statement, _parameters, _context, _many):
        if statement.lstrip().upper().startswith(("INSERT INTO SUBSCRIPTIONS", "DELETE FROM SUBSCRIPTIONS")):
            writes.append(statement.split()[0])
            if writes == ["DELETE", "INSERT"]:
                raise Crash

    event.listen(engine, "before_cursor_execute", fail_on_insert)
    try:
        with pytest.raises(Crash):
            run(batch=3)
    finally:
        event.remove(engine, "before_cursor_execute", fail_on_insert)
    assert [row.token for row in SubscriptionStore(engine).list_for_user("8")] == [FCM_B]
    assert not SubscriptionStore(engine).list_for_user("70")
    run(batch=3)
    assert table(engine, with_ids=False) == expected


# --- the command ------------------------------------------------------------------------------


def test_the_command_lists_each_skipped_row_and_ends_with_a_summary(echo, echo_url, engine, capsys):
    echo.add(1, FCM_A)
    bad = echo.add(2, "has a blank")
    assert pushctl(["import-echo", "--from", echo_url, "--batch", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert f"skipped eps_id {bad}: malformed_token" in lines
    assert lines[-1] == (
        "read 2, imported 1, updated 0 (moved 0), unchanged 0, kept (ours newer) 0, "
        "skipped 1 (malformed_token 1)"
    )
    assert FCM_A not in "\n".join(lines)


def test_the_command_dry_run_says_so_and_writes_nothing(echo, echo_url, engine, capsys):
    echo.add(1, FCM_A)
    assert pushctl(["import-echo", "--from", echo_url, "--dry-run"]) == 0
    assert capsys.readouterr().out.splitlines()[-1].startswith("dry run, nothing written: read 1, imported 1,")
    assert table(engine) == []


def test_the_command_notes_rows_clean_up_will_expire(echo, echo_url, engine, capsys, monkeypatch):
    monkeypatch.setenv("PUSH_SUBSCRIPTION_MAX_AGE_DAYS", "30")
    echo.add(1, FCM_A, updated=datetime.now() - timedelta(days=31))
    echo.add(2, FCM_B, updated=datetime.now() - timedelta(days=1))
    assert pushctl(["import-echo", "--from", echo_url]) == 0
    assert "note: 1 of the rows imported or updated" in capsys.readouterr().out


def test_the_note_names_the_option_that_keeps_them(echo, echo_url, engine, capsys, monkeypatch):
    monkeypatch.setenv("PUSH_SUBSCRIPTION_MAX_AGE_DAYS", "30")
    echo.add(1, FCM_A, updated=datetime.now() - timedelta(days=31))
    assert pushctl(["import-echo", "--from", echo_url, "--dry-run"]) == 0
    note = capsys.readouterr().out.splitlines()[-2]
    assert note.startswith("note: 1 of the rows") and "--refreshed-at-import" in note and "dead devices" in note


def test_the_command_with_refreshed_at_import_writes_the_run_as_last_refresh(
    echo, echo_url, engine, capsys, monkeypatch
):
    monkeypatch.setenv("PUSH_SUBSCRIPTION_MAX_AGE_DAYS", "30")
    echo.add(1, FCM_A, updated=T0)
    before = utcnow()
    assert pushctl(["import-echo", "--from", echo_url, "--refreshed-at-import"]) == 0
    assert "note:" not in capsys.readouterr().out
    [row] = table(engine)
    assert row["created_at"] == T0 and before <= row["updated_at"] <= utcnow()


def test_the_command_counts_the_rows_that_took_the_default_topic(echo, echo_url, engine, capsys):
    echo.add(1, APNS_A, "apns", None)
    echo.add(2, APNS_B, "apns", WIKIPEDIA)
    assert pushctl(["import-echo", "--from", echo_url, "--default-topic", WIKIPEDIA]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == (
        "read 2, imported 2, updated 0 (moved 0), unchanged 0, kept (ours newer) 0, skipped 0, "
        "took the default topic 1"
    )


@pytest.mark.parametrize(
    "topic, allowed, message",
    [
        ("not a bundle id", "", "--default-topic 'not a bundle id': the topic is not an app bundle id"),
        (
            "org.example.other", WIKIPEDIA,
            "--default-topic 'org.example.other': the topic is not in PUSH_APNS_ALLOWED_TOPICS",
        ),
    ],
    ids=["malformed", "not-allowed"],
)
def test_the_command_refuses_a_default_topic_subscribe_would_refuse(
    echo, echo_url, engine, capsys, monkeypatch, topic, allowed, message
):
    monkeypatch.setenv("PUSH_APNS_ALLOWED_TOPICS", allowed)
    echo.add(1, FCM_A)
    assert pushctl(["import-echo", "--from", echo_url, "--default-topic", topic]) == 2
    captured = capsys.readouterr()
    assert captured.err == f"pushctl import-echo: {message}\n"
    assert captured.out == "" and table(engine) == []


@pytest.mark.parametrize(
    "url, message",
    [
        ("sqlite:///echo.sqlite3", "--from must name Echo's MySQL or MariaDB database"),
        ("not a url", "--from is not a database URL"),
    ],
)
def test_the_command_refuses_a_source_that_is_not_mysql(engine, capsys, url, message):
    assert pushctl(["import-echo", "--from", url]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"pushctl import-echo: {message}") and len(err.splitlines()) == 1


def test_the_command_says_when_echos_tables_are_missing(engine, echo_url, capsys):
    url = echo_url.removesuffix("_scratch")  # this run's own database: ours, not Echo's
    assert pushctl(["import-echo", "--from", url]) == 2
    err = capsys.readouterr().err
    assert err.startswith("pushctl import-echo: cannot read Echo's tables:") and "echo_push_subscription" in err


def test_the_command_says_when_echos_database_is_unreachable(engine, capsys):
    assert pushctl(["import-echo", "--from", "mysql+pymysql://root@127.0.0.1:1/echo"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("pushctl import-echo: cannot read Echo's tables: 2003") and len(err.splitlines()) == 1


def test_the_command_refuses_a_target_that_is_not_migrated(echo_url, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PUSH_DATABASE_URL", f"sqlite:///{tmp_path / 'new.sqlite3'}")
    assert pushctl(["import-echo", "--from", echo_url]) == 2
    assert capsys.readouterr().err.startswith("pushctl import-echo: PUSH_DATABASE_URL: database schema is at revision none")


def test_a_batch_size_out_of_range_is_refused(engine, echo_url, capsys):
    assert pushctl(["import-echo", "--from", echo_url, "--batch", "0"]) == 2
    assert "batch size" in capsys.readouterr().err


def test_a_source_without_a_driver_is_read_through_pymysql(echo_url):
    engine = source_engine(echo_url.replace("mysql+pymysql://", "mysql://"))
    assert engine.dialect.driver == "pymysql"
    engine.dispose()


# --- progress ---------------------------------------------------------------------------------


def test_plain_progress_lines_give_rate_and_eta():
    lines: list[str] = []
    now = [0.0]
    shown = _Lines(1000, None, "rows", clock=lambda: now[0])
    shown.note = lines.append
    now[0] = 5.0
    shown.advance(100)
    assert lines == []  # not yet: one line every ten seconds
    now[0] = 10.0
    shown.advance(100)
    assert lines == ["200 of 1000 rows (20%), 20 rows/s, ETA 0m40s"]


def _read_all(leader: int) -> str:
    """Everything written to a pty whose other end is closed: one read returns only what one
    write put there, and Linux ends the stream with EIO rather than an empty read."""
    chunks = []
    try:
        while chunk := os.read(leader, 65536):
            chunks.append(chunk)
    except OSError:
        pass
    finally:
        os.close(leader)
    return b"".join(chunks).decode()


def test_on_a_terminal_a_bar_shows_rate_and_eta():
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # 100 columns
    with os.fdopen(follower, "w") as terminal:
        shown = progress(100, terminal)
        shown.advance(50)
        shown.note("skipped eps_id 3: malformed_token")
        shown.close()
    output = _read_all(leader)
    assert "50.0/100" in output and "rows/s]" in output and "00:00<00:00" in output  # elapsed<left
    assert "skipped eps_id 3: malformed_token" in output
