"""The lead grade: how good a fit and how engaged, in one code marketing and sales agree on.

A grade is a fit band (a letter, from the fit score) and an engagement band (a digit,
from the behaviour score): ``A1`` is a great fit and very engaged, ``D4`` neither. The
bands are in ``scoring.toml`` (``[grade]``); the decision carries the grade and why
(each score and the band's minimum it reached), so it is explained like the score.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from engine.settings import GradeSettings


@dataclass(frozen=True, slots=True)
class Grade:
    """A lead's grade and the two bands it is made of."""

    code: str  # "A1"
    fit_band: str
    fit_minimum: float
    engagement_band: str
    engagement_minimum: float

    def explained(self, fit: float, behavior_score: float) -> dict[str, Any]:
        """The grade's reasons, as the decision shows them."""
        return {
            "fit": {"score": round(fit, 3), "band": self.fit_band, "minimum": self.fit_minimum},
            "engagement": {
                "score": round(behavior_score, 3),
                "band": self.engagement_band,
                "minimum": self.engagement_minimum,
            },
        }


def _band(score: float, bands: Mapping[str, float]) -> tuple[str, float]:
    """The first band (best first) whose minimum ``score`` reaches."""
    for name, minimum in bands.items():
        if score >= minimum:
            return name, minimum
    name = list(bands)[-1]  # a negative score (inactivity penalties): the lowest band
    return name, bands[name]


def lead_grade(fit: float, behavior_score: float, settings: GradeSettings) -> Grade:
    """The grade of a lead with this fit and behaviour score."""
    fit_band, fit_minimum = _band(fit, settings.fit_bands)
    engagement_band, engagement_minimum = _band(behavior_score, settings.engagement_bands)
    return Grade(
        fit_band + engagement_band, fit_band, fit_minimum, engagement_band, engagement_minimum
    )
