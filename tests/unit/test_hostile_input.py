"""Hostile input: whatever arrives, the engine answers with an event or a rejection, never a crash.

The dataflow integration test (tests/integration/test_reliability.py) sends a
corpus of such messages through the real flow; here hypothesis searches the
space far more widely, through every engine function an accepted event reaches.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.events import REASONS, Event, Origin, Rejection, decode_event
from engine.identity import identifiers_of, normalise_email
from engine.person import PersonState, Rulebook, apply_event, decode_state, encode_state
from engine.profile import _TRAIT_KEYS
from engine.settings import load_settings

RULES = Rulebook(load_settings())
ORIGIN = Origin("leadflow.events", 0, 7, None)
NOW_MS = 1_793_000_000_000  # 2026-10-26

scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=40)
)
json_values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
# Keys the engine reads, with values of any type: that is where wrong types hurt.
known_keys = st.sampled_from(sorted(_TRAIT_KEYS | {"email", "plan", "path", "url", "campaign"}))
holders = st.dictionaries(known_keys | st.text(max_size=8), json_values, max_size=6)
timestamps = (
    st.datetimes().map(lambda d: d.isoformat() + "Z")
    | st.sampled_from(["1970-01-01T00:00:00Z", "9999-12-31T23:59:59Z", "NaN", "", "2026-13-45"])
    | json_values
)
envelopes = st.fixed_dictionaries(
    {
        "type": st.sampled_from(["track", "page", "identify", "alias"]) | json_values,
        "messageId": st.text(min_size=1, max_size=30) | json_values,
    },
    optional={
        "event": st.sampled_from(["Demo Requested", "Pricing Viewed", "erase"]) | json_values,
        "anonymousId": st.text(max_size=30) | json_values,
        "userId": st.text(max_size=30) | json_values,
        "previousId": st.text(max_size=30) | json_values,
        "timestamp": timestamps,
        "traits": holders | json_values,
        "properties": holders,
        "context": st.fixed_dictionaries({}, optional={"traits": holders, "campaign": holders})
        | json_values,
        "name": json_values,
    },
)


# Well-formed envelopes whose contents are hostile: these reach every engine function.
plausible_times = st.datetimes(
    min_value=datetime(2025, 1, 1), max_value=datetime(2026, 10, 26)
).map(lambda d: d.isoformat() + "Z")
plausible = st.fixed_dictionaries(
    {
        "type": st.sampled_from(["track", "page", "identify", "alias"]),
        "messageId": st.text(min_size=1, max_size=30).filter(str.strip),
        "anonymousId": st.text(min_size=1, max_size=30).filter(str.strip),
        "event": st.sampled_from(["Demo Requested", "Pricing Viewed", "Webinar Attended"]),
        "previousId": st.text(min_size=1, max_size=30).filter(str.strip),
    },
    optional={
        "userId": st.text(max_size=30) | st.integers(min_value=-(2**63), max_value=2**64 - 1),
        "timestamp": plausible_times,
        "traits": holders,
        "properties": holders,
        "context": st.fixed_dictionaries({}, optional={"traits": holders, "campaign": holders}),
    },
)


def decode(raw: bytes, trusted: bool = False) -> Event | Rejection:
    return decode_event(
        raw,
        ORIGIN,
        ingested_ms=NOW_MS,
        trusted=trusted,
        max_bytes=RULES.settings.limits.max_event_bytes,
        max_future_skew_ms=RULES.settings.limits.max_future_skew_s * 1000,
    )


def process(raw: bytes, trusted: bool = False) -> Event | Rejection:
    """Everything an accepted event goes through, minus I/O; returns the decoding."""
    result = decode(raw, trusted)
    if isinstance(result, Rejection):
        assert result.reason in REASONS, result.reason
        assert result.raw == raw  # the DLQ gets the original bytes
        return result
    ids = identifiers_of(result, RULES.settings.identity)
    person = PersonState(ids[0].digest if ids else "p", is_new=True)
    apply_event(person, result, RULES, NOW_MS)
    assert decode_state(person.one_id, encode_state(person)) is not None
    return result


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(envelopes, st.booleans())
def test_any_json_envelope_is_processed_or_rejected_with_a_reason(
    envelope: dict[str, Any], trusted: bool
) -> None:
    process(orjson.dumps(envelope), trusted)


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(plausible, st.booleans())
def test_hostile_contents_of_well_formed_events_never_break_the_engine(
    envelope: dict[str, Any], trusted: bool
) -> None:
    process(orjson.dumps(envelope), trusted)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_random_bytes_are_rejected_with_a_reason(raw: bytes) -> None:
    process(raw)


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"[" * 100_000 + b"]" * 100_000, "oversized"),
        (b'{"a":' * 2_000 + b"1" + b"}" * 2_000, "invalid_json"),  # nested past orjson's depth
        (b'{"type":"track","messageId":"m","anonymousId":"\xff\xfe"}', "invalid_json"),
        (b'{"type":"track","messageId":"m","anonymousId":"a","x":NaN}', "invalid_json"),
        (b'{"type":"track","messageId":"m","anonymousId":"a","x":1e999}', "invalid_json"),
        (b'{"type":"page","messageId":"m","anonymousId":"\\ud800"}', "invalid_json"),
        (
            b'{"type":"page","messageId":"m","anonymousId":"a","userId":1' + b"0" * 30 + b"}",
            "bad_field",
        ),
    ],
)
def test_structurally_hostile_messages_are_rejected(raw: bytes, reason: str) -> None:
    result = process(raw)
    assert isinstance(result, Rejection) and result.reason == reason


@pytest.mark.parametrize("when", ["1970-01-01T00:00:00Z", "9999-12-31T23:59:59Z"])
def test_timestamps_at_the_ends_of_time_are_rejected(when: str) -> None:
    raw = orjson.dumps({"type": "page", "messageId": "m", "anonymousId": "a", "timestamp": when})
    result = process(raw)
    assert isinstance(result, Rejection) and result.reason == "bad_timestamp"


def test_a_huge_string_within_the_size_limit_is_processed() -> None:
    blob = "x" * (RULES.settings.limits.max_event_bytes - 200)
    raw = orjson.dumps(
        {"type": "track", "event": "Demo Requested", "messageId": "m", "anonymousId": "a",
         "properties": {"note": blob}}
    )  # fmt: skip
    assert isinstance(process(raw), Event)


def test_duplicate_keys_keep_the_last_value_as_json_parsers_do() -> None:
    raw = b'{"type":"track","type":"page","messageId":"m","anonymousId":"a"}'
    result = process(raw)
    assert isinstance(result, Event) and result.type == "page"


def test_look_alike_emails_stay_different_people_but_width_variants_fold() -> None:
    latin = normalise_email("alice@example.com")
    cyrillic = normalise_email("\u0430lice@example.com")  # Cyrillic a: another mailbox
    fullwidth = normalise_email("\uff41lice@\uff45xample.com")  # the same characters, wide
    assert cyrillic != latin  # folding it would let a look-alike take over alice's lead
    assert fullwidth == latin


def test_an_absurd_employee_count_is_ignored_not_fatal() -> None:
    # Found by the property test above: 1.8e19 employees broke saving the state.
    traits = {"employee_count": 1.8e19, "email": "a@b.example", "company": {"employees": "9" * 30}}
    raw = orjson.dumps({"type": "identify", "messageId": "m", "anonymousId": "a", "traits": traits})
    assert isinstance(process(raw), Event)
