"""Behaviour score: points per event, continuous exponential decay from event time.

The score is kept per rule as *contributions referenced to one instant*
(``ref_ms``, the latest event time seen): an event worth ``p`` points at time
``t`` contributes ``p * 2^(-(ref_ms - t) / half_life)`` at ``ref_ms``. A newer
event first rebases every contribution to its own time. Because decay is a
pure exponential, the result is the same whatever order events arrive in
(late and out-of-order events included), up to floating-point rounding, and
the score at any later time is one multiplication away.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Mapping
from dataclasses import dataclass

from engine.events import Event
from engine.settings import ScoringRule, ScoringSettings

DAY_MS = 86_400_000


@dataclass(frozen=True, slots=True)
class Contribution:
    """What one rule adds to a person's score at a given time."""

    rule: str
    points: float


class ScoringModel:
    """The configured rules, indexed for matching an event in O(matching rules)."""

    def __init__(self, settings: ScoringSettings):
        self.settings = settings
        self.half_life_ms = settings.half_life_days * DAY_MS
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
            return self._track.get(event.name, [])
        if event.type == "page":
            return [rule for pattern, rule in self._page if pattern.match(event.path)]
        return []


def decay(points: float, elapsed_ms: float, half_life_ms: float) -> float:
    """``points`` after ``elapsed_ms`` of exponential decay with ``half_life_ms``."""
    return float(points * 2.0 ** (-elapsed_ms / half_life_ms))


def add_points(
    contributions: dict[str, float],
    ref_ms: int,
    rule: str,
    points: float,
    at_ms: int,
    half_life_ms: float,
) -> int:
    """Add ``points`` earned at ``at_ms`` to ``contributions`` (mutated); return new ``ref_ms``."""
    if at_ms > ref_ms:
        if contributions:
            factor = decay(1.0, at_ms - ref_ms, half_life_ms)
            for name in contributions:
                contributions[name] *= factor
        ref_ms = at_ms
    contributions[rule] = contributions.get(rule, 0.0) + decay(points, ref_ms - at_ms, half_life_ms)
    return ref_ms


def score_at(
    contributions: Mapping[str, float], ref_ms: int, at_ms: int, half_life_ms: float
) -> float:
    """The total behaviour score at ``at_ms`` (>= ``ref_ms`` for decay; earlier grows it back)."""
    return decay(sum(contributions.values()), at_ms - ref_ms, half_life_ms)


def top_contributions(
    contributions: Mapping[str, float], ref_ms: int, at_ms: int, half_life_ms: float, n: int
) -> list[Contribution]:
    """The ``n`` largest contributions at ``at_ms``, largest first: the reasons for a score."""
    ranked = sorted(contributions.items(), key=lambda kv: (-kv[1], kv[0]))[:n]
    return [
        Contribution(rule, round(decay(v, at_ms - ref_ms, half_life_ms), 3)) for rule, v in ranked
    ]
