"""Routing: which queue a new MQL goes to, and who of that queue may take it now.

Queue: the ordered rules of ``routing.toml`` (:func:`choose_queue`); the first
whose every condition holds wins, else the default queue.

SDR: the choice itself is made atomically in Redis (see
:meth:`engine.store.RedisStore.assign`) so that it is fair across every worker
and process: among the SDRs of the queue who are available now
(:func:`is_available`: working days and hours in their own time zone, not out
of office) and under their daily and weekly caps, the one with the fewest leads
relative to their weight gets the lead, ties going to roster order. So N equal
SDRs get leads in turn, weights 2:1:1 get 2:1:1, an SDR joining mid-month
starts level with the others instead of receiving everything, and an SDR away
is levelled up on return rather than flooded. A company that already has an
owner in the queue goes to that owner while they are available.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, time, timedelta
from zoneinfo import ZoneInfo

from engine.profile import Profile
from engine.settings import RoutingRule, RoutingSettings, Sdr


@dataclass(frozen=True, slots=True)
class Candidate:
    """An SDR as an assignment sees them now."""

    sdr: str
    weight: float
    available: bool
    daily_cap: int
    weekly_cap: int
    day: str  # the SDR's local day and ISO week, the periods caps count in
    week: str


@dataclass(frozen=True, slots=True)
class Assignment:
    """A decision to assign within ``queue`` (``company``: its sticky-owner key, or '')."""

    queue: str
    decision_id: str
    company: str
    candidates: tuple[Candidate, ...]


# How far ahead to look for the next moment somebody is available.
LOOKAHEAD_DAYS = 60


def rule_matches(
    rule: RoutingRule,
    profile: Profile,
    qualified_on: Sequence[str],
    campaigns: Iterable[str],
    regions: dict[str, frozenset[str]] | None = None,
) -> bool:
    """Whether every non-empty condition of ``rule`` holds for this lead."""
    country = profile.country.upper()
    if rule.countries or rule.regions:
        in_region = any(country in (regions or {}).get(r, frozenset()) for r in rule.regions)
        if country not in rule.countries and not in_region:
            return False
    size = profile.company_size
    if rule.min_company_size and size < rule.min_company_size:
        return False
    if rule.max_company_size and not 0 < size <= rule.max_company_size:
        return False
    if rule.industries and profile.industry.lower() not in rule.industries:
        return False
    if rule.dimensions and not rule.dimensions & set(qualified_on):
        return False
    return not (rule.campaigns and not rule.campaigns & set(campaigns))


def choose_queue(
    routing: RoutingSettings,
    profile: Profile,
    qualified_on: Sequence[str] = (),
    campaigns: Iterable[str] = (),
) -> tuple[str, str]:
    """``(queue, rule name)`` for a new MQL: the first matching rule, else the default."""
    touched = [c for c in campaigns if c]
    regions = dict(routing.regions)
    for rule in routing.rules:
        if rule_matches(rule, profile, qualified_on, touched, regions):
            return rule.queue, rule.name
    return routing.default_queue, "default"


def _local(sdr: Sdr, at_ms: int) -> datetime:
    return datetime.fromtimestamp(at_ms / 1000, UTC).astimezone(ZoneInfo(sdr.timezone))


def is_available(sdr: Sdr, at_ms: int) -> bool:
    """Whether the SDR works at ``at_ms``: a working day and hour, not out of office."""
    local = _local(sdr, at_ms)
    day = local.date().isoformat()
    if any(start <= day <= end for start, end in sdr.out_of_office):
        return False
    if local.isoweekday() not in sdr.working_days:
        return False
    start, end = sdr.working_hours
    if not start:
        return True
    now = local.strftime("%H:%M")
    # A shift may run past midnight ("22:00"-"06:00").
    return start <= now < end if start < end else now >= start or now < end


def next_available_ms(sdrs: Sequence[Sdr], after_ms: int) -> int | None:
    """The first moment at or after ``after_ms`` when any of ``sdrs`` is available.

    Only moments where availability can change are tried (each local midnight and
    start of working hours), so the answer is exact to the minute. None when
    nobody is available within :data:`LOOKAHEAD_DAYS`.
    """
    best: int | None = None
    for sdr in sdrs:
        if is_available(sdr, after_ms):
            return after_ms
        zone = ZoneInfo(sdr.timezone)
        first = _local(sdr, after_ms).date()
        for n in range(LOOKAHEAD_DAYS):
            day = first + timedelta(days=n)
            for moment in _openings(sdr):
                at = int(datetime.combine(day, moment, zone).timestamp() * 1000)
                if at > after_ms and is_available(sdr, at):
                    best = at if best is None else min(best, at)
                    break
            else:
                continue
            break
    return best


def _openings(sdr: Sdr) -> list[time]:
    """Local times of day when the SDR's availability can begin."""
    start = sdr.working_hours[0]
    moments = [time(0, 0)]
    if start:
        hh, mm = (int(x) for x in start.split(":"))
        moments.append(time(hh, mm))
    return moments


def capacity_periods(sdr: Sdr, at_ms: int) -> tuple[str, str]:
    """The SDR's local day and ISO week at ``at_ms`` (the periods capacity caps count in)."""
    local = _local(sdr, at_ms)
    year, week, _ = local.isocalendar()
    return local.date().isoformat(), f"{year}-W{week:02d}"


def company_of(profile: Profile) -> str:
    """The company a lead belongs to, for sticky owners: its company e-mail domain, or ''."""
    return profile.email_domain if profile.email_kind == "company" else ""
