"""Lifecycle stages of a person and the transitions allowed between them.

Lead -> MQL -> SAL -> SQL -> Opportunity -> Customer, with Recycled (back to
nurture; a lead again after ``recycle_days``, then may qualify again) and
Disqualified as side exits. This table is the
one place that says which moves are legal.
"""

from __future__ import annotations

from typing import Final

LEAD: Final = "lead"
MQL: Final = "mql"
SAL: Final = "sal"
SQL: Final = "sql"
OPPORTUNITY: Final = "opportunity"
CUSTOMER: Final = "customer"
RECYCLED: Final = "recycled"
DISQUALIFIED: Final = "disqualified"

STAGES = (LEAD, MQL, SAL, SQL, OPPORTUNITY, CUSTOMER, RECYCLED, DISQUALIFIED)

ALLOWED: Final[dict[str, frozenset[str]]] = {
    LEAD: frozenset({MQL, DISQUALIFIED}),
    MQL: frozenset({SAL, RECYCLED, DISQUALIFIED}),
    SAL: frozenset({SQL, RECYCLED, DISQUALIFIED}),
    SQL: frozenset({OPPORTUNITY, RECYCLED, DISQUALIFIED}),
    OPPORTUNITY: frozenset({CUSTOMER, RECYCLED}),
    CUSTOMER: frozenset(),
    RECYCLED: frozenset({LEAD, MQL, DISQUALIFIED}),
    DISQUALIFIED: frozenset(),
}

# Stages not worked by sales: marketing nurtures them (a manual MQL may promote them).
NURTURE = frozenset({LEAD, RECYCLED})
# Stages from which behaviour alone can promote a person to MQL: a recycled person
# first waits out ``lifecycle.recycle_days`` and re-enters as a lead.
PROMOTABLE = frozenset({LEAD})


class IllegalTransition(ValueError):
    """A move the lifecycle does not allow."""


def check_transition(from_stage: str, to_stage: str) -> None:
    """Raise :class:`IllegalTransition` unless ``from_stage -> to_stage`` is allowed."""
    if to_stage not in ALLOWED.get(from_stage, frozenset()):
        raise IllegalTransition(f"{from_stage} -> {to_stage} is not an allowed transition")


# Progress through the funnel, for choosing "the further stage" when two people merge.
_RANK = {LEAD: 0, RECYCLED: 1, MQL: 2, SAL: 3, SQL: 4, OPPORTUNITY: 5, CUSTOMER: 6}


def further_stage(a: str, b: str) -> str:
    """The stage further down the funnel; Disqualified only when neither side got past nurture.

    A merged person whose other half was disqualified by cleansing stays
    disqualified while in nurture; one that sales already works (MQL or later)
    keeps its stage.
    """
    best = max(
        (s for s in (a, b) if s != DISQUALIFIED), key=_RANK.__getitem__, default=DISQUALIFIED
    )
    if DISQUALIFIED in (a, b) and best in NURTURE:
        return DISQUALIFIED
    return best
