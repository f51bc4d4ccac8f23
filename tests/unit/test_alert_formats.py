from __future__ import annotations

import pytest

from engine.settings import QueueSettings
from leadflow.alert_formats import lead_link, render_alert
from leadflow.alerts import parse_since


def test_a_lead_link_fills_its_placeholders_url_quoted() -> None:
    decision = {"one_id": "a b/c", "decision_id": "d1-r1", "queue": "inbound", "sdr": "ana&co"}
    template = "https://crm.example.com/{queue}/leads?id={one_id}&d={decision_id}&o={sdr}"
    assert lead_link(template, decision) == (
        "https://crm.example.com/inbound/leads?id=a%20b%2Fc&d=d1-r1&o=ana%26co"
    )
    assert lead_link("", decision) == ""


def test_the_json_format_posts_the_decision_byte_for_byte() -> None:
    value = b'{"decision_id": "d1",  "queue": "inbound"}'
    assert render_alert(QueueSettings("inbound"), {"decision_id": "d1"}, value) is value


def test_since_takes_an_age_or_an_iso_time() -> None:
    now = 1_800_000_000.0
    assert parse_since("30m", now) == (now - 1800) * 1000
    assert parse_since("7d", now) == (now - 7 * 86_400) * 1000
    assert parse_since("2027-01-15T00:00:00Z", now) == 1_799_971_200_000
    assert parse_since("2027-01-15T08:00:00", now) == parse_since("2027-01-15T08:00:00Z", now)
    with pytest.raises(ValueError, match="an ISO-8601 time or an age"):
        parse_since("yesterday", now)
