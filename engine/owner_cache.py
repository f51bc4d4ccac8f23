"""The identity graph's owners as the resolver last read or wrote them, kept between batches.

The resolver (dataflows.stages.IdentityStage) is the graph's only writer: every
claim, merge and erasure of an identifier key goes through it, on one worker,
in order. What it read or wrote of an identifier's owner therefore stays true
until it writes that key again, and it need not ask Redis twice. Three things
keep that so:

* only owners of identifiers never erased are kept (an erasure's block expires
  in Redis, which this map would not see), and an erasure drops what it touches;
* the map is updated only after the batch's writes reached Redis, and emptied
  when a batch raises (its writes may have landed in part);
* a new process starts empty (a crash, a restart, a rescale that moves the
  resolver), so Redis stays the truth whenever the writer may have changed.

Identifier keys carry no expiry (engine.store), so a kept owner cannot be
outlived by its key. Negative answers (nobody owns it) are kept too: a
cookie's second batch then asks Redis nothing.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping


class OwnerCache:
    """A bounded map of identifier digest -> owner (None: nobody), least recently used out first."""

    def __init__(self, size: int):
        self.size = size
        # Insertion-ordered: a hit moves its key to the end, so the first key is the oldest.
        self._owners: dict[str, str | None] = {}

    def __len__(self) -> int:
        return len(self._owners)

    def split(self, digests: Iterable[str]) -> tuple[dict[str, str | None], list[str]]:
        """The owners held for ``digests``, and the digests to read from Redis."""
        owners = self._owners
        held: dict[str, str | None] = {}
        missing: list[str] = []
        for d in digests:
            if d in owners:
                held[d] = owners[d] = owners.pop(d)  # now the most recently used
            else:
                missing.append(d)
        return held, missing

    def update(self, owners: Mapping[str, str | None], erased: Mapping[str, int]) -> None:
        """Hold the owners a batch read and wrote, but erased ones; evict past the size."""
        if self.size <= 0:
            return
        held = self._owners
        for d, owner in owners.items():
            held.pop(d, None)
            if not erased.get(d):
                held[d] = owner
        while len(held) > self.size:
            del held[next(iter(held))]

    def clear(self) -> None:
        """Forget everything (a batch failed: Redis may hold part of its writes)."""
        self._owners.clear()
