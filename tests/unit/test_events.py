from __future__ import annotations

import pickle
from typing import Any

import orjson
import pytest

from engine.events import REASONS, Event, Origin, Rejection, decode_event

ORIGIN = Origin("leadflow.events", 0, 42, b"k")
NOW_MS = 1_793_000_000_000  # 2026-10-26


def decode(value: Any, trusted: bool = False, max_bytes: int = 32_768) -> Event | Rejection:
    raw = value if isinstance(value, bytes) else orjson.dumps(value)
    return decode_event(
        raw,
        ORIGIN,
        ingested_ms=NOW_MS,
        trusted=trusted,
        max_bytes=max_bytes,
        max_future_skew_ms=86_400_000,
    )


def base(**extra: Any) -> dict[str, Any]:
    return {
        "type": "track",
        "event": "Demo Requested",
        "messageId": "m-1",
        "anonymousId": "a-1",
        **extra,
    }


def test_a_valid_track_event_keeps_its_fields_and_unknown_ones() -> None:
    event = decode(base(timestamp="2026-10-25T10:00:00.250Z", userId=123, vendorField={"x": 1}))
    assert isinstance(event, Event)
    assert (event.type, event.name, event.message_id) == ("track", "Demo Requested", "m-1")
    assert event.user_id == "123"  # numeric user ids are accepted as their string
    assert event.event_ms == 1_792_922_400_250
    assert event.ingested_ms == NOW_MS
    assert event.payload["vendorField"] == {"x": 1}


def test_page_path_comes_from_properties_or_the_url() -> None:
    by_path = decode(
        {"type": "page", "messageId": "m", "anonymousId": "a", "properties": {"path": "/pricing"}}
    )
    by_url = decode(
        {
            "type": "page",
            "messageId": "m",
            "anonymousId": "a",
            "context": {"page": {"url": "https://x.example/pricing/team?utm=1#top"}},
        }
    )
    assert isinstance(by_path, Event) and by_path.path == "/pricing"
    assert isinstance(by_url, Event) and by_url.path == "/pricing/team"


def test_email_is_found_in_traits_context_traits_or_properties() -> None:
    for holder in (
        {"traits": {"email": "a@b.example"}},
        {"context": {"traits": {"email": "a@b.example"}}},
        {"properties": {"email": "a@b.example"}},
    ):
        event = decode({"type": "identify", "messageId": "m", **holder})
        assert isinstance(event, Event) and event.email == "a@b.example"


def test_missing_timestamp_means_ingest_time() -> None:
    event = decode(base())
    assert isinstance(event, Event) and event.event_ms == NOW_MS


def test_reserved_events_are_accepted_from_the_feedback_topic() -> None:
    assert isinstance(decode(base(event="manual_mql"), trusted=True), Event)


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (b"{not json", "invalid_json"),
        (b"\xff\xfe{}", "invalid_json"),
        (b"", "invalid_json"),
        (b"[1,2]", "not_an_object"),
        (b'"text"', "not_an_object"),
        ({"messageId": "m", "anonymousId": "a"}, "unknown_type"),
        ({"type": "video", "messageId": "m", "anonymousId": "a"}, "unknown_type"),
        ({"type": "track", "event": "x", "anonymousId": "a"}, "missing_message_id"),
        (
            {"type": "track", "event": "x", "messageId": "  ", "anonymousId": "a"},
            "missing_message_id",
        ),
        ({"type": "track", "event": "x", "messageId": 7, "anonymousId": "a"}, "missing_message_id"),
        ({"type": "track", "messageId": "m", "anonymousId": "a"}, "missing_event_name"),
        (
            {"type": "track", "event": "", "messageId": "m", "anonymousId": "a"},
            "missing_event_name",
        ),
        ({"type": "track", "event": "x", "messageId": "m"}, "no_identifier"),
        (base(properties=[1]), "bad_field"),
        (base(anonymousId={"a": 1}), "bad_field"),
        (base(traits={"email": "no-at-sign"}), "bad_field"),
        ({"type": "alias", "messageId": "m", "userId": "u"}, "bad_field"),
        (base(timestamp="yesterday"), "bad_timestamp"),
        (base(timestamp=1_700_000_000), "bad_timestamp"),
        (base(timestamp="1970-01-01T00:00:00Z"), "bad_timestamp"),
        (base(timestamp="9999-12-31T23:59:59Z"), "bad_timestamp"),
        (base(event="erase"), "untrusted_source"),
        (base(event="lead_accepted"), "untrusted_source"),
    ],
)
def test_bad_input_is_rejected_with_a_reason_and_the_original_bytes(
    value: Any, reason: str
) -> None:
    raw = value if isinstance(value, bytes) else orjson.dumps(value)
    result = decode(raw)
    assert isinstance(result, Rejection)
    assert result.reason == reason, result.detail
    assert reason in REASONS
    assert result.raw == raw
    assert result.origin == ORIGIN


def test_oversized_messages_are_rejected_unparsed() -> None:
    result = decode(base(properties={"blob": "x" * 2000}), max_bytes=1000)
    assert isinstance(result, Rejection) and result.reason == "oversized"


def test_events_and_rejections_survive_pickling_between_processes() -> None:
    event = decode(base(userId="u-1", properties={"plan": "enterprise"}))
    rejection = decode(b"{not json")
    for item in (event, rejection, ORIGIN):
        assert pickle.loads(pickle.dumps(item)) == item


def test_a_screen_is_a_page_of_an_app_and_a_group_names_the_company() -> None:
    screen = decode(
        orjson.dumps({"type": "screen", "messageId": "s", "anonymousId": "a", "name": "Pricing"})
    )
    assert isinstance(screen, Event) and (screen.type, screen.path) == ("screen", "Pricing")
    with_path = decode(
        orjson.dumps(
            {
                "type": "screen",
                "messageId": "s",
                "anonymousId": "a",
                "name": "Pricing",
                "properties": {"path": "/pricing"},
            }
        )
    )
    assert isinstance(with_path, Event) and with_path.path == "/pricing"
    group = decode(
        orjson.dumps(
            {
                "type": "group",
                "messageId": "g",
                "userId": "u1",
                "groupId": "acme",
                "traits": {"name": "Acme"},
            }
        )
    )
    assert isinstance(group, Event) and group.type == "group"
