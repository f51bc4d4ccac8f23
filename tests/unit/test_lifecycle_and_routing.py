from __future__ import annotations

import pytest

from engine import lifecycle


def test_allowed_transitions_cover_every_stage() -> None:
    assert set(lifecycle.ALLOWED) == set(lifecycle.STAGES)
    lifecycle.check_transition("lead", "mql")
    lifecycle.check_transition("recycled", "mql")
    with pytest.raises(lifecycle.IllegalTransition):
        lifecycle.check_transition("customer", "lead")
    with pytest.raises(lifecycle.IllegalTransition):
        lifecycle.check_transition("lead", "sql")
