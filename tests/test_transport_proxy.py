"""Which forward proxy a provider connection goes through: the environment as the standard
library reads it (shared/transport/proxy.py), including where that reading differs from curl's."""
from __future__ import annotations

import pytest

from shared.transport.proxy import Proxy, proxy_for

VARIABLES = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy",
             "NO_PROXY", "no_proxy", "REQUEST_METHOD")


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in VARIABLES:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_no_variable_no_proxy() -> None:
    assert proxy_for("https", "fcm.googleapis.com", 443) is None


def test_https_proxy_with_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HTTPS_PROXY", "http://user:p%40ss@proxy.internal:3128")

    proxy = proxy_for("https", "api.push.apple.com", 443)

    assert proxy == Proxy("proxy.internal", 3128, "Basic dXNlcjpwQHNz")
    assert "p@ss" not in repr(proxy) and "dXNlcjpwQHNz" not in repr(proxy)


def test_a_proxy_without_a_scheme_is_http_on_port_80(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HTTPS_PROXY", "proxy.internal")
    assert proxy_for("https", "fcm.googleapis.com", 443) == Proxy("proxy.internal", 80)


def test_all_proxy_applies_when_no_scheme_variable_is_set(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ALL_PROXY", "http://all.internal:8080")
    assert proxy_for("https", "fcm.googleapis.com", 443) == Proxy("all.internal", 8080)


def test_the_lower_case_variable_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HTTPS_PROXY", "http://upper.internal:1")
    monkeypatch.setenv("https_proxy", "http://lower.internal:2")
    assert proxy_for("https", "fcm.googleapis.com", 443) == Proxy("lower.internal", 2)


def test_an_empty_lower_case_variable_turns_the_upper_case_one_off(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """urllib's reading (curl would use HTTPS_PROXY here)."""
    monkeypatch.setenv("HTTPS_PROXY", "http://upper.internal:1")
    monkeypatch.setenv("https_proxy", "")
    assert proxy_for("https", "fcm.googleapis.com", 443) is None


@pytest.mark.parametrize(("no_proxy", "host", "bypassed"), [
    ("*", "fcm.googleapis.com", True),
    ("googleapis.com", "fcm.googleapis.com", True),
    (".googleapis.com", "fcm.googleapis.com", True),
    ("googleapis.com", "notgoogleapis.com", False),
    ("push.apple.com, fcm.googleapis.com", "fcm.googleapis.com", True),
    ("127.0.0.1", "127.0.0.1", True),
    ("fcm.googleapis.com:443", "fcm.googleapis.com", True),
    ("fcm.googleapis.com:8443", "fcm.googleapis.com", False),
    # curl reads CIDR ranges; urllib does not: the range covers nothing.
    ("10.0.0.0/8", "10.1.2.3", False),
])
def test_no_proxy(monkeypatch: pytest.MonkeyPatch, no_proxy: str, host: str,
                  bypassed: bool) -> None:
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.internal:3128")
    monkeypatch.setenv("NO_PROXY", no_proxy)
    assert (proxy_for("https", host, 443) is None) is bypassed


def test_under_cgi_http_proxy_is_ignored_but_https_proxy_is_not(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """urllib's httpoxy guard: REQUEST_METHOD set means HTTP_PROXY may come from a request."""
    monkeypatch.setenv("REQUEST_METHOD", "POST")
    monkeypatch.setenv("HTTP_PROXY", "http://proxy.internal:1")
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.internal:2")
    assert proxy_for("http", "fake.internal", 80) is None
    assert proxy_for("https", "fake.internal", 443) == Proxy("proxy.internal", 2)


@pytest.mark.parametrize("url", ["socks5://127.0.0.1:1080", "https://proxy.internal:3128"])
def test_a_proxy_that_is_not_plain_http_is_refused_naming_the_variable(
        monkeypatch: pytest.MonkeyPatch, url: str) -> None:
    monkeypatch.setenv("HTTPS_PROXY", url)
    with pytest.raises(ValueError, match="HTTPS_PROXY"):
        proxy_for("https", "fcm.googleapis.com", 443)
