"""The collector's pure parts: Segment's enrichment of an event, and the rate limit."""

from __future__ import annotations

from typing import Any

from engine.person import epoch_ms, iso
from leadflow.collector import TokenBucket, normalise

RECEIVED = epoch_ms("2026-11-30T12:00:10.000Z") or 0.0


def test_the_client_clock_is_corrected_from_sent_at_as_segment_does() -> None:
    # The client's clock runs 5 minutes slow: its event 2 s before sending.
    event: dict[str, Any] = {
        "type": "track",
        "timestamp": "2026-11-30T11:55:08.000Z",
        "writeKey": "secret",
    }
    normalise(event, RECEIVED, "2026-11-30T11:55:10.000Z", "203.0.113.9")
    assert event["timestamp"] == "2026-11-30T12:00:08.000Z"
    assert event["originalTimestamp"] == "2026-11-30T11:55:08.000Z"
    assert event["receivedAt"] == "2026-11-30T12:00:10.000Z"
    assert event["context"] == {"ip": "203.0.113.9"}
    assert event["messageId"].startswith("lf-") and "writeKey" not in event


def test_what_the_client_said_is_kept() -> None:
    event: dict[str, Any] = {
        "messageId": "m1",
        "context": {"ip": "198.51.100.1"},
        "sentAt": "2026-11-30T12:00:10.000Z",
    }
    normalise(event, RECEIVED, None, "203.0.113.9")
    assert (event["messageId"], event["context"]["ip"]) == ("m1", "198.51.100.1")
    assert "timestamp" not in event  # none given: the engine takes the broker's time
    assert "sentAt" not in event
    bare: dict[str, Any] = {}
    normalise(bare, RECEIVED, None, "")
    assert "context" not in bare  # record_ip off: no address


def test_a_key_may_take_its_bucket_into_debt_then_waits_it_off() -> None:
    bucket = TokenBucket(rate=10, tokens=10, at=0.0)
    assert bucket.take(25, 0.0) == 0  # a batch larger than a second's worth: admitted
    assert bucket.take(1, 0.5) == (1 - (-15 + 5)) / 10  # 1.1 s until the bucket is positive
    assert bucket.take(1, 1.6) == 0
    assert iso(int(RECEIVED) + 7) == "2026-11-30T12:00:10.007Z"
