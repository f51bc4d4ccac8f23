"""The MQL rule: when a lead becomes a marketing-qualified lead.

A person is an MQL when, all at once:

* their behaviour score reaches ``scoring.mql_threshold``, or one dimension's
  score reaches that dimension's threshold (the person qualifies for that
  product line);
* their fit score reaches ``qualification.min_fit``;
* every field of ``qualification.required_fields`` is present;
* they are not disqualified by cleansing.

Telemarketing can also promote by hand (a trusted ``manual_mql`` event); that
path is in :mod:`engine.person`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from engine.scoring import TOTAL
from engine.settings import QualificationSettings


@dataclass(frozen=True, slots=True)
class Verdict:
    """Whether the MQL rule holds, and why or why not.

    Attributes:
        qualified: the rule holds.
        on: the scores that reached their threshold ("total" or dimension names).
        missing: required fields not yet given.
        blocked_by: the first unmet condition ('' when qualified): ``disqualified``,
            ``behavior_below_threshold``, ``fit_below_minimum`` or ``missing_fields``.
    """

    qualified: bool
    on: tuple[str, ...] = ()
    missing: tuple[str, ...] = ()
    blocked_by: str = ""


def is_mql(
    scores: Mapping[str, float],
    thresholds: Mapping[str, float],
    fit: Callable[[], float],
    present: Sequence[str],
    disqualified: bool,
    rule: QualificationSettings,
) -> Verdict:
    """Evaluate the MQL rule.

    Args:
        scores: behaviour score per dimension ('' is the total).
        thresholds: MQL threshold per dimension ('' is the total).
        fit: computes the person's fit score (called only when behaviour qualifies).
        present: the MQL fields the person has given.
        disqualified: whether cleansing disqualified the person.
        rule: the qualification settings.
    """
    on = tuple(
        "total" if dim == TOTAL else dim
        for dim, threshold in thresholds.items()
        if scores.get(dim, 0.0) >= threshold
    )
    missing = tuple(f for f in rule.required_fields if f not in present)
    if disqualified:
        return Verdict(False, on, missing, "disqualified")
    if not on:
        return Verdict(False, on, missing, "behavior_below_threshold")
    if fit() < rule.min_fit:
        return Verdict(False, on, missing, "fit_below_minimum")
    if missing:
        return Verdict(False, on, missing, "missing_fields")
    return Verdict(True, on)
