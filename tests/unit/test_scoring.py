from __future__ import annotations

import random
from collections import defaultdict

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from msgspec.structs import replace

from engine.events import Event
from engine.scoring import (
    DAY_MS,
    TOTAL,
    BehaviorScore,
    ScoringModel,
    award,
    decay,
    effective_score,
    inactivity_penalty,
    score_at,
    scores_at_many,
    top_contributions,
)
from engine.settings import Dimension, ScoringRule, ScoringSettings

T0 = 1_700_000_000_000
RULES = (
    ScoringRule("demo", "track", 50, event="Demo Requested", dimensions=("routing",)),
    ScoringRule("pricing", "page", 10, path="/pricing*", cap=3, cap_period_days=1),
    ScoringRule("careers", "page", -5, path="/careers*"),
    ScoringRule(
        "trial",
        "track",
        40,
        event="Trial Started",
        cap=1,
        cap_period_days=0,
        dimensions=("analytics",),
    ),
    ScoringRule(
        "webinar",
        "track",
        25,
        event="Webinar Attended",
        cap=2,
        cap_period_days=7,
        dimensions=("routing",),
    ),
)
SETTINGS = ScoringSettings(
    half_life_days=30,
    mql_threshold=100,
    rules=RULES,
    dimensions={"analytics": Dimension(14, 60), "routing": Dimension(21, 60)},
)
MODEL = ScoringModel(SETTINGS)
BY_NAME = {r.name: r for r in RULES}


def test_half_life_halves_the_points() -> None:
    assert decay(80.0, 30 * DAY_MS, 30 * DAY_MS) == 40.0
    assert decay(80.0, 0, 30 * DAY_MS) == 80.0


def test_awards_feed_the_total_and_their_dimensions_each_with_its_half_life() -> None:
    s = BehaviorScore()
    award(s, BY_NAME["demo"], T0, MODEL)
    award(s, BY_NAME["trial"], T0 + 21 * DAY_MS, MODEL)
    assert s.last_ms == T0 + 21 * DAY_MS
    assert score_at(s, s.last_ms, MODEL, "routing") == pytest.approx(
        25.0
    )  # 50 after one 21-day half-life
    assert score_at(s, s.last_ms, MODEL, "analytics") == pytest.approx(40.0)
    assert score_at(s, s.last_ms, MODEL) == pytest.approx(50 * 2 ** (-21 / 30) + 40)


def test_a_cap_keeps_the_earliest_awards_of_each_period() -> None:
    s = BehaviorScore()
    day = (T0 // DAY_MS + 1) * DAY_MS  # midnight UTC: periods are UTC days
    times = [
        day + h * 3_600_000 for h in (5, 1, 4, 2, 3)
    ]  # five pricing views in one day, shuffled
    results = [award(s, BY_NAME["pricing"], t, MODEL) for t in times]
    assert results == [True, True, True, True, True]  # the 4th and 5th displace later ones
    assert s.caps["pricing"][str(day // DAY_MS)] == sorted(times)[:3]
    assert award(s, BY_NAME["pricing"], day + 6 * 3_600_000, MODEL) is False  # later than all three


def test_award_once_rules_award_once_ever() -> None:
    s = BehaviorScore()
    assert award(s, BY_NAME["trial"], T0, MODEL)
    assert not award(s, BY_NAME["trial"], T0 + 400 * DAY_MS, MODEL)


def test_inactivity_costs_points_per_whole_idle_period_in_closed_form() -> None:
    cfg = ScoringSettings(inactivity_points=10, inactivity_period_days=30)
    assert inactivity_penalty(T0, T0 + 29 * DAY_MS, cfg) == 0
    assert inactivity_penalty(T0, T0 + 30 * DAY_MS, cfg) == 10
    assert inactivity_penalty(T0, T0 + 95 * DAY_MS, cfg) == 30
    model = ScoringModel(replace(SETTINGS, inactivity_points=10, inactivity_period_days=30))
    s = BehaviorScore()
    award(s, BY_NAME["careers"], T0, model)
    raw = score_at(s, T0 + 60 * DAY_MS, model)
    assert effective_score(s, T0 + 60 * DAY_MS, model) == raw < 0  # no penalty below zero
    award(s, BY_NAME["demo"], T0, model)  # 45 points at T0
    assert effective_score(s, T0 + 30 * DAY_MS, model) == pytest.approx(22.5 - 10)
    assert effective_score(s, T0 + 60 * DAY_MS, model) == 0.0  # 11.25 - 20, floored at 0


def test_top_contributions_rank_by_current_points_and_say_when() -> None:
    s = BehaviorScore()
    award(s, BY_NAME["pricing"], T0, MODEL)
    award(s, BY_NAME["demo"], T0 + 1000, MODEL)
    award(s, BY_NAME["careers"], T0 + 2000, MODEL)
    top = top_contributions(s, s.last_ms, MODEL, 2)
    assert [(c.rule, c.last_ms) for c in top] == [("demo", T0 + 1000), ("pricing", T0)]


def test_many_scores_decay_at_once() -> None:
    out = scores_at_many([80.0, 10.0], [T0, T0 + 30 * DAY_MS], T0 + 60 * DAY_MS, 30 * DAY_MS)
    assert out.tolist() == [20.0, 5.0]


# -- properties -----------------------------------------------------------------

awards_strategy = st.lists(
    st.tuples(
        st.sampled_from(sorted(BY_NAME)),
        st.integers(min_value=T0, max_value=T0 + 5 * DAY_MS),  # within the caps' memory
    ),
    min_size=1,
    max_size=40,
    unique=True,
)


def oracle(awards: list[tuple[str, int]], at_ms: int) -> dict[str, float]:
    """Batch recomputation: per rule and period keep the earliest `cap`; decay with numpy."""
    kept: list[tuple[str, int]] = []
    by_period: dict[tuple[str, int], list[int]] = defaultdict(list)
    for name, t in awards:
        rule = BY_NAME[name]
        if not rule.cap:
            kept.append((name, t))
            continue
        period_ms = rule.cap_period_days * DAY_MS
        by_period[(name, int(t // period_ms) if period_ms else 0)].append(t)
    for (name, _), times in by_period.items():
        kept += [(name, t) for t in sorted(times)[: BY_NAME[name].cap]]
    result = {}
    for dim, half_life in MODEL.half_life_ms.items():
        chosen = [
            (BY_NAME[n].points, t) for n, t in kept if dim == TOTAL or dim in BY_NAME[n].dimensions
        ]
        if not chosen:
            result[dim] = 0.0
            continue
        points, times = np.array(chosen, dtype=np.float64).T
        result[dim] = float(np.sum(points * np.exp2(-(at_ms - times) / half_life)))
    return result


@settings(max_examples=300, deadline=None)
@given(awards_strategy, st.randoms(use_true_random=False))
def test_scores_are_independent_of_arrival_order_and_match_batch_recomputation(
    awards: list[tuple[str, int]], rnd: random.Random
) -> None:
    orders = [awards, list(reversed(awards)), rnd.sample(awards, len(awards))]
    latest = max(t for _, t in awards)
    expected = oracle(awards, latest)
    scale = sum(abs(BY_NAME[n].points) for n, _ in awards)
    for order in orders:
        s = BehaviorScore()
        for name, t in order:
            award(s, BY_NAME[name], t, MODEL)
        assert s.last_ms == latest
        for dim, value in expected.items():
            assert abs(score_at(s, latest, MODEL, dim) - value) <= 1e-9 * scale, dim


@settings(max_examples=200, deadline=None)
@given(awards_strategy)
def test_caps_are_never_exceeded(awards: list[tuple[str, int]]) -> None:
    s = BehaviorScore()
    for name, t in awards:
        award(s, BY_NAME[name], t, MODEL)
    for name, periods in s.caps.items():
        assert all(len(times) <= BY_NAME[name].cap for times in periods.values())


def _event(type_: str, name: str = "", path: str = "", **payload: object) -> Event:
    return Event(
        type=type_,
        message_id="m",
        event_ms=0,
        ingested_ms=0,
        name=name,
        path=path,
        anonymous_id="a",
        payload=payload,
    )


def test_rules_match_names_exactly_paths_by_glob_and_where_conditions() -> None:
    model = ScoringModel(
        ScoringSettings(
            rules=(
                ScoringRule("page_view", "page", 1, path="*"),
                ScoringRule("pricing", "page", 10, path="/pricing*"),
                ScoringRule("demo", "track", 50, event="Demo Requested"),
                ScoringRule(
                    "enterprise",
                    "track",
                    20,
                    event="Demo Requested",
                    where={"properties.plan": ["enterprise", "Enterprise"]},
                ),
            )
        )
    )

    def names(e: Event) -> list[str]:
        return [r.name for r in model.matching_rules(e)]

    assert names(_event("page", path="/pricing/team")) == ["page_view", "pricing"]
    assert names(_event("page", path="/blog")) == ["page_view"]
    assert names(_event("track", name="Demo Requested")) == ["demo"]
    assert names(_event("track", name="Demo Requested", properties={"plan": "Enterprise"})) == [
        "demo",
        "enterprise",
    ]
    assert names(_event("track", name="Demo Requested", properties={"plan": "team"})) == ["demo"]
    assert names(_event("track", name="demo requested")) == []
    assert names(_event("identify")) == []
