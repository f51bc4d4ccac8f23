"""Behaviour score: points per event, caps, dimensions, continuous decay from event time.

A person's score is kept per dimension ("" is the total; others are product
lines or interests) and per rule, as *contributions referenced to one instant*
(``ref_ms``): an award of ``p`` points at time ``t`` contributes
``p * 2^((t - ref_ms) / half_life)`` at ``ref_ms``. Decay being a pure
exponential, the result is the same whatever order events arrive in (late and
out-of-order events included) up to floating-point rounding, and the score at
any time is one multiplication away. The reference only moves (a *rebase*, one
multiplication per contribution) once the latest event is more than the
shortest half-life past it, so no stored value ever grows beyond twice its
current worth and most events touch only the rules they score.

Caps ("page views count at most 10 times a day") keep, per rule and period, the
times of the awards made: the *earliest* ``cap`` events of a period by event
time count, and a late event earlier than the latest award displaces it, so
caps too are independent of arrival order. Periods more than
:data:`CAP_MEMORY_PERIODS` before ``ref_ms`` are forgotten; a capped event that
late scores nothing.
"""

from __future__ import annotations

import bisect
import fnmatch
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from engine.events import Event
from engine.settings import ScoringRule, ScoringSettings

DAY_MS = 86_400_000
TOTAL = ""  # the dimension every rule feeds
# Cap periods remembered behind the latest event (a week of daily caps).
CAP_MEMORY_PERIODS = 7
# Distinct URL paths whose matching page rules are remembered.
PAGE_CACHE_SIZE = 10_000
_MISSING = object()


@dataclass(frozen=True, slots=True)
class Contribution:
    """What one rule adds to a score at a given time, and when it last earned points."""

    rule: str
    points: float
    last_ms: int


@dataclass(slots=True)
class BehaviorScore:
    """A person's behaviour scores, as stored.

    Attributes:
        ref_ms: the instant every contribution is referenced to.
        last_ms: the latest event time seen ("now" for this person).
        contributions: dimension -> rule -> [points at ref_ms, last award time].
        caps: rule -> period index (as str) -> sorted award times in that period.
    """

    ref_ms: int = 0
    last_ms: int = 0
    contributions: dict[str, dict[str, list[Any]]] = field(default_factory=dict)
    caps: dict[str, dict[str, list[int]]] = field(default_factory=dict)


class ScoringModel:
    """The configured rules, indexed for matching, with decay constants per dimension."""

    def __init__(self, settings: ScoringSettings):
        self.settings = settings
        self.half_life_ms = {TOTAL: settings.half_life_days * DAY_MS}
        # Rebase once the newest event is one shortest half-life past the reference.
        self.threshold = {TOTAL: settings.mql_threshold}
        for name, d in settings.dimensions.items():
            self.half_life_ms[name] = d.half_life_days * DAY_MS
            self.threshold[name] = d.mql_threshold
        self.rebase_after_ms = min(self.half_life_ms.values())
        self.rules = {rule.name: rule for rule in settings.rules}
        self._page_cache: dict[str, list[ScoringRule]] = {}
        self._track: dict[str, list[ScoringRule]] = {}
        self._page: list[tuple[re.Pattern[str], ScoringRule]] = []
        for rule in settings.rules:
            if rule.type == "track":
                self._track.setdefault(rule.event, []).append(rule)
            else:
                self._page.append((re.compile(fnmatch.translate(rule.path or "*")), rule))

    def matching_rules(self, event: Event) -> list[ScoringRule]:
        """The rules that award points for ``event``."""
        if event.type == "track":
            candidates = self._track.get(event.name, [])
        elif event.type in ("page", "screen"):
            candidates = self._page_rules(event.path)
        else:
            return []
        return [
            r for r in candidates if all(_lookup(event.payload, p) in vs for p, vs in r.conditions)
        ]

    def _page_rules(self, path: str) -> list[ScoringRule]:
        rules = self._page_cache.get(path)
        if rules is None:
            if len(self._page_cache) >= PAGE_CACHE_SIZE:
                self._page_cache.clear()  # a flood of unique paths resets it; sites have few
            rules = [rule for pattern, rule in self._page if pattern.match(path)]
            self._page_cache[path] = rules
        return rules


def _lookup(payload: Mapping[str, Any], dotted: str) -> object:
    value: Any = payload
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            return _MISSING
        value = value[part]
    return value


def decay(points: float, elapsed_ms: float, half_life_ms: float) -> float:
    """``points`` after ``elapsed_ms`` of exponential decay with ``half_life_ms``."""
    return float(points * 2.0 ** (-elapsed_ms / half_life_ms))


def observe(score: BehaviorScore, at_ms: int, model: ScoringModel) -> None:
    """Record that the person acted at ``at_ms``; rebase when the reference fell far behind."""
    score.last_ms = max(score.last_ms, at_ms)
    if not score.contributions:
        score.ref_ms = score.last_ms
    elif score.last_ms - score.ref_ms > model.rebase_after_ms:
        rebase(score, score.last_ms, model)


def rebase(score: BehaviorScore, at_ms: int, model: ScoringModel) -> None:
    """Move the reference instant to ``at_ms``: the scores do not change, their form does."""
    for dim, rules in score.contributions.items():
        factor = decay(1.0, at_ms - score.ref_ms, model.half_life_ms[dim])
        for entry in rules.values():
            entry[0] *= factor
    score.ref_ms = at_ms


def _add(
    score: BehaviorScore, rule: ScoringRule, points: float, at_ms: int, model: ScoringModel
) -> None:
    for dim in (TOTAL, *rule.dimensions):
        rules = score.contributions.setdefault(dim, {})
        entry = rules.setdefault(rule.name, [0.0, at_ms])
        entry[0] += decay(points, score.ref_ms - at_ms, model.half_life_ms[dim])
        entry[1] = max(entry[1], at_ms)


def award(score: BehaviorScore, rule: ScoringRule, at_ms: int, model: ScoringModel) -> bool:
    """Award ``rule``'s points for an event at ``at_ms``; return False when a cap refuses it."""
    observe(score, at_ms, model)
    if rule.cap:
        period_ms = rule.cap_period_days * DAY_MS
        period = int(at_ms // period_ms) if period_ms else 0
        if period_ms and score.last_ms - at_ms > CAP_MEMORY_PERIODS * period_ms:
            return False
        periods = score.caps.setdefault(rule.name, {})
        times = periods.setdefault(str(period), [])
        if len(times) >= rule.cap:
            if at_ms >= times[-1]:
                return False
            _add(score, rule, -rule.points, times.pop(), model)  # the latest award gives way
        bisect.insort(times, at_ms)
        if period_ms:
            oldest = int((score.last_ms - CAP_MEMORY_PERIODS * period_ms) // period_ms)
            for key in [k for k in periods if int(k) < oldest]:
                del periods[key]
    _add(score, rule, rule.points, at_ms, model)
    return True


def merge_scores(into: BehaviorScore, other: BehaviorScore, model: ScoringModel) -> None:
    """Fold ``other`` into ``into`` (mutated), exactly.

    The result is the score one person would have had from both people's
    events, caps included: the earliest awards of each period win.
    """
    into.last_ms = max(into.last_ms, other.last_ms)
    if not other.contributions:
        return
    if not into.contributions:
        into.ref_ms = other.ref_ms
    rebase(other, into.ref_ms, model)
    for dim, rules in other.contributions.items():
        mine = into.contributions.setdefault(dim, {})
        for name, (value, last) in rules.items():
            entry = mine.setdefault(name, [0.0, last])
            entry[0] += value
            entry[1] = max(entry[1], last)
    for name, periods in other.caps.items():
        rule = model.rules.get(name)
        mine_periods = into.caps.setdefault(name, {})
        for period, times in periods.items():
            merged = sorted(mine_periods.get(period, []) + times)
            if rule is not None and len(merged) > rule.cap:
                for t in merged[rule.cap :]:  # awards beyond the union's cap give their points back
                    _add(into, rule, -rule.points, t, model)
                merged = merged[: rule.cap]
            mine_periods[period] = merged
    observe(into, into.last_ms, model)


def score_at(
    score: BehaviorScore, at_ms: int, model: ScoringModel, dimension: str = TOTAL
) -> float:
    """A dimension's score at ``at_ms`` (decayed from ``ref_ms``)."""
    rules = score.contributions.get(dimension, {})
    total = sum(entry[0] for entry in rules.values())
    return decay(total, at_ms - score.ref_ms, model.half_life_ms[dimension])


def inactivity_penalty(last_event_ms: int, at_ms: int, settings: ScoringSettings) -> float:
    """Points lost to inactivity: ``inactivity_points`` per whole idle period, in closed form."""
    if not settings.inactivity_points or at_ms <= last_event_ms:
        return 0.0
    periods = (at_ms - last_event_ms) // (settings.inactivity_period_days * DAY_MS)
    return float(periods * settings.inactivity_points)


def effective_score(
    score: BehaviorScore, at_ms: int, model: ScoringModel, dimension: str = TOTAL
) -> float:
    """The score at ``at_ms`` after decay and the inactivity penalty (never below 0 from it)."""
    raw = score_at(score, at_ms, model, dimension)
    penalty = inactivity_penalty(score.last_ms, at_ms, model.settings)
    return raw - min(penalty, max(raw, 0.0))


def top_contributions(
    score: BehaviorScore, at_ms: int, model: ScoringModel, n: int, dimension: str = TOTAL
) -> list[Contribution]:
    """The ``n`` largest contributions to a dimension at ``at_ms``, largest first: its reasons."""
    rules = score.contributions.get(dimension, {})
    ranked = sorted(rules.items(), key=lambda kv: (-kv[1][0], kv[0]))[:n]
    half_life = model.half_life_ms[dimension]
    return [
        Contribution(rule, round(decay(v, at_ms - score.ref_ms, half_life), 3), last)
        for rule, (v, last) in ranked
    ]


def scores_at_many(
    totals_at_ref: npt.ArrayLike, ref_ms: npt.ArrayLike, at_ms: int, half_life_ms: float
) -> npt.NDArray[np.float64]:
    """Decay many people's scores to one instant at once (timers, re-scoring, inspection)."""
    totals = np.asarray(totals_at_ref, dtype=np.float64)
    refs = np.asarray(ref_ms, dtype=np.float64)
    return totals * np.exp2(-(at_ms - refs) / half_life_ms)


def falls_below_ms(
    score: BehaviorScore,
    threshold: float,
    after_ms: int,
    model: ScoringModel,
    dimension: str = TOTAL,
) -> int | None:
    """When a dimension's effective score first falls below ``threshold`` (None: never).

    The answer is the first millisecond at or after ``after_ms``.
    Without new events the effective score only falls (decay, then inactivity
    penalties), so the moment is found exactly: decay alone crosses at a closed-form
    time, and bisection finds where the penalties bring it forward.
    """
    if effective_score(score, after_ms, model, dimension) < threshold:
        return after_ms
    if threshold <= 0:
        return None  # decay and penalties stop at 0
    rules = score.contributions.get(dimension, {})
    total = sum(entry[0] for entry in rules.values())
    half_life = model.half_life_ms[dimension]
    lo = after_ms  # still at or above the threshold
    hi = max(after_ms + 1, score.ref_ms + math.ceil(half_life * math.log2(total / threshold)) + 1)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if effective_score(score, mid, model, dimension) < threshold:
            hi = mid
        else:
            lo = mid
    return hi


def scale_scores(score: BehaviorScore, factor: float) -> None:
    """Multiply every contribution by ``factor`` (a recycled lead starts lower)."""
    for rules in score.contributions.values():
        for entry in rules.values():
            entry[0] *= factor
