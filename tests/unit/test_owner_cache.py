"""The resolver's owner cache (engine.owner_cache): hits, misses, erasures, eviction."""

from __future__ import annotations

from engine.owner_cache import OwnerCache


def test_what_a_batch_read_or_wrote_is_held_and_the_rest_is_read() -> None:
    cache = OwnerCache(10)
    cache.update({"a": "p1", "b": None}, {"a": 0, "b": 0})
    held, missing = cache.split(["a", "b", "c"])
    assert held == {"a": "p1", "b": None}  # "nobody owns it" is an answer too
    assert missing == ["c"]


def test_an_erased_identifier_is_never_held_and_an_erasure_forgets_it() -> None:
    cache = OwnerCache(10)
    cache.update({"a": "p1", "e": None}, {"e": 1_700_000_000_000})
    assert cache.split(["a", "e"]) == ({"a": "p1"}, ["e"])
    cache.update({"a": None}, {"a": 1_700_000_000_001})  # the resolver erased its owner
    assert cache.split(["a"]) == ({}, ["a"])


def test_the_least_recently_used_goes_first_and_size_zero_holds_nothing() -> None:
    cache = OwnerCache(2)
    cache.update({"a": "p1", "b": "p2"}, {})
    cache.split(["a"])  # a used: b is now the oldest
    cache.update({"c": "p3"}, {})
    assert cache.split(["a", "b", "c"]) == ({"a": "p1", "c": "p3"}, ["b"])
    assert len(cache) == 2
    none = OwnerCache(0)
    none.update({"a": "p1"}, {})
    assert len(none) == 0


def test_a_merge_moves_held_owners_and_clear_forgets_all() -> None:
    cache = OwnerCache(10)
    cache.update({"a": "p1", "b": "p2"}, {})
    cache.update({"b": "p1"}, {})  # p2 merged into p1
    assert cache.split(["a", "b"]) == ({"a": "p1", "b": "p1"}, [])
    cache.clear()
    assert cache.split(["a"]) == ({}, ["a"])
