from __future__ import annotations

import random
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from msgspec.structs import replace

from engine import lifecycle
from engine.events import Event
from engine.identity import (
    Identifier,
    anchor,
    digest,
    identifiers_of,
    merge_refusal,
    normalise_email,
    normalise_phone,
    resolve,
)
from engine.person import PersonState, Rulebook, absorb, apply_event, current_scores
from engine.person_records import Absorbed
from engine.settings import DeclaredKind, IdentitySettings, load_settings

IDENTITY = IdentitySettings(salt="test-salt", default_calling_code="55")


def event(**fields: Any) -> Event:
    payload = fields.pop("payload", {})
    return Event(
        type="identify", message_id="m", event_ms=0, ingested_ms=0, payload=payload, **fields
    )


@pytest.mark.parametrize(
    ("raw", "normal"),
    [
        ("  Ana.Souza@ACME.example ", "ana.souza@acme.example"),
        ("ana+newsletter@acme.example", "ana@acme.example"),
        ("A.N.A.Souza+promo@Gmail.com", "anasouza@gmail.com"),
        ("ana.souza@googlemail.com", "anasouza@googlemail.com"),
    ],
)
def test_emails_are_trimmed_lower_cased_and_folded(raw: str, normal: str) -> None:
    assert normalise_email(raw, IDENTITY) == normal


@pytest.mark.parametrize(
    ("raw", "e164"),
    [
        ("+86 138 1234 5678", "+8613812345678"),
        ("0086-138-1234-5678", "+8613812345678"),
        ("(11) 91234-5678", "+5511912345678"),  # national: default calling code 55
        ("011 91234 5678", "+5511912345678"),  # trunk 0 dropped
        ("12-34", ""),  # too short to be a number
    ],
)
def test_phones_are_normalised_to_e164(raw: str, e164: str) -> None:
    assert normalise_phone(raw, IDENTITY.default_calling_code) == e164


def test_identifiers_are_ordered_by_priority_and_deduplicated() -> None:
    ids = identifiers_of(
        event(
            anonymous_id="c1",
            email="Ana@ACME.example",
            user_id="u1",
            previous_id="c1",
            payload={"traits": {"phone": "+55 11 91234 5678"}},
        ),
        IDENTITY,
    )
    assert [i.kind for i in ids] == ["user", "email", "phone", "anon"]
    assert ids[1].digest == digest("test-salt", "email:ana@acme.example")
    assert ids[2].digest == digest("test-salt", "phone:+5511912345678")


def test_kinds_declared_in_config_are_read_from_their_paths() -> None:
    crm = DeclaredKind(2, 1, ("traits.crm_id", "context.externalIds.crm"))
    identity = replace(IDENTITY, declared_kinds={"crm_id": crm})
    ids = identifiers_of(event(anonymous_id="c1", payload={"traits": {"crm_id": 4711}}), identity)
    assert [i.kind for i in ids] == ["crm_id", "anon"]


def test_digests_are_salted() -> None:
    assert digest("a", "email:x@y.example") != digest("b", "email:x@y.example")


def test_an_event_goes_to_its_strongest_owned_identifier_or_a_new_person() -> None:
    ids = (Identifier("email", "e1"), Identifier("anon", "c1"))
    assert anchor(ids, [None, "P"]) == "P"
    assert anchor(ids, ["Q", "P"]) == "Q"
    assert anchor(ids, [None, None]) == "e1"


def test_new_identifiers_attach_within_limits_and_other_owners_merge() -> None:
    held = {"P": {("email", "e1"), *[("anon", f"c{n}") for n in range(5)]}, "Q": {("anon", "c8")}}
    ids = (
        Identifier("email", "e1"),
        Identifier("email", "e2"),
        Identifier("phone", "p1"),
        Identifier("anon", "c9"),
        Identifier("anon", "c8"),
    )
    res = resolve(ids, ["P", None, None, None, "Q"], held, IDENTITY)
    assert res.one_id == "P"
    assert res.claims == (Identifier("phone", "p1"),)  # a first phone fits
    assert res.over_limit == (Identifier("email", "e2"), Identifier("anon", "c9"))
    assert res.merges == () and res.refusals == (("Q", "identifier_limit"),)  # a 6th cookie


def test_a_cookie_meeting_its_e_mail_merges_into_the_e_mail_owner() -> None:
    held = {"P": {("email", "e1")}, "Q": {("anon", "c1"), ("anon", "c2")}}
    ids = (Identifier("email", "e1"), Identifier("anon", "c1"))
    res = resolve(ids, ["P", "Q"], held, IDENTITY)
    assert (res.one_id, res.merges, res.claims, res.refusals) == ("P", ("Q",), (), ())


def test_a_second_login_on_a_shared_computer_is_a_new_person_whose_tie_is_refused() -> None:
    held = {"P": {("user", "u1"), ("anon", "c1")}}
    ids = (Identifier("user", "u2"), Identifier("anon", "c1"))
    res = resolve(ids, [None, "P"], held, IDENTITY)
    assert res.one_id == "u2" and res.claims == (Identifier("user", "u2"),)
    assert res.refusals == (("P", "conflicting_user_id"),) and res.merges == ()


def test_unknown_identifiers_make_a_new_person_named_after_the_strongest() -> None:
    ids = (Identifier("user", "u1"), Identifier("anon", "c1"))
    res = resolve(ids, [None, None], {}, IDENTITY)
    assert res.one_id == "u1" and res.claims == ids


@pytest.mark.parametrize(
    ("a", "b", "reason"),
    [
        ([("anon", "c1")], [("email", "e1"), ("anon", "c2")], ""),  # a cookie meets its e-mail
        ([("user", "u1")], [("user", "u2")], "conflicting_user_id"),
        ([("email", "e1")], [("email", "e2")], "identifier_limit"),  # two colleagues, one computer
        (
            [("anon", f"c{n}") for n in range(3)],
            [("anon", f"d{n}") for n in range(3)],
            "identifier_limit",
        ),
    ],
)
def test_merges_that_would_break_a_rule_are_refused(
    a: list[tuple[str, str]], b: list[tuple[str, str]], reason: str
) -> None:
    assert merge_refusal(a, b, IDENTITY) == reason


@pytest.mark.parametrize(
    ("a", "b", "merged"),
    [
        ("lead", "mql", "mql"),
        ("sql", "mql", "sql"),
        ("recycled", "lead", "recycled"),
        ("lead", "disqualified", "disqualified"),
        ("mql", "disqualified", "mql"),  # sales already works it
        ("disqualified", "disqualified", "disqualified"),
    ],
)
def test_a_merged_person_takes_the_further_stage(a: str, b: str, merged: str) -> None:
    assert lifecycle.further_stage(a, b) == merged


RULES = Rulebook(load_settings(env={}))
T0 = 1_793_000_000_000
NAMES = [
    "Demo Requested",
    "Webinar Attended",
    "Whitepaper Downloaded",
    "Contact Form Submitted",
    "Trade Show Visited",
]


def track(n: int, name: str, t: int, campaign: str = "") -> Event:
    context = {"campaign": {"name": campaign, "source": "ads", "medium": "cpc"}} if campaign else {}
    return Event(
        type="track",
        message_id=f"m{n}",
        event_ms=T0 + t,
        ingested_ms=T0 + t,
        name=name,
        anonymous_id="a",
        payload={"properties": {"n": n}, "context": context},
    )


@settings(max_examples=150, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from(NAMES), st.integers(0, 6 * 86_400_000), st.booleans()),
        min_size=2,
        max_size=16,
    ),
    st.randoms(use_true_random=False),
)
def test_a_merge_gives_the_score_one_person_would_have_had(
    events: list[tuple[str, int, bool]], rnd: random.Random
) -> None:
    """Events split between two ids, then merged, score as if they had arrived under one.

    Within six days: capped events later than the caps' memory (7 periods) score
    nothing by design, which would make the halves differ from the whole for that
    reason alone.
    """
    evs = [track(n, name, t, "spring" if n == 0 else "") for n, (name, t, _) in enumerate(events)]
    whole = PersonState("w", is_new=True)
    for e in rnd.sample(evs, len(evs)):
        apply_event(whole, e, RULES, T0)
    left, right = PersonState("l", is_new=True), PersonState("r", is_new=True)
    for e, (_, _, goes_left) in zip(evs, events, strict=True):
        apply_event(left if goes_left else right, e, RULES, T0)
    absorb(left, right, evs[0], RULES, T0)
    assert current_scores(left, RULES) == pytest.approx(
        current_scores(whole, RULES), rel=1e-9, abs=1e-9
    )
    assert left.score.caps == whole.score.caps
    assert left.first_touch == whole.first_touch
    assert Absorbed("r", T0) in left.merged_from
