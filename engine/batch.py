"""The rule for a batch: load its people, apply their events in order, route, assign, save.

Production applies events in batches (one Bytewax activation of the person step),
and a batch must end exactly as the same events do one at a time, however the
input was cut. :class:`Batch` is that rule, behind the narrow :class:`PeopleStore`
interface: :class:`engine.store.RedisStore` in production, and
:class:`engine.memory_store.MemoryStore` for the domain's unit tests.

A batch is applied in rounds (:class:`_Round`). Each round loads the people the
events were routed to, with their pending absorptions (following the redirects of
people merged meanwhile), absorbs those pending people (their states are final:
the resolver redirected them, and a redirected person's state cannot be saved),
applies the events, timers and sales feedback in order, assigns SDRs (one call
for the round's routings; at once for a person still absorbing others in the batch)
and saves every person only if unchanged and not redirected
(compare-and-set on the version). What lost a race is done again next round from
fresh reads, its SDRs are given back and its records are not emitted.

Decoded states stay in a :class:`engine.state_cache.StateCache` between batches:
the load tells the store which version this worker holds and gets the bytes only
of people someone changed since.

Every step can be repeated after a crash with the same effect: an absorbed person
stays readable behind its redirect until its survivor records it in
``merged_from``, and each event's messageId digest makes its second application a
replay of its records.
"""

from __future__ import annotations

import enum
import random
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from engine.consent import LISTS, suppression_of
from engine.events import Event, pickled_by_fields
from engine.person import (
    ERASE,
    Output,
    PersonState,
    Rulebook,
    Seen,
    absorb,
    already_applied,
    apply_event,
    decode_state,
    encode_state,
    erase,
    message_digest,
    refuse_merge,
    remember,
    settle,
)
from engine.routing import Assignment
from engine.sales import (
    FEEDBACK,
    TIMER,
    Routing,
    apply_feedback,
    candidates,
    complete_routing,
    fire_timer,
    route_promotion,
    withhold_from_sales,
)
from engine.settings import RosterSettings, Settings
from engine.state_cache import StateCache

# Lost compare-and-set races before one person's events count as failing.
MAX_ROUNDS = 20


class SaveStatus(enum.IntEnum):
    """What a compare-and-set save of a person did."""

    SAVED = 0
    CONFLICT = 1  # someone saved another version since it was read: do it again
    REDIRECTED = 2  # merged into another person meanwhile: its events go there


@dataclass(slots=True)  # not frozen: one per person and batch
class Stored:
    """A person as read: version, state, redirect (None if none), pending absorptions.

    ``pending`` (read on request) names the people merged into this one that it
    may not have absorbed yet.
    """

    version: int
    state: bytes | None
    redirect: str | None
    pending: tuple[str, ...] = ()
    # Still at the version the caller holds decoded (load_people's ``held``): state is None.
    unchanged: bool = False


# (one_id, version read, version to write, state, ttl ms); see PeopleStore.save_people.
Save = tuple[str, int, int, bytes, int]
# (one_id, timer kind, due ms), named as scheduled.
Timer = tuple[str, str, int]

_versions = random.Random()  # seeded from the OS: unique, not secret


def next_version(read: int) -> int:
    """The version a save writes over ``read``: one more, or a fresh random one for a new person.

    Random, not 1, so that a person created again (after expiring or being
    deleted) never comes back at a version a worker's cache still holds for its
    earlier life (engine.state_cache). Below 2**52, so Lua's doubles count it exactly.
    """
    return read + 1 if read else _versions.getrandbits(48) + 1


class PeopleStore(Protocol):
    """What a batch needs of the durable store; each call is one round trip."""

    def load_people(
        self, one_ids: Sequence[str], pending: bool = False, held: Sequence[int] = ()
    ) -> list[Stored]:
        """Each person's version, state, redirect, and (``pending``) pending absorptions.

        ``held`` gives the version the caller holds decoded per person (0: none):
        a state still at it comes back ``unchanged``, without its bytes.
        """
        ...

    def save_people(self, saves: Sequence[Save]) -> list[SaveStatus]:
        """Compare-and-set each person: saved only if at the version read and not redirected."""
        ...

    def absorbed(self, done: Sequence[tuple[str, Sequence[str]]]) -> None:
        """Strike ``(survivor, absorbed people)`` off the survivors' pending sets."""
        ...

    def drop_people(self, one_ids: Sequence[str]) -> None:
        """Delete absorbed people's frozen states, redirects and pending sets (an erasure)."""
        ...

    def assign(self, requests: Sequence[Assignment]) -> list[str | None]:
        """Assign each decision to an SDR by :func:`engine.routing.assign_lead`, once each."""
        ...

    def release(self, assignments: Sequence[tuple[Assignment, str]]) -> int:
        """Give back ``(request, sdr)`` assignments whose decisions were never emitted."""
        ...

    def lists_holding(
        self, people: Sequence[tuple[str, str, Sequence[str] | None]], names: Sequence[str]
    ) -> list[dict[str, bool]]:
        """For each ``(one_id, e-mail domain, contact points)``: which lists hold one of theirs."""
        ...

    def sync_timers(self, scheduled: Sequence[Timer], removed: Sequence[Timer]) -> None:
        """Schedule timers (idempotent); strike ``removed`` ones off."""
        ...


@pickled_by_fields
@dataclass(slots=True)  # not frozen: one per event, see engine.events.Event
class Resolved:
    """An event and the person it belongs to, with the merges it made or was refused.

    ``home`` is the person its batch ends with: ``one_id`` itself, or the survivor
    that absorbs ``one_id`` later in the same batch. Every event of a batch with
    the same home goes to the home's worker, in order, so the merges of a batch
    happen at their events, as one event at a time would (see :class:`_Round`).
    """

    one_id: str
    event: Event
    refusals: tuple[tuple[str, str], ...] = ()
    merges: tuple[str, ...] = ()  # people absorbed into one_id at this event
    home: str = ""
    looked_up: bool = False  # found by the identity lookup, not the resolver

    @property
    def key(self) -> str:
        """Whose work this is: the home, or the person when nobody absorbs them."""
        return self.home or self.one_id


@dataclass(slots=True)
class Tally:
    """What a batch did besides its records, for the metrics (dataflows.metrics).

    ``emitted`` holds each saved person's records with the person; ``triggers``
    the event behind each decision assigned in this batch (a decision not in it
    was re-emitted from the outbox).
    """

    states_kept: int = 0  # loads answered from the state cache
    states_read: int = 0
    erased_events: int = 0  # events of a person erased before they were applied
    erasures: int = 0
    resends: int = 0  # events a client sent twice (applied once, emitted once)
    timers_fired: Counter[str] = field(default_factory=Counter)
    emitted: list[tuple[list[Output], PersonState]] = field(default_factory=list)
    triggers: dict[str, Event] = field(default_factory=dict)


@dataclass
class Batch:
    """The people of one batch and what applying it needs; :meth:`apply` does it.

    ``roster`` gives the roster routing uses now (read when a round routes);
    ``inputs_done`` the input sources' done offsets (engine.person.settle);
    ``clock`` the wall clock in seconds; ``event_time`` applies each event at its
    own time (replays and the backtest) instead of the wall clock's.
    """

    settings: Settings
    rules: Rulebook
    store: PeopleStore
    states: StateCache
    roster: Callable[[], RosterSettings]
    inputs_done: dict[str, int]
    clock: Callable[[], float]
    event_time: bool = False
    tally: Tally = field(default_factory=Tally)
    # The records of the people saved so far, in order.
    outputs: list[Output] = field(default_factory=list)
    # The people of the round under way: what a failing batch still has to do.
    unfinished: dict[str, list[Resolved]] = field(default_factory=dict)

    def apply(self, work: dict[str, list[Resolved]]) -> list[Output]:
        """Apply each person's events (``work``: home -> events in order); return the records.

        Round after round until nobody is left; a person who lost the race
        :data:`MAX_ROUNDS` times raises. When a round raises, the records of the
        rounds saved before it are in :attr:`outputs`, and :attr:`unfinished`
        holds the people of the round that raised.
        """
        conflicts: Counter[str] = Counter()
        while work:
            self.unfinished = work
            done_round = _Round(self, work)
            work = done_round.run(self.outputs)
            for one_id in done_round.conflicted:
                conflicts[one_id] += 1
                if conflicts[one_id] >= MAX_ROUNDS:
                    raise RuntimeError(f"person still contended after {MAX_ROUNDS} rounds")
        self.unfinished = {}
        return self.outputs


def batch_work(items: Sequence[Resolved]) -> dict[str, list[Resolved]]:
    """A batch's events by the person whose worker applies them (:attr:`Resolved.key`), in order."""
    work: dict[str, list[Resolved]] = {}
    for item in items:
        work.setdefault(item.key, []).append(item)
    return work


class _Round:
    """One round of a :class:`Batch`.

    A person's events are applied in order until one needs an SDR: the rest of
    that person's events wait for the next round, which reads the state saved
    with the assignment. The batch then does exactly what the same events do
    one at a time (a promotion is routed before the acceptance, the
    disqualification or the next promotion that follows it in the batch).
    """

    def __init__(self, batch: Batch, work: dict[str, list[Resolved]]):
        self.batch = batch
        self.settings, self.store, self.rules = batch.settings, batch.store, batch.rules
        self.now_ms = int(batch.clock() * 1000)  # or each event's time: see at()
        self.work = work
        self.retry: dict[str, list[Resolved]] = {}
        self.later: dict[str, list[Resolved]] = {}  # events after a routing: next round
        self.conflicted: set[str] = set()  # people whose save lost a race this round
        self.people: dict[str, PersonState] = {}
        self.loaded: dict[str, bytes | None] = {}
        self.timers_loaded: dict[str, dict[str, int]] = {}
        self.replayed: set[str] = set()  # people with an event already applied (a replay)
        self.frozen: dict[str, bytes | None] = {}  # absorbed people's states, as stored
        self.pending: dict[str, list[str]] = {}  # person -> frozen people to absorb
        self.absorbing: dict[str, list[PersonState]] = {}  # person -> people absorbed now
        self.produced: dict[str, list[Output]] = {}
        self.routings: list[tuple[str, Routing]] = []  # (home, routing) waiting for an SDR
        self.assigned: dict[str, list[tuple[Assignment, str]]] = {}  # person -> SDRs taken
        # Timers fired: (person, (one_id as scheduled, kind, due ms)).
        self.fired: list[tuple[str, Timer]] = []
        self.erased: dict[str, list[str]] = {}  # erased person -> people it had absorbed

    def run(self, outputs: list[Output]) -> dict[str, list[Resolved]]:
        """Do the round; add the records of people saved to ``outputs``; return what to retry."""
        self._load()
        self._apply()
        self._save(outputs)
        return self.retry

    def at(self, event: Event) -> None:
        """Under event time, make ``event``'s time the round's now (else keep the wall clock's)."""
        if self.batch.event_time:
            self.now_ms = event.event_ms

    def _again(self, one_id: str, items: list[Resolved]) -> None:
        self.retry.setdefault(one_id, []).extend(items)

    def _load(self) -> None:
        """Load the people, then the frozen states of those they have yet to absorb."""
        wanted: dict[str, set[str]] = {}
        done_offsets = self.batch.inputs_done
        cache, tally = self.batch.states, self.batch.tally
        one_ids = list(self.work)
        stored_people = self.store.load_people(one_ids, True, cache.versions(one_ids))
        kept = sum(1 for stored in stored_people if stored.unchanged)
        tally.states_kept += kept
        tally.states_read += len(stored_people) - kept
        for one_id, stored in zip(one_ids, stored_people, strict=True):
            # Taken out while this round works on the state; put back once it is saved.
            cached = cache.take(one_id, stored.unchanged)
            if stored.redirect:
                self._again(stored.redirect, self.work[one_id])
                continue
            if cached is not None:
                person = self.people[one_id] = cached.state
                self.loaded[one_id] = cached.stored
            else:
                person = self.people[one_id] = decode_state(one_id, stored.state, stored.version)
                self.loaded[one_id] = stored.state
            settle(person, done_offsets)
            self.timers_loaded[one_id] = dict(person.timers)
            done = {m.one_id for m in person.merged_from} | {one_id}
            wanted[one_id] = {o for o in stored.pending if o not in done}
        others = sorted(set().union(*wanted.values()))
        self.frozen = {
            o: st.state
            for o, st in zip(others, self.store.load_people(others), strict=True)
            if st.redirect  # not frozen yet: its merge is still being written; absorbed later
        }
        for one_id, pending in wanted.items():
            self.pending[one_id] = sorted(o for o in pending if o in self.frozen)

    def _apply(self) -> None:
        """Apply each person's events in order, merging people at the events that merge them."""
        for one_id in self.people:
            self._apply_person(one_id)
        self._assign(self.routings)

    def _apply_person(self, one_id: str) -> None:
        """Absorb and apply, in order, one home's events (and those of whom it absorbs)."""
        items = self.work[one_id]
        live = self._absorbable(one_id, items)
        out = self.produced[one_id] = []
        for n, item in enumerate(items):
            start = len(out)
            waits = self._apply_item(one_id, n, item, live, out)
            for record in out[start:]:  # for the stage latency (dataflows.metrics)
                record.ingested_ms = item.event.ingested_ms
            if waits and n + 1 < len(items):
                self.later[one_id] = items[n + 1 :]
                break

    def _apply_item(
        self, one_id: str, n: int, item: Resolved, live: dict[str, PersonState], out: list[Output]
    ) -> bool:
        """Apply a home's ``n``-th event; True when its routing waits for the round's SDRs."""
        person = self.people[one_id]
        self.at(item.event)
        target = live.get(item.one_id, person)
        seen = self._merge_and_note(one_id, n, item, target, live, out)
        event = item.event
        if item.looked_up and 0 < target.erased_ms < event.event_ms:
            # Its owner was read before the erasure: dropped as if it had come just
            # before it (which wipes it), never reviving the erased One-ID.
            self.batch.tally.erased_events += 1
            return False
        if event.trusted and event.name == ERASE and not target.erased_ms:
            # The people the erased one had absorbed are dropped once it is saved.
            self.erased.setdefault(one_id, []).extend(m.one_id for m in target.merged_from)
            out.append(erase(target, event, self.rules, self.now_ms))
            return False
        if not self._step(target, event, seen, out, one_id):
            return False
        if live or target is not person:
            # People still to be merged in this batch hold changes that can only be
            # saved with this home: the SDR is assigned now, so nothing waits a round.
            self._assign([self.routings.pop()])
            return False
        return True

    def _absorbable(self, one_id: str, items: list[Resolved]) -> dict[str, PersonState]:
        """The people this home absorbs: at its first event, or (``live``) at their merge's."""
        if not self.pending[one_id]:  # nearly everyone
            self.absorbing[one_id] = []
            return {}
        merged_here = {o for item in items for o in item.merges}
        states = {o: decode_state(o, self.frozen[o]) for o in self.pending[one_id]}
        for o in states:  # redirected for good: their cached states, if any, are stale
            self.batch.states.drop(o)
        for o, st in states.items():  # as scheduled: struck off once absorbed
            self.timers_loaded[o] = dict(st.timers)
        # A pending person already absorbed by another pending one comes with it.
        inner = {m.one_id for st in states.values() for m in st.merged_from}
        live = {o: st for o, st in states.items() if o in merged_here}
        self.absorbing[one_id] = [
            st for o, st in states.items() if o not in inner and o not in live
        ]
        return live

    def _merge_and_note(
        self,
        one_id: str,
        n: int,
        item: Resolved,
        target: PersonState,
        live: dict[str, PersonState],
        out: list[Output],
    ) -> Seen:
        """The merges and refusals an event brings; whether it was seen before."""
        event = item.event
        digest = message_digest(event.message_id)
        before = len(out)
        if n == 0:
            for other in self.absorbing[one_id]:
                out.append(absorb(self.people[one_id], other, event, self.rules, self.now_ms))
        for other in [live.pop(o) for o in item.merges if o in live]:
            out.append(absorb(target, other, event, self.rules, self.now_ms))
            self.absorbing[one_id].append(other)
        seen = already_applied(target, event, digest)
        if seen is Seen.REPLAY:
            self.replayed.add(one_id)
        elif seen is Seen.RESEND:
            self.batch.tally.resends += 1
        else:
            for other_id, reason in item.refusals:
                out.append(refuse_merge(target, other_id, reason, event, self.rules, self.now_ms))
        # Merge and refusal records go in the outbox under the event that caused
        # them, or a crash before they are sent would lose them (the replay finds
        # the merge done and the event seen).
        if len(out) > before:
            remember(target, digest, out[before:], self.settings.limits.outbox_size)
        return seen

    def _step(
        self, person: PersonState, event: Event, seen: Seen, out: list[Output], home: str
    ) -> bool:
        """Apply one event, timer or sales feedback; True when it needs an SDR (queued).

        ``seen`` is :func:`already_applied`'s answer, asked by ``_merge_and_note``.
        """
        routing, promotion = None, None
        if event.type == TIMER:
            # Named as scheduled: a timer of a person since merged away fires for the survivor.
            _, scheduled_for, kind, due = event.message_id.split("|")
            self.fired.append((home, (scheduled_for, kind, int(due))))
            records, routing, promotion = fire_timer(person, event, self.rules, self.now_ms, seen)
        elif event.trusted and event.name in FEEDBACK:
            records = apply_feedback(person, event, self.rules, self.now_ms, seen)
        else:
            records, promotion = apply_event(person, event, self.rules, self.now_ms, seen)
        if promotion is not None:
            routing = route_promotion(promotion, self.rules, self.now_ms)
        if routing is None:
            out.extend(records)
            return False
        self.routings.append((home, routing))
        return True

    def _assign(self, routings: list[tuple[str, Routing]]) -> None:
        """Assign routings to SDRs, in one round trip; their records go to their homes."""
        if not routings:
            return
        # In event-time order, not the order people were processed in: who gets which
        # lead then does not depend on how the input was cut into batches (nor on a replay).
        routings.sort(key=lambda hr: (hr[1].event.event_ms, hr[1].event.message_id))
        people = [
            (r.person.one_id, r.person.profile.email_domain, r.person.contacts) for _, r in routings
        ]
        routed = []
        for (home, r), on_lists in zip(
            routings, self.store.lists_holding(people, tuple(LISTS)), strict=True
        ):
            self.at(r.event)
            r.suppression = suppression_of(on_lists)
            if r.suppression.blacklisted:
                withheld = withhold_from_sales(r, self.rules, self.now_ms)
                for record in withheld:
                    record.ingested_ms = r.event.ingested_ms
                self.produced[home].extend(withheld)
            else:
                routed.append((home, r))
        if not routed:
            return
        roster = self.batch.roster()
        requests = []
        for _, r in routed:
            self.at(r.event)
            requests.append(
                Assignment(
                    r.queue, r.key, r.company, candidates(roster, r.queue, self.now_ms, r.exclude)
                )
            )
        sdrs = {s.id: s for s in roster.sdrs}
        answers = self.store.assign(requests)
        for (home, routing), request, sdr_id in zip(routed, requests, answers, strict=True):
            sdr = sdrs.get(sdr_id) if sdr_id else None
            if sdr_id:
                self.assigned.setdefault(home, []).append((request, sdr_id))
            self.batch.tally.triggers[routing.key] = routing.event
            self.at(routing.event)
            records = complete_routing(routing, sdr, roster, self.rules, self.now_ms)
            for record in records:
                record.ingested_ms = routing.event.ingested_ms
            self.produced[home].extend(records)

    def _save(self, outputs: list[Output]) -> None:
        """Save whoever changed; emit the records of those saved; losers go round again."""
        limits = self.settings.limits
        block_ms = self.settings.identity.erasure_block_days * 86_400_000
        # Saved at every event: a person expires retention_days after their last one.
        retention_ms = limits.retention_days * 86_400_000
        cache = self.batch.states
        saves: list[Save] = []
        done = []
        for one_id in self.produced:
            person = self.people[one_id]
            raw = encode_state(person)
            loaded = self.loaded[one_id]
            if raw == loaded or person.is_new:
                done.append(one_id)  # replays, or nobody: nothing to save, records to (re-)emit
                if loaded is not None:
                    cache.keep(one_id, person.version, loaded, person)
            else:
                ttl_ms = block_ms if person.erased_ms else retention_ms
                saves.append((one_id, person.version, next_version(person.version), raw, ttl_ms))
        lost: list[tuple[Assignment, str]] = []
        for (one_id, _, version, raw, _), status in zip(
            saves, self.store.save_people(saves), strict=True
        ):
            if status is SaveStatus.SAVED:
                done.append(one_id)
                self.people[one_id].version = version
                cache.keep(one_id, version, raw, self.people[one_id])
            else:
                self.conflicted.add(one_id)
                self._again(one_id, self.work[one_id])
                lost.extend(self.assigned.get(one_id, ()))
        if lost:
            # Their decisions are not emitted: the SDRs must not be charged for them.
            self.store.release(lost)
        for one_id in done:
            if one_id in self.later:
                self._again(one_id, self.later[one_id])
        self._emit(done, outputs)

    def _emit(self, done: list[str], outputs: list[Output]) -> None:
        """Emit the records of the people saved; bring the store's side records up to date."""
        tally = self.batch.tally
        for one_id in done:
            outputs.extend(self.produced[one_id])
            tally.emitted.append((self.produced[one_id], self.people[one_id]))
            if one_id in self.erased:
                self.store.drop_people(self.erased[one_id])
                tally.erasures += 1
        self.store.absorbed([(o, [s.one_id for s in self.absorbing[o]]) for o in done])
        saved = set(done)
        for one_id, (_, kind, _) in self.fired:
            if one_id in saved:
                tally.timers_fired[kind] += 1
        # Timers set or moved since loaded are scheduled (all of them for a person whose
        # events are replayed: a crash may have come between the save and this call);
        # timers fired, moved, cancelled, or held by a person absorbed are struck off,
        # so the set holds live timers only and stale entries never crowd out due ones.
        scheduled: list[Timer] = []
        removed = [t for o, t in self.fired if o in saved]
        for o in done:
            now_set, before = self.people[o].timers, self.timers_loaded[o]
            scheduled += [
                (o, kind, due)
                for kind, due in now_set.items()
                if o in self.replayed or before.get(kind) != due
            ]
            removed += [(o, kind, due) for kind, due in before.items() if now_set.get(kind) != due]
            removed += [
                (a.one_id, k, due)
                for a in self.absorbing[o]
                for k, due in self.timers_loaded[a.one_id].items()
            ]
        self.store.sync_timers(scheduled, removed)
