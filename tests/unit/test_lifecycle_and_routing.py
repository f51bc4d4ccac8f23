from __future__ import annotations

import math
from datetime import datetime

import pytest

from engine import lifecycle
from engine.profile import Profile
from engine.routing import capacity_periods, choose_queue, is_available, next_available_ms
from engine.scoring import BehaviorScore, ScoringModel, effective_score, falls_below_ms
from engine.settings import QueueSettings, RoutingRule, RoutingSettings, Sdr, load_settings


def test_allowed_transitions_cover_every_stage() -> None:
    assert set(lifecycle.ALLOWED) == set(lifecycle.STAGES)
    lifecycle.check_transition("lead", "mql")
    lifecycle.check_transition("recycled", "mql")
    with pytest.raises(lifecycle.IllegalTransition):
        lifecycle.check_transition("customer", "lead")
    with pytest.raises(lifecycle.IllegalTransition):
        lifecycle.check_transition("lead", "sql")


def _ms(text: str) -> int:
    return int(datetime.fromisoformat(text).timestamp() * 1000)


ROUTING = RoutingSettings(
    default_queue="inbound",
    queues=(QueueSettings("inbound"), QueueSettings("latam"), QueueSettings("analytics")),
    rules=(
        RoutingRule("big-latam", "latam", regions=("latam",), min_company_size=1000),
        RoutingRule("analytics", "analytics", dimensions=frozenset({"analytics"})),
        RoutingRule(
            "webinar-fintech",
            "latam",
            industries=frozenset({"fintech"}),
            campaigns=frozenset({"w1"}),
        ),
    ),
    regions={"latam": frozenset({"BR", "MX"})},
)


@pytest.mark.parametrize(
    ("profile", "on", "campaigns", "expected"),
    [
        (Profile(country="BR", company_size=5000), ("total",), (), ("latam", "big-latam")),
        (Profile(country="BR", company_size=50), ("total",), (), ("inbound", "default")),
        (Profile(country="DE", company_size=5000), ("analytics",), (), ("analytics", "analytics")),
        (Profile(industry="FinTech"), ("total",), ("w1",), ("latam", "webinar-fintech")),
        (Profile(industry="fintech"), ("total",), ("w2",), ("inbound", "default")),
    ],
)
def test_the_first_matching_routing_rule_chooses_the_queue(
    profile: Profile, on: tuple[str, ...], campaigns: tuple[str, ...], expected: tuple[str, str]
) -> None:
    assert choose_queue(ROUTING, profile, on, campaigns) == expected


def test_availability_follows_the_sdrs_own_time_zone_hours_days_and_absences() -> None:
    ana = Sdr(
        "ana",
        "q",
        timezone="America/Sao_Paulo",  # UTC-3
        working_hours=("09:00", "18:00"),
        working_days=(1, 2, 3, 4, 5),
        out_of_office=(("2026-11-26", "2026-11-27"),),
    )
    assert is_available(ana, _ms("2026-11-23T12:00:00+00:00"))  # Monday 09:00 in São Paulo
    assert not is_available(ana, _ms("2026-11-23T11:59:00+00:00"))  # 08:59 there
    assert not is_available(ana, _ms("2026-11-23T21:00:00+00:00"))  # 18:00 there
    assert not is_available(ana, _ms("2026-11-26T15:00:00+00:00"))  # out of office
    assert not is_available(ana, _ms("2026-11-28T15:00:00+00:00"))  # Saturday
    # Friday evening: next available on Monday at 09:00 local, not before.
    after = _ms("2026-11-25T22:00:00+00:00")  # Wednesday 19:00 local; Thu-Fri away
    assert next_available_ms((ana,), after) == _ms("2026-11-30T12:00:00+00:00")
    night = Sdr("n", "q", working_hours=("22:00", "06:00"))
    assert is_available(night, _ms("2026-11-23T23:30:00+00:00"))
    assert not is_available(night, _ms("2026-11-23T12:00:00+00:00"))


def test_capacity_periods_are_the_sdrs_local_day_and_iso_week() -> None:
    tokyo = Sdr("t", "q", timezone="Asia/Tokyo")
    assert capacity_periods(tokyo, _ms("2026-11-22T16:00:00+00:00")) == ("2026-11-23", "2026-W48")


def test_the_demotion_moment_is_exact_to_the_millisecond() -> None:
    settings = load_settings(env={})
    model = ScoringModel(settings.scoring)
    score = BehaviorScore(0, 0, {"": {"demo": [105.0, 0]}}, {})
    due = falls_below_ms(score, 100.0, 0, model)
    assert due is not None
    assert effective_score(score, due, model) < 100.0 <= effective_score(score, due - 1, model)
    assert abs(due - 30 * 86_400_000 * math.log2(1.05)) < 2
    # Decay alone takes 210 points below 100 after 32.1 days; the 10-point inactivity
    # penalty due at day 30 (105 - 10 = 95) brings the moment forward to exactly day 30.
    tall = BehaviorScore(0, 0, {"": {"demo": [210.0, 0]}}, {})
    due = falls_below_ms(tall, 100.0, 0, model)
    assert due == 30 * 86_400_000
    assert falls_below_ms(score, 0.0, 0, model) is None
