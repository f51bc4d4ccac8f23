"""How a person's state is stored: format 3 (msgpack, StoredPerson); formats 1 and 2 still read."""

from __future__ import annotations

from dataclasses import replace
from itertools import pairwise
from pathlib import Path

import msgspec
import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from engine.consent import ConsentStatement
from engine.person import (
    DECISION,
    LIFECYCLE,
    STATE_FORMAT,
    PersonState,
    Seen,
    add_position,
    already_applied,
    apply_event,
    decode_state,
    encode_state,
    holds_position,
    message_digest,
    offsets_of,
    outbox_of,
    replayed_outputs,
    runs_of,
    settle,
)
from engine.person_records import Absorbed, RateWindow, RefusedMerge, Touch
from tests.unit.test_person import (
    COMPANY,
    NOW_MS,
    RULES,
    decide,
    event,
    known_buyer,
    stored_fields,
)

# Written by the format-1 encoder (commit c656455) for the person `format_1_person` builds.
FORMAT_1 = Path(__file__).with_name("state_format_1.bin").read_bytes()
# Written by the format-2 encoder (commit e8231a9) for the same person.
FORMAT_2 = Path(__file__).with_name("state_format_2.bin").read_bytes()


def format_1_person() -> PersonState:
    """A promoted, assigned buyer with input positions, submissions, timers and an outbox."""
    p = known_buyer()
    demo = replace(event("m1", "Demo Requested", plan="enterprise"), source="events:0", offset=41)
    apply_event(p, demo, RULES, NOW_MS)
    show = replace(event("m2", "Trade Show Visited"), source="events:0", offset=42)
    _, promotion = apply_event(p, show, RULES, NOW_MS)
    assert promotion is not None
    decide(promotion)
    return p


def assert_same_person(old: PersonState, today: PersonState) -> None:
    """The same person, and their outboxes re-emit the same records (today's may keep the
    first event's record as its time)."""
    ids = [message_digest(m).hex() for m in ("id", "m2")]
    assert [entry[0] for entry in outbox_of(old)] == [entry[0] for entry in outbox_of(today)] == ids
    for e in (event("id", type_="identify", traits=COMPANY), event("m2", "Trade Show Visited")):
        digest = message_digest(e.message_id)
        assert [orjson.dumps(o.value) for o in replayed_outputs(old, e, digest)] == [
            orjson.dumps(o.value) for o in replayed_outputs(today, e, digest)
        ]
    assert old == replace(today, is_new=False, version=old.version, outbox=old.outbox)


def test_a_format_1_state_loads_as_the_state_the_same_events_make_today() -> None:
    assert FORMAT_1[:1] == b"{"  # JSON: stored before format 2
    old = decode_state("p1", FORMAT_1, 7)
    assert old.version == 7
    assert_same_person(old, format_1_person())
    assert old.seen == [message_digest("id"), message_digest("m1"), message_digest("m2")]
    assert old.unsettled == {"events:0": [(41, 2)]}
    assert all(d[:1] == b"c" and len(d) == 7 for d, _ in old.submissions)


def test_a_format_2_state_loads_as_the_state_the_same_events_make_today() -> None:
    assert FORMAT_2[:1] == b"\x02"
    old = decode_state("p1", FORMAT_2)
    assert_same_person(old, format_1_person())
    points = [c[0] for rules in old.score.contributions.values() for c in rules.values()]
    assert points and all(type(x) is float for x in points)
    migrated = encode_state(old)
    assert migrated[:1] == STATE_FORMAT and len(migrated) < len(FORMAT_2)
    assert_same_person(decode_state("p1", migrated), format_1_person())


def test_a_format_1_state_is_saved_in_todays_format_and_keeps_its_memory() -> None:
    migrated = encode_state(decode_state("p1", FORMAT_1))
    assert migrated[:1] == STATE_FORMAT and len(migrated) < len(FORMAT_1)
    p = decode_state("p1", migrated)
    # Bytewax replays m2 at its position: its decision comes again, nothing counts twice.
    replay = replace(event("m2", "Trade Show Visited"), source="events:0", offset=42)
    assert already_applied(p, replay, message_digest("m2")) is Seen.REPLAY
    records, promotion = apply_event(p, replay, RULES, NOW_MS)
    assert promotion is None and [r.kind for r in records] == [LIFECYCLE, DECISION]
    assert all(r.replayed for r in records) and records[0].value["to"] == "mql"
    assert records[1].value["trigger"]["message_id"] == "m2"
    # The same form submitted again under a new messageId is a duplicate submission.
    before = p.score.contributions
    again = replace(event("m9", "Demo Requested", plan="enterprise"), source="events:0", offset=99)
    apply_event(p, again, RULES, NOW_MS + 60_000)
    assert p.score.contributions == before


def test_a_format_1_message_digest_starting_with_c_is_not_taken_for_a_content_digest() -> None:
    message_id = next(f"m{i}" for i in range(1000) if message_digest(f"m{i}").hex()[0] == "c")
    stored = b'{"s":"lead","t":[0,0],"c":{},"m":["%s"]}' % message_digest(message_id).hex().encode()
    assert decode_state("p1", stored).seen == [message_digest(message_id)]


def test_format_1_positional_lists_become_declared_records() -> None:
    stored = (
        b'{"s":"lead","t":[0,9],"c":{},"m":[],"ft":["spring","google","cpc",5],'
        b'"lt":["fall","mail","email",9],"mf":[["x",3]],"mr":[["y","conflicting_user_id",4]],'
        b'"rl":[7,2,1],"cn":{"email":["granted",5,"cmp","consent",1]}}'
    )
    p = decode_state("p1", stored)
    assert p.first_touch == Touch("spring", "google", "cpc", 5)
    assert p.last_touch == Touch("fall", "mail", "email", 9)
    assert p.merged_from == [Absorbed("x", 3)]
    assert p.refused == [RefusedMerge("y", "conflicting_user_id", 4)]
    assert p.rate == RateWindow(7, 2, flooded=True) and p.work is None
    assert p.consent == {"email": ConsentStatement("granted", 5, "cmp", "consent", pre_ticked=True)}
    assert decode_state("p1", encode_state(p)) == p


def test_a_tombstone_keeps_only_its_erasure_time_and_outbox() -> None:
    p = PersonState("p1", erased_ms=NOW_MS, outbox=[["ab", [["lifecycle", {"to": "erased"}]]]])
    fields = stored_fields(encode_state(p))
    assert fields.erased_ms == NOW_MS and fields.stage == "" and fields.contacts is None
    back = decode_state("p1", encode_state(p))
    assert back.erased_ms == NOW_MS and outbox_of(back) == [
        ["ab", [["lifecycle", {"to": "erased"}]]]
    ]


def test_bytes_that_do_not_match_the_declared_fields_are_refused() -> None:
    fields = stored_fields(encode_state(format_1_person()))
    values = list(msgspec.structs.astuple(fields))
    values[3] = "not a map"  # contributions
    with pytest.raises(
        msgspec.ValidationError, match=r"Expected `object \| array`, got `str` - at `\$\[3\]`"
    ):
        decode_state("p1", STATE_FORMAT + msgspec.msgpack.encode(values))
    with pytest.raises(msgspec.ValidationError, match="at least length 25"):
        decode_state("p1", STATE_FORMAT + msgspec.msgpack.encode(values[:4]))


def test_a_field_added_at_the_end_finds_states_stored_before_it() -> None:
    # A format-2 state stored before erased_ms was declared: the array ends one field earlier.
    shorter = msgspec.msgpack.encode(msgspec.msgpack.decode(FORMAT_2[1:])[:-1])
    assert decode_state("p1", FORMAT_2[:1] + shorter).stage == "mql"


def test_a_score_naming_a_rule_it_does_not_list_is_refused() -> None:
    values = list(msgspec.structs.astuple(stored_fields(encode_state(format_1_person()))))
    values[-1] = values[-1][:1]  # score_rules: one name left
    with pytest.raises(msgspec.ValidationError, match="missing from score_rules"):
        decode_state("p1", STATE_FORMAT + msgspec.msgpack.encode(values))
    values[5] = {}  # caps in format 2's shape beside format 3's contributions
    with pytest.raises(msgspec.ValidationError, match="a format-3 state with a format-2 score"):
        decode_state("p1", STATE_FORMAT + msgspec.msgpack.encode(values))
    format_3 = list(msgspec.structs.astuple(stored_fields(encode_state(format_1_person()))))
    with pytest.raises(msgspec.ValidationError, match="a format-2 state with a format-3 score"):
        decode_state("p1", FORMAT_2[:1] + msgspec.msgpack.encode(format_3))


def test_seen_digests_are_kept_joined_unless_one_is_not_six_bytes() -> None:
    p = format_1_person()
    fields = stored_fields(encode_state(p))
    assert fields.seen == b"".join(p.seen) and len(p.seen) == 3
    assert fields.last_ms == p.score.last_ms - p.score.ref_ms
    assert decode_state("p1", encode_state(p)).seen == p.seen
    p.seen.append(b"c" + bytes(6))  # a 7-byte digest (format 1 kept content digests there)
    assert stored_fields(encode_state(p)).seen == p.seen
    assert decode_state("p1", encode_state(p)).seen == p.seen


@given(
    st.dictionaries(
        st.sampled_from(["", "analytics", "routing"]),
        st.dictionaries(
            st.sampled_from(["page_view", "pricing_page", "demo"]),
            st.tuples(
                st.one_of(st.floats(-1e6, 1e6), st.integers(-1000, 1000).map(float)),
                st.integers(NOW_MS - 10**10, NOW_MS),
            ),
        ),
    ),
    st.dictionaries(
        st.sampled_from(["page_view", "webinar"]),
        st.dictionaries(
            st.integers(0, 30_000).map(str),
            st.lists(st.integers(NOW_MS - 10**10, NOW_MS), max_size=4),
        ),
    ),
)
def test_a_compact_score_gives_back_exactly_the_score_it_was_made_of(
    contributions: dict[str, dict[str, tuple[float, int]]], caps: dict[str, dict[str, list[int]]]
) -> None:
    p = PersonState("p1")
    p.score.ref_ms, p.score.last_ms = NOW_MS - 5, NOW_MS
    p.score.contributions = {
        dim: {rule: [points, at] for rule, (points, at) in rules.items()}
        for dim, rules in contributions.items()
    }
    p.score.caps = caps
    back = decode_state("p1", encode_state(p)).score
    assert back == p.score
    assert all(type(c[0]) is float for rules in back.contributions.values() for c in rules.values())


@given(
    st.lists(st.integers(0, 60), max_size=80),
    st.lists(st.integers(0, 70), max_size=4),
    st.lists(st.integers(0, 70), max_size=20),
)
def test_input_positions_kept_as_runs_behave_as_a_set_of_offsets(
    added: list[int], cuts: list[int], asked: list[int]
) -> None:
    p, model = PersonState("p1"), set()
    for offset in added:
        add_position(p.unsettled.setdefault("ev0", []), offset)
        model.add(offset)
    for cut in cuts:
        settle(p, {"ev0": cut})
        model = {o for o in model if o >= cut}
    runs = p.unsettled.get("ev0", [])
    assert offsets_of(runs) == sorted(model) and bool(runs) == ("ev0" in p.unsettled)
    # Ascending, disjoint and never touching: each run is as long as it can be.
    assert all(a[0] + a[1] < b[0] for a, b in pairwise(runs))
    assert all(count >= 1 for _, count in runs)
    assert all(holds_position(runs, o) == (o in model) for o in asked + added)
    assert runs_of(sorted(model)) == runs


def test_a_busy_cookie_s_consecutive_positions_are_one_run() -> None:
    p = PersonState("p1")
    for n in range(5_000):
        add_position(p.unsettled.setdefault("ev0", []), 1_000 + n)
    assert p.unsettled == {"ev0": [(1_000, 5_000)]}
    assert stored_fields(encode_state(p)).unsettled == {"ev0": [(1_000, 5_000)]}
