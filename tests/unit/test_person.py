from __future__ import annotations

from dataclasses import replace

import pytest

from engine.events import Event
from engine.person import (
    DECISION,
    LIFECYCLE,
    PersonState,
    apply_event,
    complete_promotion,
    decode_state,
    encode_state,
)
from engine.scoring import ScoringModel
from engine.settings import Settings, load_settings

NOW_MS = 1_793_000_000_000


@pytest.fixture(scope="module")
def settings() -> Settings:
    return load_settings()


@pytest.fixture(scope="module")
def model(settings: Settings) -> ScoringModel:
    return ScoringModel(settings.scoring)


def track(message_id: str, name: str, t_ms: int = NOW_MS, email: str = "") -> Event:
    return Event(
        type="track",
        message_id=message_id,
        event_ms=t_ms,
        ingested_ms=t_ms,
        name=name,
        anonymous_id="a",
        email=email,
    )


def test_first_event_creates_a_lead_and_records_the_transition(
    settings: Settings, model: ScoringModel
) -> None:
    p = PersonState("p1", is_new=True)
    outputs, promotion = apply_event(
        p, track("m1", "Whitepaper Downloaded"), model, settings, NOW_MS
    )
    assert promotion is None
    assert [(o.kind, o.value["from"], o.value["to"]) for o in outputs] == [
        (LIFECYCLE, None, "lead")
    ]
    assert p.contributions == {"whitepaper_download": 15.0}


def test_a_seen_message_changes_nothing_and_replays_its_records(
    settings: Settings, model: ScoringModel
) -> None:
    p = PersonState("p1", is_new=True)
    first, _ = apply_event(p, track("m1", "Demo Requested"), model, settings, NOW_MS)
    before = encode_state(p)
    again, promotion = apply_event(p, track("m1", "Demo Requested"), model, settings, NOW_MS + 5)
    assert promotion is None
    assert encode_state(p) == before
    assert [o.value for o in again] == [o.value for o in first]


def test_promotion_builds_one_decision_with_stable_ids(
    settings: Settings, model: ScoringModel
) -> None:
    p = PersonState("p1", is_new=True)
    apply_event(p, track("m1", "Demo Requested", email="x@acme.example"), model, settings, NOW_MS)
    _, promotion = apply_event(p, track("m2", "Demo Requested", NOW_MS), model, settings, NOW_MS)
    assert promotion is not None
    outputs = complete_promotion(promotion, 5, model, settings, NOW_MS)
    kinds = [o.kind for o in outputs]
    assert kinds == [LIFECYCLE, DECISION]
    decision = outputs[1].value
    assert decision["sdr"] == "sdr-bruno"  # ticket 5 of 3 SDRs in roster order
    assert decision["trigger"]["message_id"] == "m2"
    assert decision["channels"] == ["email"]
    assert p.stage == "mql" and p.owner == "sdr-bruno"

    # the same person, rebuilt from scratch and fed the same events, gets the same ids
    q = PersonState("p1", is_new=True)
    apply_event(q, track("m1", "Demo Requested", email="x@acme.example"), model, settings, NOW_MS)
    _, again = apply_event(q, track("m2", "Demo Requested", NOW_MS), model, settings, NOW_MS + 999)
    assert again is not None and again.decision_id == promotion.decision_id

    # an MQL earns more points without a second promotion
    _, none = apply_event(p, track("m3", "Demo Requested", NOW_MS + 2), model, settings, NOW_MS)
    assert none is None


def test_state_round_trips_through_its_encoding(settings: Settings, model: ScoringModel) -> None:
    p = PersonState("p1", is_new=True)
    apply_event(p, track("m1", "Demo Requested", email="x@acme.example"), model, settings, NOW_MS)
    _, promotion = apply_event(p, track("m2", "Demo Requested", NOW_MS), model, settings, NOW_MS)
    assert promotion is not None
    complete_promotion(promotion, 1, model, settings, NOW_MS)
    restored = decode_state("p1", encode_state(p))
    assert restored == replace(p, is_new=False)


def test_dedup_window_and_outbox_are_bounded(settings: Settings, model: ScoringModel) -> None:
    small = replace(settings, limits=replace(settings.limits, dedup_window=3, outbox_size=2))
    p = PersonState("p1", is_new=True)
    for n in range(10):
        apply_event(p, track(f"m{n}", "Whitepaper Downloaded", NOW_MS + n), model, small, NOW_MS)
    assert len(p.seen) == 3
    assert len(p.outbox) == 1  # only the first event produced records
