"""Profile fit: how well a person matches the customers we want, with its reasons."""

from __future__ import annotations

import re
from dataclasses import dataclass

from engine.profile import Profile, present_fields
from engine.settings import FitSettings


@dataclass(frozen=True, slots=True)
class FitFactor:
    """One reason for a fit score: the factor and the points it gave."""

    factor: str
    points: float


class FitModel:
    """The fit rules of the configuration, compiled."""

    def __init__(self, settings: FitSettings):
        self.settings = settings
        # Ordered as configured: the first matching level wins, so list the highest first.
        self.levels = [
            (level.name, re.compile("|".join(f"(?:{p})" for p in level.patterns), re.I))
            for level in settings.seniority
            if level.patterns
        ]
        self._level_points = {level.name: level.points for level in settings.seniority}

    def score(self, profile: Profile) -> tuple[float, list[FitFactor]]:
        """The fit score of a profile and the factors that made it, largest first."""
        s = self.settings
        factors: list[FitFactor] = []
        if profile.email_kind == "company" and s.company_email_points:
            factors.append(FitFactor("company_email", s.company_email_points))
        if profile.title_level in self._level_points:
            factors.append(
                FitFactor(f"title:{profile.title_level}", self._level_points[profile.title_level])
            )
        if profile.company_size:
            for band in s.company_size:
                if band.min <= profile.company_size <= band.max:
                    factors.append(FitFactor(f"company_size:{band.min}-{band.max}", band.points))
                    break
        if profile.country:
            points = s.countries.get(profile.country, s.countries.get("*", 0.0))
            factors.append(FitFactor(f"country:{profile.country}", points))
        if profile.industry:
            points = s.industries.get(profile.industry, s.industries.get("*", 0.0))
            factors.append(FitFactor(f"industry:{profile.industry}", points))
        for name in present_fields(profile):
            if s.completeness.get(name):
                factors.append(FitFactor(f"has:{name}", s.completeness[name]))
        for answer in profile.bant:
            if s.bant.get(answer):
                factors.append(FitFactor(f"bant:{answer}", s.bant[answer]))
        factors = [f for f in factors if f.points]
        factors.sort(key=lambda f: (-f.points, f.factor))
        return sum(f.points for f in factors), factors
