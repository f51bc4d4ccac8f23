"""Lifecycle stages of a person and the transitions allowed between them.

Lead -> MQL -> SAL -> SQL -> Opportunity -> Customer, with Recycled (back to
nurture, may qualify again) and Disqualified as side exits. This table is the
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
    RECYCLED: frozenset({MQL, DISQUALIFIED}),
    DISQUALIFIED: frozenset(),
}

# Stages from which behaviour alone can promote a person to MQL.
NURTURE = frozenset({LEAD, RECYCLED})


class IllegalTransition(ValueError):
    """A move the lifecycle does not allow."""


def check_transition(from_stage: str, to_stage: str) -> None:
    """Raise :class:`IllegalTransition` unless ``from_stage -> to_stage`` is allowed."""
    if to_stage not in ALLOWED.get(from_stage, frozenset()):
        raise IllegalTransition(f"{from_stage} -> {to_stage} is not an allowed transition")
