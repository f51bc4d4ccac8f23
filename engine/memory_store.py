"""The people store in memory: :class:`engine.batch.PeopleStore` for the domain's unit tests.

It keeps what :class:`engine.store.RedisStore` keeps for a batch, in dicts, with
the same answers: compare-and-set saves on versions, redirects and pending
absorptions, SDR assignment by :func:`engine.routing.assign_lead`, suppression
lists, the timer set. What it leaves out, on purpose: expiries (TTLs), the
identity graph (a person stored before contact points were kept has none here),
and atomicity across threads (one batch at a time).
"""

from __future__ import annotations

from collections.abc import Sequence

from engine.batch import Save, SaveStatus, Stored, Timer
from engine.routing import Assignment, QueueBooks, assign_lead, release_lead


class MemoryStore:
    """People, queues, lists and timers in dicts (see the module docstring)."""

    def __init__(self) -> None:
        self.people: dict[str, tuple[int, bytes]] = {}  # one_id -> (version, state)
        self.redirects: dict[str, str] = {}  # absorbed -> survivor
        self.pending: dict[str, set[str]] = {}  # survivor -> people to absorb
        self.queues: dict[str, QueueBooks] = {}
        self.lists: dict[str, set[str]] = {}  # list name -> members (engine.consent)
        self.timers: set[Timer] = set()

    def merge(self, absorbed: str, survivor: str) -> None:
        """Write what the identity resolver writes when ``survivor`` absorbs ``absorbed``."""
        self.redirects[absorbed] = survivor
        moved = self.pending.pop(absorbed, set())
        self.pending.setdefault(survivor, set()).update(moved | {absorbed})

    def load_people(
        self, one_ids: Sequence[str], pending: bool = False, held: Sequence[int] = ()
    ) -> list[Stored]:
        """As :meth:`engine.store.RedisStore.load_people`."""
        versions = held or [0] * len(one_ids)
        out = []
        for one_id, version in zip(one_ids, versions, strict=True):
            at, state = self.people.get(one_id, (0, None))
            redirect = self.redirects.get(one_id)
            if pending and version and at == version:
                stored = Stored(version, None, redirect, unchanged=True)
            else:
                stored = Stored(at, state, redirect)
            if pending:
                stored.pending = tuple(sorted(self.pending.get(one_id, ())))
            out.append(stored)
        return out

    def save_people(self, saves: Sequence[Save]) -> list[SaveStatus]:
        """As :meth:`engine.store.RedisStore.save_people` (the TTL is ignored)."""
        out = []
        for one_id, read, version, state, _ttl_ms in saves:
            if one_id in self.redirects:
                out.append(SaveStatus.REDIRECTED)
            elif self.people.get(one_id, (0, b""))[0] != read:
                out.append(SaveStatus.CONFLICT)
            else:
                self.people[one_id] = (version, state)
                out.append(SaveStatus.SAVED)
        return out

    def absorbed(self, done: Sequence[tuple[str, Sequence[str]]]) -> None:
        """As :meth:`engine.store.RedisStore.absorbed`."""
        for survivor, people in done:
            self.pending.get(survivor, set()).difference_update(people)

    def drop_people(self, one_ids: Sequence[str]) -> None:
        """As :meth:`engine.store.RedisStore.drop_people`."""
        for one_id in one_ids:
            self.people.pop(one_id, None)
            self.redirects.pop(one_id, None)
            self.pending.pop(one_id, None)

    def books(self, queue: str) -> QueueBooks:
        """A queue's assignment books."""
        return self.queues.setdefault(queue, QueueBooks())

    def assign(self, requests: Sequence[Assignment]) -> list[str | None]:
        """As :meth:`engine.store.RedisStore.assign`."""
        return [assign_lead(self.books(r.queue), r) for r in requests]

    def release(self, assignments: Sequence[tuple[Assignment, str]]) -> int:
        """As :meth:`engine.store.RedisStore.release`."""
        return sum(release_lead(self.books(r.queue), r, sdr) for r, sdr in assignments)

    def lists_holding(
        self, people: Sequence[tuple[str, str, Sequence[str] | None]], names: Sequence[str]
    ) -> list[dict[str, bool]]:
        """As :meth:`engine.store.RedisStore.lists_holding`, without the identity graph."""
        out = []
        for _, domain, contacts in people:
            members = set(contacts or ()) | ({f"domain:{domain}"} if domain else set())
            out.append({name: bool(members & self.lists.get(name, set())) for name in names})
        return out

    def sync_timers(self, scheduled: Sequence[Timer], removed: Sequence[Timer]) -> None:
        """As :meth:`engine.store.RedisStore.sync_timers`."""
        self.timers.update(scheduled)
        self.timers.difference_update(removed)
