from __future__ import annotations

import random
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from msgspec import structs

from engine.events import Event
from engine.person import (
    DECISION,
    DLQ,
    LIFECYCLE,
    OUTBOX_FIRST,
    OUTBOX_FORMAT,
    OUTBOX_PLAIN,
    STATE_FORMAT,
    Output,
    PersonState,
    Promotion,
    Rulebook,
    absorb,
    already_applied,
    apply_event,
    current_scores,
    decode_state,
    encode_state,
    erase,
    iso,
    message_digest,
    offsets_of,
    outbox_of,
    runs_of,
    settle,
)
from engine.person_records import StoredPerson
from engine.sales import apply_feedback, complete_routing, route_promotion
from engine.settings import load_settings

NOW_MS = 1_793_000_000_000
RULES = Rulebook(load_settings(env={}))
COMPANY = {
    "email": "ana@acme.example",
    "company": {"name": "Acme", "employee_count": 150},
    "title": "CMO",
}


def decide(promotion: Promotion, sdr: str = "sdr-ana") -> list[Output]:
    """Route a promotion and complete it with ``sdr`` (the store's choice, in production)."""
    roster = RULES.settings.roster
    routing = route_promotion(promotion, RULES, NOW_MS)
    chosen = next(s for s in roster.sdrs if s.id == sdr)
    return complete_routing(routing, chosen, roster, RULES, NOW_MS)


def event(
    message_id: str,
    name: str = "",
    t_ms: int = NOW_MS,
    type_: str = "track",
    trusted: bool = False,
    traits: dict[str, Any] | None = None,
    **properties: Any,
) -> Event:
    payload: dict[str, Any] = {"properties": properties}
    if traits:
        payload["traits"] = traits
    return Event(
        type=type_,
        message_id=message_id,
        event_ms=t_ms,
        ingested_ms=t_ms,
        name=name,
        anonymous_id="a",
        email=str((traits or {}).get("email", "")),
        trusted=trusted,
        payload=payload,
    )


def stored_fields(raw: bytes) -> StoredPerson:
    """The fields of a state as encode_state stores it (format 3)."""
    assert raw[:1] == STATE_FORMAT
    return msgspec.msgpack.decode(raw[1:], type=StoredPerson)


def known_buyer() -> PersonState:
    """A person with a company profile (fit 70) and no behaviour yet."""
    p = PersonState("p1", is_new=True)
    apply_event(p, event("id", type_="identify", traits=COMPANY), RULES, NOW_MS)
    return p


def test_first_event_creates_a_lead_and_records_the_transition() -> None:
    p = PersonState("p1", is_new=True)
    outputs, promotion = apply_event(p, event("m1", "Whitepaper Downloaded"), RULES, NOW_MS)
    assert promotion is None
    assert [(o.kind, o.value["from"], o.value["to"]) for o in outputs] == [
        (LIFECYCLE, None, "lead")
    ]
    assert current_scores(p, RULES)[""] == 15.0


def test_a_seen_message_changes_nothing_and_replays_its_records() -> None:
    p = PersonState("p1", is_new=True)
    first, _ = apply_event(p, event("m1", "Demo Requested"), RULES, NOW_MS)
    before = encode_state(p)
    again, promotion = apply_event(p, event("m1", "Demo Requested"), RULES, NOW_MS + 5)
    assert promotion is None
    assert encode_state(p) == before
    assert [o.value for o in again] == [o.value for o in first]


def test_the_same_form_submitted_twice_scores_once() -> None:
    p = PersonState("p1", is_new=True)
    apply_event(p, event("m1", "Whitepaper Downloaded", title="Routing Playbook"), RULES, NOW_MS)
    apply_event(
        p, event("m2", "Whitepaper Downloaded", title="Routing Playbook"), RULES, NOW_MS + 1
    )
    assert current_scores(p, RULES)[""] == pytest.approx(15.0)
    apply_event(
        p, event("m3", "Whitepaper Downloaded", title="State of B2B Leads"), RULES, NOW_MS + 2
    )
    assert current_scores(p, RULES)[""] == pytest.approx(30.0)


def test_promotion_needs_behaviour_and_fit_and_builds_one_decision_with_reasons() -> None:
    p = PersonState("p1", is_new=True)
    apply_event(p, event("m1", "Demo Requested"), RULES, NOW_MS)
    _, none = apply_event(p, event("m2", "Contact Form Submitted"), RULES, NOW_MS)
    _, none2 = apply_event(p, event("m3", "Webinar Attended"), RULES, NOW_MS)
    assert none is None and none2 is None  # 105 points, but no fit yet: no company e-mail
    _, promotion = apply_event(p, event("m4", type_="identify", traits=COMPANY), RULES, NOW_MS)
    assert promotion is not None
    outputs = decide(promotion, "sdr-bruno")
    assert [o.kind for o in outputs] == [LIFECYCLE, DECISION]
    decision = outputs[1].value
    assert decision["sdr"] == "sdr-bruno" and decision["decision_id"] == promotion.decision_id
    assert decision["trigger"]["message_id"] == "m4"
    assert decision["qualified_on"] == ["total"]
    assert decision["score"] == 105.0
    assert [r["rule"] for r in decision["reasons"]] == [
        "demo_request",
        "contact_form",
        "webinar_attended",
    ]
    assert decision["fit"] == 70.0 and decision["fit_minimum"] == 25.0  # 25+15+10+4x5
    assert decision["grade"] == "A2"  # fit 70 (A from 70), score 105 (2 from 100)
    assert decision["grade_reasons"]["engagement"] == {
        "score": 105.0,
        "band": "2",
        "minimum": 100.0,
    }
    assert decision["fit_reasons"][0] == {"factor": "title:c_level", "points": 25.0}
    assert decision["channels"] == ["email"]
    assert p.stage == "mql" and p.owner == "sdr-bruno"
    _, again = apply_event(p, event("m5", "Trade Show Visited"), RULES, NOW_MS)
    assert again is None  # already an MQL: more points, no second promotion


def test_a_product_line_can_qualify_on_its_own_dimension() -> None:
    p = known_buyer()
    apply_event(p, event("t1", "Trial Started", product="analytics"), RULES, NOW_MS)  # 40 analytics
    _, promotion = apply_event(p, event("t2", type_="page"), RULES, NOW_MS)
    assert promotion is None
    page = replace(event("t3", type_="page"), path="/product/analytics/dashboards")
    _, promotion = apply_event(p, page, RULES, NOW_MS)  # +5
    assert promotion is None
    for n in range(
        4
    ):  # four more product pages: 40 + 25 = 65 >= 60 on analytics, total far below 100
        _, promotion = apply_event(
            p, replace(page, message_id=f"t4-{n}", event_ms=NOW_MS + n), RULES, NOW_MS
        )
    assert promotion is not None and promotion.verdict.on == ("analytics",)
    decision = decide(promotion)[-1].value
    assert decision["dimensions"]["analytics"] == pytest.approx(65.0, abs=0.01)
    cited = [r["rule"] for r in decision["dimension_reasons"]["analytics"]]
    assert cited == ["analytics_trial", "analytics_product_page"]
    assert decision["score"] < 100


def test_a_cleansed_lead_is_kept_disqualified_with_its_reason_and_never_promoted() -> None:
    p = PersonState("p1", is_new=True)
    outputs, _ = apply_event(
        p, event("m1", type_="identify", traits={"email": "lead@mailinator.com"}), RULES, NOW_MS
    )
    assert [(o.value["to"], o.value["cause"]) for o in outputs] == [
        ("lead", "first_event"),
        ("disqualified", "cleansing:disposable_email"),
    ]
    for n, name in enumerate(
        ["Demo Requested", "Contact Form Submitted", "Webinar Attended", "Trade Show Visited"]
    ):
        _, promotion = apply_event(p, event(f"m{n + 2}", name), RULES, NOW_MS)
        assert promotion is None
    assert p.stage == "disqualified" and p.disqualified == "disposable_email"
    assert current_scores(p, RULES)[""] == 135.0  # still recorded, for the funnel
    assert "email" not in p.channels


def test_telemarketing_can_promote_by_hand_only_from_the_trusted_topic() -> None:
    p = PersonState("p1", is_new=True)
    apply_event(p, event("m1", "Whitepaper Downloaded"), RULES, NOW_MS)
    _, promotion = apply_event(p, event("m2", "manual_mql", trusted=True), RULES, NOW_MS)
    assert promotion is not None and promotion.cause == "manual_mql"
    assert decide(promotion)[-1].value["qualified_on"] == ["manual"]
    q = PersonState("p2", is_new=True)
    _, untrusted = apply_event(q, event("m1", "manual_mql", trusted=False), RULES, NOW_MS)
    assert untrusted is None


def test_state_round_trips_through_its_encoding() -> None:
    p = known_buyer()
    apply_event(p, event("m1", "Demo Requested", plan="enterprise"), RULES, NOW_MS)
    _, promotion = apply_event(p, event("m2", "Trade Show Visited"), RULES, NOW_MS)
    assert promotion is not None
    decide(promotion)
    stored = encode_state(p)
    restored = decode_state("p1", stored)
    assert restored.outbox_stored and not restored.outbox  # kept deflated until read
    assert encode_state(restored) == stored  # passed through untouched
    assert outbox_of(restored) == outbox_of(p)
    assert restored == replace(p, is_new=False)


def test_a_replay_after_a_reload_re_emits_the_stored_records() -> None:
    p = known_buyer()
    apply_event(p, event("m1", "Demo Requested", plan="enterprise"), RULES, NOW_MS)
    show = event("m2", "Trade Show Visited")
    _, promotion = apply_event(p, show, RULES, NOW_MS)
    assert promotion is not None
    decided = decide(promotion)  # the promotion's records and its decision
    stored = encode_state(p)
    outbox = stored_fields(stored).outbox
    assert b"score_threshold" not in outbox and len(outbox) < len(orjson.dumps(outbox_of(p))) / 2
    again, _ = apply_event(decode_state("p1", stored), show, RULES, NOW_MS + 1)
    assert [orjson.dumps(o.value) for o in again] == [orjson.dumps(o.value) for o in decided]


def test_a_first_events_record_is_kept_as_its_time_and_rebuilt_the_same_on_replay() -> None:
    """Nearly every person keeps their first event's record: as the time it was recorded
    (a few bytes), rebuilt from the replayed event; also once the person is absorbed."""
    context = {"campaign": {"name": "spring", "source": "ads"}, "page": {"path": "/pricing"}}
    first = replace(event("m1", "Pricing Viewed"), payload={"context": context})
    p = PersonState("p1", is_new=True)
    made, _ = apply_event(p, first, RULES, NOW_MS)
    assert [o.value["cause"] for o in made] == ["first_event"]
    assert outbox_of(p) == [[message_digest("m1").hex(), NOW_MS]]
    stored = encode_state(p)
    assert b"first_event" not in stored and b"spring" not in stored_fields(stored).outbox
    assert stored_fields(stored).outbox == OUTBOX_FIRST + message_digest("m1") + bytes.fromhex(
        f"{NOW_MS:012x}"
    )
    again, _ = apply_event(decode_state("p1", stored), first, RULES, NOW_MS + 60_000)
    assert [orjson.dumps(o.value) for o in again] == [orjson.dumps(o.value) for o in made]
    assert again[0].replayed and again[0].value["recorded_at"] == iso(NOW_MS)

    survivor = PersonState("p0")
    absorb(survivor, decode_state("p1", stored), event("join", type_="identify"), RULES, NOW_MS)
    assert outbox_of(survivor) == [[message_digest("m1").hex(), NOW_MS, "p1"]]
    survivor = decode_state("p0", encode_state(survivor))
    assert stored_fields(encode_state(survivor)).outbox[:1] == OUTBOX_PLAIN  # short: not deflated
    again, _ = apply_event(survivor, first, RULES, NOW_MS + 60_000)
    assert [o.value for o in again] == [o.value for o in made]  # still p1's record
    assert made[0].value["one_id"] == "p1" and survivor.one_id == "p0"


def test_a_first_event_that_makes_more_than_its_record_keeps_them_all() -> None:
    p = PersonState("p1", is_new=True)
    _, promotion = apply_event(p, event("mm", "manual_mql", trusted=True), RULES, NOW_MS)
    assert promotion is not None
    made = decide(promotion)  # the first event's record, the promotion's and the decision
    ((_, kept),) = outbox_of(p)
    assert kept == [[o.kind, o.value] for o in made] and kept[0][1]["cause"] == "first_event"


def test_an_unknown_outbox_format_is_refused() -> None:
    record = {"record_id": "r1", "cause": "score_threshold", "to": "mql"}
    stored = stored_fields(encode_state(PersonState("p1", outbox=[["d", [["lifecycle", record]]]])))
    assert stored.outbox[:1] == OUTBOX_FORMAT
    unknown = msgspec.structs.replace(stored, outbox=b"9" + stored.outbox[1:])
    broken = decode_state("p1", STATE_FORMAT + msgspec.msgpack.encode(unknown))
    with pytest.raises(ValueError, match="unknown outbox format"):
        outbox_of(broken)


def test_dedup_window_and_outbox_are_bounded() -> None:
    small = Rulebook(
        structs.replace(
            RULES.settings,
            limits=structs.replace(RULES.settings.limits, dedup_window=3, outbox_size=2),
        )
    )
    p = PersonState("p1", is_new=True)
    for n in range(10):
        apply_event(p, event(f"m{n}", "Whitepaper Downloaded", t_ms=NOW_MS + n, n=n), small, NOW_MS)
    assert len(p.seen) == 3
    assert len(outbox_of(p)) == 1  # only the first event produced records


def test_a_replay_from_the_input_is_recognised_by_its_position_after_the_window() -> None:
    small = Rulebook(
        structs.replace(
            RULES.settings, limits=structs.replace(RULES.settings.limits, dedup_window=3)
        )
    )
    p = PersonState("p1", is_new=True)
    views = [
        replace(event(f"m{n}", "Pricing Viewed", n=n), source="ab0", offset=100 + n)
        for n in range(10)
    ]
    for e in views:
        apply_event(p, e, small, NOW_MS)
    assert views[0].message_id and len(p.seen) == 3  # its digest is long gone
    before = encode_state(p)
    apply_event(p, views[0], small, NOW_MS)  # Bytewax replaying after a crash
    assert encode_state(p) == before
    restored = decode_state("p1", before)
    assert restored.unsettled == {"ab0": [(100, 10)]}  # one run of ten positions
    # The same offset of another partition is another event.
    other = replace(event("x", "Pricing Viewed"), source="ab1", offset=100)
    apply_event(p, other, small, NOW_MS)
    assert p.unsettled["ab1"] == [(100, 1)]


def test_settled_positions_are_forgotten_and_absorbed_ones_kept() -> None:
    p = PersonState("p1", unsettled={"ab0": runs_of([5, 7, 9]), "ab1": [(3, 1)]})
    settle(p, {"ab0": 8, "ab1": 4, "zz0": 100})
    assert p.unsettled == {"ab0": [(9, 1)]}
    settle(p, {"ab0": 10})
    assert p.unsettled == {}
    survivor, absorbed = known_buyer(), PersonState("p2", unsettled={"ab0": runs_of([4, 12])})
    survivor.unsettled = {"ab0": runs_of([11, 12])}
    absorb(survivor, absorbed, event("m", "Pricing Viewed"), RULES, NOW_MS)
    assert survivor.unsettled == {"ab0": [(4, 1), (11, 2)]}
    replayed = replace(event("late", "Pricing Viewed"), source="ab0", offset=4)
    assert already_applied(survivor, replayed, message_digest("late"))


SCORED = [
    "Demo Requested",
    "Webinar Attended",
    "Whitepaper Downloaded",
    "Contact Form Submitted",
    "Trade Show Visited",
]


@settings(max_examples=150, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from(SCORED), st.integers(0, 6 * 86_400_000)), min_size=1, max_size=12
    ),
    st.lists(st.integers(0, 11), max_size=12),
    st.randoms(use_true_random=False),
)
def test_a_message_id_never_counts_twice_whatever_the_order(
    events: list[tuple[str, int]], repeats: list[int], rnd: random.Random
) -> None:
    unique = [event(f"m{i}", name, NOW_MS + t, n=i) for i, (name, t) in enumerate(events)]
    stream = unique + [unique[i % len(unique)] for i in repeats]  # retries of some of them
    rnd.shuffle(stream)
    clean, noisy = PersonState("p", is_new=True), PersonState("p", is_new=True)
    for e in unique:
        apply_event(clean, e, RULES, NOW_MS)
    for e in stream:
        apply_event(noisy, e, RULES, NOW_MS)
    assert current_scores(noisy, RULES) == pytest.approx(current_scores(clean, RULES), rel=1e-9)
    assert noisy.score.caps == clean.score.caps


def test_a_replayed_erasure_sends_its_record_again_and_nothing_personal_is_kept() -> None:
    p = known_buyer()
    apply_event(p, event("m1", "Demo Requested"), RULES, NOW_MS)
    gone = event("m2", "erase", t_ms=NOW_MS + 1, trusted=True)
    record = erase(p, gone, RULES, NOW_MS)
    tombstone = encode_state(p)
    deflated = stored_fields(tombstone).outbox
    kept = tombstone.replace(deflated, b"") + orjson.dumps(outbox_of(decode_state("p1", tombstone)))
    assert b"acme" not in kept.lower() and b"@" not in kept
    replayed, _ = apply_event(decode_state("p1", tombstone), gone, RULES, NOW_MS + 5)
    assert [o.value for o in replayed] == [record.value]
    older, _ = apply_event(decode_state("p1", tombstone), event("m0", "Demo Requested"), RULES, 0)
    assert older == []


DAY_MS = 86_400_000


def test_the_same_form_weeks_later_is_a_new_submission() -> None:
    p = PersonState("p1", is_new=True)
    form: dict[str, Any] = {"title": "Routing Playbook"}
    apply_event(p, event("m1", "Whitepaper Downloaded", **form), RULES, NOW_MS)
    apply_event(p, event("m2", "Whitepaper Downloaded", t_ms=NOW_MS + 3_600_000, **form), RULES, 0)
    first = current_scores(p, RULES)[""]
    later = NOW_MS + 21 * DAY_MS  # outside duplicate_submission_hours (24 h)
    apply_event(p, event("m3", "Whitepaper Downloaded", t_ms=later, **form), RULES, later)
    assert current_scores(p, RULES)[""] > first  # scored again (decayed first points + 15)
    assert len(p.submissions) == 1  # the expired fingerprint was replaced, not kept


def test_a_resend_is_applied_once_and_emits_nothing_a_replay_re_emits() -> None:
    p = PersonState("p1", is_new=True)
    first = replace(event("m1", "Demo Requested"), source="ev0", offset=7)
    records, _ = apply_event(p, first, RULES, NOW_MS)
    assert [o.value["cause"] for o in records] == ["first_event"]
    before = encode_state(p)
    resend = replace(first, offset=9)  # the client sent it again: another input position
    assert already_applied(p, resend, message_digest("m1")).value == "resend"
    assert apply_event(p, resend, RULES, NOW_MS) == ([], None)
    assert already_applied(p, first, message_digest("m1")).value == "replay"
    replayed, _ = apply_event(p, first, RULES, NOW_MS)  # Bytewax reading offset 7 again
    assert [o.value for o in replayed] == [o.value for o in records]
    assert encode_state(p) == before


def test_a_flood_keeps_neither_its_positions_nor_its_refusals() -> None:
    p = known_buyer()
    demo = replace(event("d", "Demo Requested"), source="ev0", offset=1)
    apply_event(p, demo, RULES, NOW_MS)
    outbox_before = len(outbox_of(p))
    flood = [
        replace(event(f"f{n}", type_="page", path="/x"), source="ev0", offset=10 + n)
        for n in range(300)
    ]
    refused = [apply_event(p, e, RULES, NOW_MS)[0] for e in flood]
    assert p.disqualified == "rate_limited" and p.stage == "disqualified"
    positions = sum(len(offsets_of(v)) for v in p.unsettled.values())
    # The demo, the 118 views within the limit of 120 (the identify and the demo count
    # too), and the view that disqualified; none of the 181 refused after it.
    assert positions == 1 + 118 + 1
    assert len(outbox_of(p)) == outbox_before + 1  # only the disqualification
    # A replay of the refused views (after a crash) refuses them again, unchanged.
    again = [apply_event(p, e, RULES, NOW_MS)[0] for e in flood[200:]]
    assert [[o.value for o in r] for r in again] == [[o.value for o in r] for r in refused[200:]]
    assert sum(len(offsets_of(v)) for v in p.unsettled.values()) == positions


def test_a_merge_adds_up_the_minute_of_both_people() -> None:
    """Two cookies' 70 views each in one broker minute are one person's 140: the limit
    (120) refuses the next view, whichever side had it; an older minute does not add."""
    views = [event(f"v{n}", type_="page", path="/x") for n in range(141)]
    survivor, absorbed = PersonState("p1", is_new=True), PersonState("p2", is_new=True)
    for n, e in enumerate(views[:140]):
        out, _ = apply_event(survivor if n % 2 else absorbed, e, RULES, NOW_MS)
        assert "rate_limited" not in [o.value.get("reason") for o in out]
    absorb(survivor, absorbed, event("join", type_="identify"), RULES, NOW_MS)
    assert survivor.rate is not None and survivor.rate.count == 140
    out, _ = apply_event(survivor, views[140], RULES, NOW_MS)
    assert "rate_limited" in [o.value.get("reason") for o in out]

    caught, fresh = PersonState("p3", is_new=True), PersonState("p4", is_new=True)
    for n in range(122):
        apply_event(caught, event(f"c{n}", type_="page", path="/x"), RULES, NOW_MS)
    later = NOW_MS + 60_000
    apply_event(fresh, event("f", type_="page", path="/x", t_ms=later), RULES, later)
    absorb(fresh, caught, event("join2", type_="identify", t_ms=later), RULES, later)
    assert fresh.rate is not None
    assert (fresh.rate.count, fresh.rate.flooded) == (1, True)  # its minute; caught stays caught


def test_a_flood_marks_a_person_sales_disqualified_a_bot_without_a_transition() -> None:
    """As a merge with the flooding cookie would: whichever comes first, the same person."""
    p = known_buyer()
    apply_feedback(p, event("dq", "disqualify", trusted=True, actor="sdr", reason="timing"),
                   RULES, NOW_MS)  # fmt: skip
    assert (p.stage, p.disqualified) == ("disqualified", "")
    views = [event(f"f{n}", type_="page", path="/x") for n in range(125)]
    out = [o for v in views for o in apply_event(p, v, RULES, NOW_MS)[0]]
    assert p.disqualified == "rate_limited"
    assert [o for o in out if o.kind == LIFECYCLE] == []
    assert sum(o.kind == DLQ for o in out) == 125 + 1 - 120  # the identify counts, not sales


def test_an_absorbed_mql_brings_its_work_and_timers() -> None:
    mql = known_buyer()
    mql.one_id = "p2"
    for n, name in enumerate(("Demo Requested", "Webinar Attended", "Contact Form Submitted")):
        _, promotion = apply_event(mql, event(f"m{n}", name), RULES, NOW_MS)
    assert promotion is not None
    decide(promotion)
    survivor = PersonState("p1", is_new=True)
    apply_event(survivor, event("s1", type_="page", path="/"), RULES, NOW_MS)
    absorb(survivor, mql, event("join", type_="identify"), RULES, NOW_MS)
    assert survivor.stage == "mql" and survivor.owner == "sdr-ana"
    assert survivor.timers == mql.timers and set(survivor.timers) >= {"sla"}
    assert survivor.work is not None and mql.work is not None
    assert survivor.work.decision_id == mql.work.decision_id


def test_duplicate_submission_hours_0_never_calls_a_submission_a_duplicate() -> None:
    limits = structs.replace(RULES.settings.limits, duplicate_submission_hours=0)
    never = Rulebook(structs.replace(RULES.settings, limits=limits))
    p = PersonState("p1", is_new=True)
    for n in range(2):
        apply_event(p, event(f"m{n}", "Whitepaper Downloaded", title="Same"), never, NOW_MS)
    assert current_scores(p, never)[""] == pytest.approx(30.0)  # both scored
    assert p.submissions == []


def test_a_group_call_gives_the_profile_its_company_and_a_screen_scores_like_a_page() -> None:
    from engine.profile import lead_summary

    p = PersonState("p1", is_new=True)
    group = event(
        "g",
        type_="group",
        traits={
            "name": "Acme",
            "employees": "250",
            "industry": "Software",
            "website": "https://www.acme.example/about",
        },
    )
    apply_event(p, group, RULES, NOW_MS)
    assert (p.profile.company_name, p.profile.company_size, p.profile.industry) == (
        True,
        250,
        "software",
    )
    assert p.profile.title_level == ""  # the company's "name" is not the person's
    assert lead_summary(p.profile)["company_domain"] == "acme.example"
    fit_before = RULES.fit.score(PersonState("x").profile)[0]
    assert RULES.fit.score(p.profile)[0] > fit_before

    screen = replace(event("s1", "Pricing", type_="screen"), path="/pricing")
    page = replace(event("p1", type_="page"), path="/pricing")
    assert (
        [r.name for r in RULES.scoring.matching_rules(screen)]
        == [r.name for r in RULES.scoring.matching_rules(page)]
        != []
    )


@settings(max_examples=2000, deadline=None)
@given(st.integers(min_value=-62_135_596_800_000, max_value=253_402_300_799_999))
def test_iso_writes_what_datetime_writes(ms: int) -> None:
    """iso's arithmetic agrees with datetime's isoformat, from year 1 to 9999."""
    moment = datetime(1970, 1, 1, tzinfo=UTC) + timedelta(milliseconds=ms)
    assert iso(ms) == moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")
