"""The MQL rule: when a lead becomes a marketing-qualified lead."""

from __future__ import annotations

from engine.settings import ScoringSettings


def is_mql(behavior_score: float, scoring: ScoringSettings) -> bool:
    """True when the behaviour score has reached the MQL threshold."""
    return behavior_score >= scoring.mql_threshold
