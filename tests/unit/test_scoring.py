from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.events import Event
from engine.scoring import DAY_MS, ScoringModel, add_points, decay, score_at, top_contributions
from engine.settings import ScoringRule, ScoringSettings

HALF_LIFE_MS = 30 * DAY_MS
YEAR_MS = 365 * DAY_MS


def test_half_life_halves_the_points() -> None:
    assert decay(80.0, HALF_LIFE_MS, HALF_LIFE_MS) == 40.0
    assert decay(80.0, 0, HALF_LIFE_MS) == 80.0


def test_score_at_a_later_time_decays_the_total() -> None:
    contributions: dict[str, float] = {}
    ref = add_points(contributions, 0, "demo", 50, 1_000, HALF_LIFE_MS)
    ref = add_points(contributions, ref, "pricing", 10, 1_000 + HALF_LIFE_MS, HALF_LIFE_MS)
    assert ref == 1_000 + HALF_LIFE_MS
    assert score_at(contributions, ref, ref, HALF_LIFE_MS) == 35.0  # 50/2 + 10
    assert score_at(contributions, ref, ref + HALF_LIFE_MS, HALF_LIFE_MS) == 17.5


def test_top_contributions_rank_by_current_points() -> None:
    contributions = {"a": 10.0, "b": 40.0, "c": -5.0, "d": 20.0}
    assert [c.rule for c in top_contributions(contributions, 0, 0, HALF_LIFE_MS, 2)] == ["b", "d"]


events_strategy = st.lists(
    st.tuples(
        st.sampled_from(["demo", "pricing", "careers", "webinar"]),
        st.floats(min_value=-50, max_value=100, allow_nan=False).filter(lambda p: abs(p) > 1e-6),
        st.integers(min_value=1_700_000_000_000, max_value=1_700_000_000_000 + 2 * YEAR_MS),
    ),
    min_size=1,
    max_size=40,
)


def batch_score(events: list[tuple[str, float, int]], at_ms: int) -> float:
    """The oracle: every event's points decayed straight to ``at_ms``, summed with numpy."""
    points = np.array([p for _, p, _ in events])
    times = np.array([t for _, _, t in events], dtype=np.float64)
    return float(np.sum(points * np.exp2(-(at_ms - times) / HALF_LIFE_MS)))


def incremental_score(events: list[tuple[str, float, int]]) -> tuple[float, int]:
    contributions: dict[str, float] = {}
    ref = 0
    for rule, points, t in events:
        ref = add_points(contributions, ref, rule, points, t, HALF_LIFE_MS)
    return score_at(contributions, ref, ref, HALF_LIFE_MS), ref


@settings(max_examples=300, deadline=None)
@given(events_strategy, st.randoms(use_true_random=False))
def test_score_is_independent_of_arrival_order_and_matches_batch_recomputation(
    events: list[tuple[str, float, int]], rnd: object
) -> None:
    shuffled = list(events)
    rnd.shuffle(shuffled)  # type: ignore[attr-defined]
    in_order, ref = incremental_score(events)
    out_of_order, ref2 = incremental_score(shuffled)
    expected = batch_score(events, ref)
    scale = max(1.0, sum(abs(p) for _, p, _ in events))  # relative to the magnitude summed
    assert ref == ref2 == max(t for _, _, t in events)
    assert abs(in_order - expected) <= 1e-9 * scale
    assert abs(out_of_order - expected) <= 1e-9 * scale


def _event(type_: str, name: str = "", path: str = "") -> Event:
    return Event(
        type=type_,
        message_id="m",
        event_ms=0,
        ingested_ms=0,
        name=name,
        path=path,
        anonymous_id="a",
    )


def test_rules_match_track_names_exactly_and_page_paths_by_glob() -> None:
    model = ScoringModel(
        ScoringSettings(
            rules=(
                ScoringRule("page_view", "page", 1, path="*"),
                ScoringRule("pricing", "page", 10, path="/pricing*"),
                ScoringRule("demo", "track", 50, event="Demo Requested"),
            )
        )
    )
    assert [r.name for r in model.matching_rules(_event("page", path="/pricing/team"))] == [
        "page_view",
        "pricing",
    ]
    assert [r.name for r in model.matching_rules(_event("page", path="/blog"))] == ["page_view"]
    assert [r.name for r in model.matching_rules(_event("track", name="Demo Requested"))] == [
        "demo"
    ]
    assert model.matching_rules(_event("track", name="demo requested")) == []
    assert model.matching_rules(_event("identify")) == []
