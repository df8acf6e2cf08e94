"""What every provider shares: reading a provider's Retry-After header."""
from __future__ import annotations

from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import pytest

from shared.providers.base import MAX_RETRY_AFTER_SECONDS, retry_after_seconds


@pytest.mark.parametrize("header,seconds", [("120", 120.0), (" 7 ", 7.0), ("-5", 0.0), ("0", 0.0)])
def test_delta_seconds_are_read_as_seconds(header, seconds):
    assert retry_after_seconds(header) == seconds


def test_an_http_date_is_read_as_the_seconds_until_it():
    when = datetime.now(UTC) + timedelta(seconds=90)
    assert 85 <= retry_after_seconds(format_datetime(when, usegmt=True)) <= 90


@pytest.mark.parametrize("header", ["inf", "Infinity", "1e400", "99999999", "Fri, 31 Dec 9999 23:59:59 GMT"])
def test_a_wait_beyond_an_hour_is_cut_to_an_hour(header):
    # A Web Push service is any host a subscriber named: its header is untrusted.
    assert retry_after_seconds(header) == MAX_RETRY_AFTER_SECONDS


@pytest.mark.parametrize("header", [None, "", "soon", "nan", "Fri, 32 Foo 2026"])
def test_an_absent_or_unreadable_header_gives_no_wait(header):
    assert retry_after_seconds(header) is None
