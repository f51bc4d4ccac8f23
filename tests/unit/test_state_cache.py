"""The state cache: bounded, least recently used out first, and a kept state acts as its bytes."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.batch import next_version
from engine.events import Event
from engine.person import PersonState, apply_event, decode_state, encode_state
from engine.state_cache import StateCache
from tests.unit.test_person import COMPANY, NOW_MS, RULES, SCORED, decide, event


def test_the_least_recently_used_state_goes_first() -> None:
    cache = StateCache(2)
    for one_id in ("a", "b"):
        cache.keep(one_id, 1, b"", PersonState(one_id))
    assert cache.take("a", unchanged=True) is not None  # used: put back as the newest
    cache.keep("a", 2, b"", PersonState("a"))
    cache.keep("c", 1, b"", PersonState("c"))
    assert cache.versions(["a", "b", "c"]) == [2, 0, 1]
    assert len(cache) == 2


def test_a_changed_state_is_dropped_and_a_missing_unchanged_one_is_an_error() -> None:
    cache = StateCache(4)
    cache.keep("a", 5, b"", PersonState("a"))
    assert cache.take("a", unchanged=False) is None  # someone else saved: decode theirs
    assert cache.versions(["a"]) == [0]
    with pytest.raises(RuntimeError, match="no entry for a"):
        cache.take("a", unchanged=True)


def test_size_0_keeps_nothing() -> None:
    cache = StateCache(0)
    cache.keep("a", 1, b"", PersonState("a"))
    assert cache.versions(["a"]) == [0]


def test_a_new_person_starts_at_a_random_version_then_counts_up() -> None:
    firsts = {next_version(0) for _ in range(100)}
    assert len(firsts) == 100 and all(0 < v < 2**52 for v in firsts)
    assert next_version(41) == 42


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.sampled_from([*SCORED, "identify"]), min_size=2, max_size=14),
    st.integers(1, 13),
)
def test_a_kept_state_acts_as_the_state_decoded_from_its_bytes(names: list[str], cut: int) -> None:
    """What the cache relies on: the next events do the same to the object and to its bytes."""
    events = [
        event(f"m{i}", type_="identify", traits=COMPANY, t_ms=NOW_MS + i * 60_000)
        if name == "identify"
        else event(f"m{i}", name, NOW_MS + i * 60_000, n=i)
        for i, name in enumerate(names)
    ]
    kept = PersonState("p", is_new=True)
    cut = min(cut, len(events) - 1)

    def apply(p: PersonState, e: Event) -> list[tuple[str, object]]:
        records, promotion = apply_event(p, e, RULES, NOW_MS)
        if promotion is not None:
            records += decide(promotion)
        return [(r.kind, r.value) for r in records]

    for e in events[:cut]:
        apply(kept, e)
    decoded = decode_state("p", encode_state(kept), kept.version)
    for e in events[cut:]:
        assert apply(kept, e) == apply(decoded, e)
    assert encode_state(kept) == encode_state(decoded)
