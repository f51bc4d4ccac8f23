"""Routing: which queue a new MQL goes to, and who of that queue may take it now.

Queue: the ordered rules of ``routing.toml`` (:func:`choose_queue`); the first
whose every condition holds wins, else the default queue.

SDR: :func:`assign_lead` is the rule. Production applies it atomically in Redis
(:meth:`engine.store.RedisStore.assign`, its Lua twin, tested to choose the same
SDRs) so that it is fair across every worker and process: among the SDRs of the
queue who are available now (:func:`is_available`: working days and hours in
their own time zone, not out of office) and under their daily and weekly caps,
the one with the fewest leads relative to their weight gets the lead, ties going
to roster order. So N equal SDRs get leads in turn, weights 2:1:1 get 2:1:1, an
SDR joining mid-month starts level with the others instead of receiving
everything, and an SDR away is levelled up on return rather than flooded. A
company that already has an owner in the queue goes to that owner while they
are available.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
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


@dataclass(slots=True)
class QueueBooks:
    """A queue's assignment books: what :func:`assign_lead` reads and writes.

    Redis keeps them under the queue's keys (engine.store), with expiries this
    in-memory form does not have: a decision's assignment and a company's owner
    are kept for days, cap counters for a few days past their period.
    """

    leads: dict[str, int] = field(default_factory=dict)  # SDR -> leads assigned
    assigned: dict[str, str] = field(default_factory=dict)  # decision id -> SDR
    company_owners: dict[str, str] = field(default_factory=dict)  # company -> SDR
    day_leads: dict[tuple[str, str], int] = field(default_factory=dict)  # (SDR, day)
    week_leads: dict[tuple[str, str], int] = field(default_factory=dict)  # (SDR, ISO week)


def assign_lead(books: QueueBooks, request: Assignment) -> str | None:
    """The SDR who gets a decision's lead, or None when nobody can take it now (it waits).

    Once per decision: asked again, it answers the SDR it chose. The company's
    owner gets it while available and under their caps; otherwise the available
    SDR under their caps with the fewest leads relative to their weight, ties to
    roster order. An SDR seen for the first time starts level with the lowest of
    the others, and SDRs away are levelled up to the winner, so neither a newcomer
    nor a returning SDR is flooded.
    """
    done = books.assigned.get(request.decision_id)
    if done:
        return done
    owner = books.company_owners.get(request.company) if request.company else None
    level = min(
        (books.leads[c.sdr] / c.weight for c in request.candidates if c.sdr in books.leads),
        default=0.0,
    )
    for c in request.candidates:
        if c.sdr not in books.leads:
            books.leads[c.sdr] = math.floor(level * c.weight)
    best: Candidate | None = None
    best_value = 0.0
    for c in request.candidates:
        if not c.available or _capped(books, c):
            continue
        value = -1.0 if c.sdr == owner else books.leads[c.sdr] / c.weight
        if best is None or value < best_value:
            best, best_value = c, value
    if best is None:
        return None
    books.leads[best.sdr] += 1
    if best_value >= 0:  # not the company's owner: level up who is away
        for c in request.candidates:
            if not c.available and books.leads[c.sdr] / c.weight < best_value:
                books.leads[c.sdr] = math.ceil(best_value * c.weight)
    day, week = (best.sdr, best.day), (best.sdr, best.week)
    books.day_leads[day] = books.day_leads.get(day, 0) + 1
    books.week_leads[week] = books.week_leads.get(week, 0) + 1
    books.assigned[request.decision_id] = best.sdr
    if request.company and not any(c.sdr == owner for c in request.candidates):
        books.company_owners[request.company] = best.sdr  # the first, or the last left the queue
    return best.sdr


def release_lead(books: QueueBooks, request: Assignment, sdr: str) -> bool:
    """Give back a lead :func:`assign_lead` gave ``sdr`` for a decision never emitted.

    Only while the decision is still assigned to that SDR, so twice is once.
    """
    if books.assigned.get(request.decision_id) != sdr:
        return False
    books.leads[sdr] = books.leads.get(sdr, 0) - 1
    day, week = capped_periods(request, sdr)
    for counter, period in ((books.day_leads, day), (books.week_leads, week)):
        if counter.get((sdr, period), 0) > 0:
            counter[(sdr, period)] -= 1
    del books.assigned[request.decision_id]
    return True


def capped_periods(request: Assignment, sdr: str) -> tuple[str, str]:
    """The day and week whose cap counters the assignment of ``request`` to ``sdr`` raised.

    ``("", "")``, no counter, when ``sdr`` is not among the request's candidates:
    the decision was assigned by an earlier attempt that was never saved (a crash,
    a lost race whose release failed), since when the SDR left the queue. Its lead
    is given back; the counters of a period unknown here expire on their own.
    """
    c = next((c for c in request.candidates if c.sdr == sdr), None)
    return (c.day, c.week) if c else ("", "")


def _capped(books: QueueBooks, c: Candidate) -> bool:
    day = books.day_leads.get((c.sdr, c.day), 0)
    week = books.week_leads.get((c.sdr, c.week), 0)
    return bool((c.daily_cap and day >= c.daily_cap) or (c.weekly_cap and week >= c.weekly_cap))
