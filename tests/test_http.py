"""ctx.http pieces that need no server: Retry-After parsing, request naming, settings, GCRA arithmetic."""

from __future__ import annotations

import email.utils
import time

import httpx
import pytest

from qworker.errors import ConfigError
from qworker.http import HttpSettings, describe, retry_after_s
from qworker.ratelimit import Budget, _gcra


def test_retry_after_seconds() -> None:
    assert retry_after_s("2") == 2.0


def test_retry_after_http_date() -> None:
    value = email.utils.formatdate(time.time() + 30, usegmt=True)

    assert 28 <= retry_after_s(value) <= 30


@pytest.mark.parametrize("value", [None, "", "soon"])
def test_retry_after_unreadable(value: str | None) -> None:
    assert retry_after_s(value) is None


def test_retry_after_is_capped() -> None:
    assert retry_after_s("86400") == 300.0


def test_describe_drops_query_and_credentials() -> None:
    request = httpx.Request("GET", "https://user:secret@api.example.com:8443/v1/items?token=abc")

    assert describe(request) == "GET https://api.example.com:8443/v1/items"


def test_settings_from_job_table() -> None:
    settings = HttpSettings.from_mapping(
        {"budgets": {"api.example.com": {"rate": 50, "burst": 5}}, "header_env": {"Authorization": "API_TOKEN"}}
    )

    assert settings.budgets == (Budget("api.example.com", 50, 1.0, 5),)
    assert HttpSettings.from_mapping(settings.to_mapping()) == settings


@pytest.mark.parametrize(
    ("table", "expected"),
    [
        ({"budgets": {"h": {"burst": 1}}}, "missing 'rate'"),
        ({"budgets": {"h": {"rate": -1}}}, "invalid rate -1"),
        ({"budgets": {"h": {"rate": 5, "burst": 1.5}}}, "invalid burst 1.5"),
        ({"budgets": {"h": {"rate": 5, "per": 1}}}, "unknown key 'per'"),
        ({"retries": 3}, "unknown key 'retries'"),
        ({"timeout_s": 0}, "invalid http.timeout_s 0"),
    ],
)
def test_settings_reject_bad_values(table: dict, expected: str) -> None:
    with pytest.raises(ConfigError, match=expected):
        HttpSettings.from_mapping(table)


def test_missing_credential_variable(monkeypatch) -> None:
    monkeypatch.delenv("QWORKER_TEST_TOKEN", raising=False)
    settings = HttpSettings(header_env={"Authorization": "QWORKER_TEST_TOKEN"})

    with pytest.raises(ConfigError, match="'QWORKER_TEST_TOKEN' for header 'Authorization' is not set"):
        settings.headers()


def test_gcra_starts_with_burst_plus_one() -> None:
    budget = Budget("api", rate=10, burst=3)

    grant = _gcra(budget, tat=100.0, paused_until=0.0, now=100.0, wanted=50)

    assert grant.tokens == 4


def test_gcra_waits_for_next_token() -> None:
    budget = Budget("api", rate=10, burst=0)

    grant = _gcra(budget, tat=100.5, paused_until=0.0, now=100.4, wanted=1)

    assert grant.tokens == 0
    assert grant.wait_s == pytest.approx(0.1)


def test_gcra_pause_wins() -> None:
    budget = Budget("api", rate=10, burst=3)

    grant = _gcra(budget, tat=0.0, paused_until=102.0, now=100.0, wanted=5)

    assert grant.tokens == 0
    assert grant.wait_s == pytest.approx(2.0)
