"""The funnel report's figures, against a hand computation on a small history."""

from __future__ import annotations

from typing import Any

from engine.funnel import funnel, grades, journeys, sdr_performance


def rec(one_id: str, to: str, day: float, cause: str = "", **extra: Any) -> dict[str, Any]:
    at = f"2026-11-{1 + int(day):02d}T{int(day % 1 * 24):02d}:00:00.000Z"
    return {
        "record_id": f"{one_id}-{to}-{day}-{cause}",
        "one_id": one_id,
        "to": to,
        "cause": cause or to,
        "event_time": at,
        "recorded_at": at,
        **extra,
    }


def first(one_id: str, campaign: str, page: str) -> dict[str, Any]:
    attribution = {"campaign": campaign, "source": "google", "medium": "cpc", "landing_page": page}
    return rec(one_id, "lead", 0, "first_event", attribution=attribution)


# a: lead day 0 -> mql day 2 -> sal day 2.5 -> customer day 10 (campaign "spring")
# b: lead day 0 -> mql day 4 (campaign "spring"); c: lead day 1 (campaign "fall")
# d: merged into a (its own lead record first); e: lead with no attribution (old record)
HISTORY = [
    first("a", "spring", "/pricing"),
    rec("a", "mql", 2, "score_threshold"),
    rec("a", "sal", 2.5, "lead_accepted"),
    rec("a", "customer", 10, "won"),
    first("b", "spring", "/"),
    rec("b", "mql", 4, "score_threshold"),
    rec("b", "mql", 4, "score_threshold"),  # a replay's duplicate
    first("c", "fall", "/blog"),
    first("d", "fall", "/blog"),
    rec("a", "customer", 10, "merge", merged_from="d"),
    rec("e", "lead", 3, "first_event"),
]


def test_the_funnel_counts_converts_and_times_stages_as_by_hand() -> None:
    people = journeys(HISTORY)
    assert sorted(people) == ["a", "b", "c", "e"]  # d is counted under a
    report = funnel(people)
    overall = report["overall"]
    assert overall["counts"] == {
        "lead": 4,
        "mql": 2,
        "sal": 1,
        "sql": 0,
        "opportunity": 0,
        "customer": 1,
    }
    assert overall["conversion"]["lead->mql"] == 0.5 and overall["conversion"]["mql->sal"] == 0.5
    assert overall["conversion"]["sql->opportunity"] is None  # nobody to convert
    assert overall["median_days"]["lead->mql"] == 3.0  # a: 2 days, b: 4 days
    assert overall["median_days"]["mql->sal"] == 0.5
    spring = report["by_campaign"]["spring"]["counts"]
    assert (spring["lead"], spring["mql"], spring["customer"]) == (2, 2, 1)
    assert report["by_campaign"]["fall"]["counts"]["lead"] == 1  # c (d merged into a)
    assert report["by_campaign"]["(unknown)"]["counts"]["lead"] == 1  # e
    assert report["by_landing_page"]["/pricing"]["counts"]["customer"] == 1


def test_sdr_performance_follows_each_leads_latest_decision() -> None:
    decisions = [
        {
            "decision_id": "d1",
            "one_id": "a",
            "queue": "inbound",
            "sdr": "ana",
            "decided_at": "2026-11-03T00:00:00.000Z",
        },
        {
            "decision_id": "d1",
            "one_id": "a",
            "queue": "inbound",
            "sdr": "ana",
            "decided_at": "2026-11-03T00:00:00.000Z",
        },  # re-emitted: counted once
        {
            "decision_id": "d2",
            "one_id": "b",
            "queue": "inbound",
            "sdr": "bo",
            "decided_at": "2026-11-05T00:00:00.000Z",
        },
        {
            "decision_id": "d2-r1",
            "one_id": "b",
            "queue": "inbound",
            "sdr": "cy",
            "decided_at": "2026-11-05T06:00:00.000Z",
        },
    ]
    lifecycle = [
        rec("a", "sal", 2 + 0.5, "lead_accepted"),  # 12 hours after d1
        rec("b", "mql", 4.25, "sla_breached", sdr="bo"),
        rec("b", "recycled", 4.5, "lead_rejected", reason="no_budget"),
    ]
    perf = sdr_performance(decisions, lifecycle)["inbound"]
    assert perf["ana"]["decided"] == 1 and perf["ana"]["accepted"] == 1
    assert perf["ana"]["median_minutes_to_accept"] == 720.0
    assert perf["bo"]["sla_breaches"] == 1 and perf["bo"]["rejected"] == {}
    assert perf["cy"]["rejected"] == {"no_budget": 1}


def test_grades_count_each_decision_once_and_the_winners() -> None:
    decisions = [
        {"decision_id": "1", "one_id": "a", "grade": "A1"},
        {"decision_id": "1", "one_id": "a", "grade": "A1"},  # re-emitted: counted once
        {"decision_id": "2", "one_id": "b", "grade": "A1"},
        {"decision_id": "3", "one_id": "c", "grade": "C3"},
        {"decision_id": "4", "one_id": "d"},  # from before grades: not counted
    ]
    assert grades(decisions, won=["a", "c"]) == {
        "A1": {"leads": 2, "won": 1},
        "C3": {"leads": 1, "won": 1},
    }
