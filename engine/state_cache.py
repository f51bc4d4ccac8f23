"""Decoded person states kept by the worker that owns them, between batches.

Redis is the durable store and the only truth: the cache only saves decoding a
state that nobody changed since this worker saved or read it. Each entry holds
the version it was stored at; the load asks Redis for the state only if the
stored version differs (engine.store.RedisStore.load_people), which it does
after any write by anyone (a merge or an erasure written by another worker, a
rebalance, a crash and restart with another owner): every save raises the
version, and a person created again after being deleted or expiring starts at
a fresh random version (engine.batch.next_version), never at one a stale entry
could hold.

A state is taken out of the cache while a batch works on it and put back only
once saved (or found unchanged), so a batch that raises, loses a race or is
redirected leaves nothing half-applied behind: the next batch reads Redis.
"""

from __future__ import annotations

from dataclasses import dataclass

from engine.person import PersonState


@dataclass(slots=True)
class CachedState:
    """A decoded state and the stored bytes and version it was decoded from."""

    version: int
    stored: bytes
    state: PersonState


class StateCache:
    """A bounded map of One-ID -> :class:`CachedState`, least recently used out first."""

    def __init__(self, size: int):
        self.size = size
        # A dict keeps insertion order: taking an entry and putting it back moves it to
        # the end, so the first key is always the least recently used.
        self._entries: dict[str, CachedState] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def versions(self, one_ids: list[str]) -> list[int]:
        """The version cached for each person, 0 for none (stored versions are >= 1)."""
        entries = self._entries
        return [e.version if (e := entries.get(o)) else 0 for o in one_ids]

    def take(self, one_id: str, unchanged: bool) -> CachedState | None:
        """Remove a person's entry; return it if Redis still holds its version (``unchanged``).

        Only this worker puts entries back, between a load that sent their
        versions and this call, so an ``unchanged`` person always has one.
        """
        entry = self._entries.pop(one_id, None)
        if not unchanged:
            return None
        if entry is None:
            raise RuntimeError(f"state cache: no entry for {one_id}, which Redis found unchanged")
        return entry

    def drop(self, one_id: str) -> None:
        """Forget a person (redirected, erased, or its batch failed)."""
        self._entries.pop(one_id, None)

    def keep(self, one_id: str, version: int, stored: bytes, state: PersonState) -> None:
        """Hold ``state``, as stored at ``version``; evict the least recently used past the size."""
        if self.size <= 0:
            return
        entries = self._entries
        entries.pop(one_id, None)
        entries[one_id] = CachedState(version, stored, state)
        while len(entries) > self.size:
            del entries[next(iter(entries))]
