from __future__ import annotations

import pytest

from engine import lifecycle
from engine.routing import pick_sdr
from engine.settings import Sdr


def test_allowed_transitions_cover_every_stage() -> None:
    assert set(lifecycle.ALLOWED) == set(lifecycle.STAGES)
    lifecycle.check_transition("lead", "mql")
    lifecycle.check_transition("recycled", "mql")
    with pytest.raises(lifecycle.IllegalTransition):
        lifecycle.check_transition("customer", "lead")
    with pytest.raises(lifecycle.IllegalTransition):
        lifecycle.check_transition("lead", "sql")


def test_round_robin_follows_roster_order_and_wraps() -> None:
    sdrs = tuple(Sdr(f"s{i}", "q") for i in range(3))
    assert [pick_sdr(t, sdrs).id for t in range(1, 8)] == ["s0", "s1", "s2", "s0", "s1", "s2", "s0"]
