"""The batch steps of the dataflow: the engine's rules plus one Redis round trip each.

Each stage is a callable taking the list of items Bytewax hands one worker in
one activation, so Redis is called once per batch, never once per event. The
stages import no Bytewax and can be driven directly against a real Redis.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

from dataflows.metrics import metrics
from engine.events import Event, Origin, Rejection, decode_event
from engine.identity import Identifier, anchor, identifiers_of, merge_refusal, plan_join
from engine.person import (
    DECISION,
    ERASE,
    Output,
    PersonState,
    Promotion,
    Rulebook,
    absorb,
    apply_event,
    complete_promotion,
    decode_state,
    encode_state,
    erase,
    message_digest,
    refuse_merge,
)
from engine.settings import Settings
from engine.store import SAVED, RedisStore, Stored

Clock = Callable[[], float]


@dataclass(frozen=True, slots=True)
class RawMessage:
    """What the decoder needs of a Kafka message."""

    value: bytes | None
    origin: Origin
    timestamp_ms: int


@dataclass(frozen=True, slots=True)
class Resolved:
    """An event, the person it was routed to, and its identifiers' owners as the router saw them."""

    one_id: str
    event: Event
    identifiers: tuple[Identifier, ...]
    owners: tuple[str | None, ...]


class Decoder:
    """Decode and validate a batch of raw messages into events and rejections."""

    def __init__(self, settings: Settings, clock: Clock = time.time):
        self.settings = settings
        self.clock = clock

    def __call__(self, messages: list[RawMessage]) -> list[Event | Rejection]:
        """Decode every message; bad ones become rejections, never exceptions."""
        limits, feedback = self.settings.limits, self.settings.topics.feedback
        now_ms = int(self.clock() * 1000)
        out: list[Event | Rejection] = []
        # Counted per batch: a labelled Prometheus increment per event costs as much as decoding.
        rejected: Counter[str] = Counter()
        consumed: Counter[tuple[str, str]] = Counter()
        for msg in messages:
            # A message without a broker timestamp is stamped on arrival.
            ingested_ms = msg.timestamp_ms if msg.timestamp_ms > 0 else now_ms
            trusted = msg.origin.topic == feedback
            item = decode_event(
                msg.value,
                msg.origin,
                ingested_ms=ingested_ms,
                trusted=trusted,
                max_bytes=limits.max_event_bytes,
                max_future_skew_ms=limits.max_future_skew_s * 1000,
            )
            if isinstance(item, Rejection):
                rejected[item.reason] += 1
            else:
                consumed[(item.type, "feedback" if trusted else "events")] += 1
            out.append(item)
        m = metrics()
        for reason, n in rejected.items():
            m.rejected.labels(reason).inc(n)
        for labels, n in consumed.items():
            m.events.labels(*labels).inc(n)
        return out


class _LazyStore:
    """Connect to Redis on first use, so building a flow does not connect."""

    def __init__(self, settings: Settings, store: RedisStore | None):
        self.settings = settings
        self._store = store

    @property
    def store(self) -> RedisStore:
        if self._store is None:
            self._store = RedisStore(self.settings.redis)
        return self._store


class IdentityStage(_LazyStore):
    """Route each event to a person: one round trip per batch (owners and erasures).

    Read-only: claims and merges happen in the person stage, under the person's
    compare-and-set. Events older than an erasure of one of their identifiers
    are dropped here (counted), so an erased person cannot be re-created by them.
    """

    def __call__(self, events: list[Event]) -> list[Resolved]:
        """Resolve ``events`` in order; later events of the batch see earlier routings."""
        idents = [identifiers_of(e, self.settings.identity) for e in events]
        digests = list(dict.fromkeys(i.digest for ids in idents for i in ids))
        found, erased_at = self.store.owners(digests)
        owners: dict[str, str | None] = dict(zip(digests, found, strict=True))
        erased = dict(zip(digests, erased_at, strict=True))
        out = []
        dropped = 0
        for event, ids in zip(events, idents, strict=True):
            if any(0 < event.event_ms <= erased[i.digest] for i in ids):
                dropped += 1
                continue
            seen = tuple(owners[i.digest] for i in ids)
            person = anchor(ids, seen)
            out.append(Resolved(person, event, ids, seen))
            for i in ids:  # tentatively, so the next event of this batch goes to the same person
                owners[i.digest] = owners[i.digest] or person
        if dropped:
            metrics().erased_events.inc(dropped)
        return out


# Rounds of compare-and-set before a batch gives up (and the process restarts from recovery).
MAX_ROUNDS = 20


@dataclass(slots=True)
class _Step:
    """One event of a round, with its planned merges: (other One-ID, refusal reason or '')."""

    item: Resolved
    merges: list[tuple[str, str]] = field(default_factory=list)
    erased: bool = False  # an identifier was erased after the event: it is dropped


class PersonStage(_LazyStore):
    """Join identities, then score, qualify and route people, under compare-and-set.

    A batch is processed in rounds (:class:`_Round`). Each round loads the people
    the events were routed to (following redirects of people absorbed meanwhile),
    plans each event's joins (attach new identifiers within limits; merge other
    owners or refuse), claims identifiers, freezes the people to absorb (redirect
    and read in one script, only if unchanged since planned), absorbs them and
    applies the events in order, draws routing tickets, saves every person only
    if unchanged and not redirected, and re-points absorbed people's identifiers.
    What lost a race (a claim taken, a person changed or redirected) is planned
    again next round from fresh reads, and its outputs are not emitted.

    Every step can be repeated after a crash with the same effect: claims and
    freezes are set-if-absent, an absorbed person stays readable behind its
    redirect until its survivor records it in ``merged_from``, and each event's
    messageId digest makes its second application a replay of its records.
    """

    def __init__(
        self, settings: Settings, store: RedisStore | None = None, clock: Clock = time.time
    ):
        super().__init__(settings, store)
        self.rules = Rulebook(settings)
        self.clock = clock

    def __call__(self, items: list[Resolved]) -> list[Output]:
        """Process a batch of resolved events; return the records to publish."""
        work: dict[str, list[Resolved]] = {}
        for item in items:
            work.setdefault(item.one_id, []).append(item)
        aliases: dict[str, str] = {}  # One-IDs learnt to be redirected, to their survivor
        known: dict[str, str] = {}  # identifier digests learnt to be owned (claims lost), to owner
        outputs: list[Output] = []
        for _ in range(MAX_ROUNDS):
            if not work:
                return outputs
            work = _Round(self, work, aliases, known).run(outputs)
        raise RuntimeError(f"people still contended after {MAX_ROUNDS} rounds: {sorted(work)[:5]}")


class _Round:
    """One round of :class:`PersonStage` over the people of a batch."""

    def __init__(
        self,
        stage: PersonStage,
        work: dict[str, list[Resolved]],
        aliases: dict[str, str],
        known: dict[str, str],
    ):
        self.settings, self.store, self.rules = stage.settings, stage.store, stage.rules
        self.now_ms = int(stage.clock() * 1000)
        self.work, self.aliases, self.known = work, aliases, known
        self.retry: dict[str, list[Resolved]] = {}
        self.people: dict[str, PersonState] = {}
        self.loaded: dict[str, bytes | None] = {}
        self.steps: dict[str, list[_Step]] = {}
        self.others: dict[str, Stored] = {}
        self._decoded: dict[str, PersonState] = {}  # others' states, decoded once per round
        # (identifier, claimer, stale owner or '', event) to claim, and to take back from a
        # person only once it is frozen into the claimer's chain.
        self.claims: list[tuple[Identifier, str, str, _Step]] = []
        self.takebacks: list[tuple[Identifier, str, str, _Step]] = []
        self.contended: set[str] = set()
        self.frozen: dict[str, PersonState] = {}
        self.produced: dict[str, list[Output]] = {}
        self.promotions: list[Promotion] = []
        self.erasures: dict[str, tuple[list[str], list[str]]] = {}  # identifiers, absorbed people

    def run(self, outputs: list[Output]) -> dict[str, list[Resolved]]:
        """Do the round; add the records of people saved to ``outputs``; return what to retry."""
        self._load()
        self._plan()
        self._claim_and_freeze()
        self._apply()
        self._save(outputs)
        return self.retry

    def _again(self, one_id: str, items: list[Resolved]) -> None:
        self.retry.setdefault(one_id, []).extend(items)

    def _raw_owner(self, digest: str, seen: str | None) -> str | None:
        """The owner as last seen by the router, or as learnt by this batch (a lost claim)."""
        return self.known.get(digest, seen)

    def _chain(self, one_id: str) -> list[str]:
        """``one_id`` followed by everyone its redirects lead to (as loaded or learnt)."""
        chain = [one_id]
        while chain[-1] in self.aliases and len(chain) <= MAX_ROUNDS:
            chain.append(self.aliases[chain[-1]])
        return chain

    def _load(self) -> None:
        for one_id, stored in zip(self.work, self.store.load_people(list(self.work)), strict=True):
            if stored.redirect:
                self.aliases[one_id] = stored.redirect
                self._again(stored.redirect, self.work[one_id])
            else:
                self.people[one_id] = decode_state(one_id, stored.state, stored.version)
                self.loaded[one_id] = stored.state

    def _erased_ms(self, one_id: str | None) -> int:
        """When a person was erased (0: not erased, or not loaded)."""
        if one_id is None or one_id in self.people:
            return self.people[one_id].erased_ms if one_id in self.people else 0
        stored = self.others.get(one_id)
        return self._other(one_id).erased_ms if stored and stored.state else 0

    def _other(self, one_id: str) -> PersonState:
        """Another person's state as loaded this round, decoded once."""
        if one_id not in self._decoded:
            stored = self.others[one_id]
            self._decoded[one_id] = decode_state(one_id, stored.state, stored.version)
        return self._decoded[one_id]

    def _exists(self, one_id: str | None) -> bool:
        if one_id is None:
            return False
        if one_id in self.people:
            return True
        stored = self.others.get(one_id)
        return stored is not None and (stored.state is not None or stored.redirect is not None)

    def _load_others(self) -> None:
        """Load every other owner the events name, and everyone on their redirect chains."""
        wanted = {
            o
            for p in self.people
            for r in self.work[p]
            for i, seen in zip(r.identifiers, r.owners, strict=True)
            if (o := self._raw_owner(i.digest, seen)) and o != p
        }
        while wanted:
            ids = sorted(wanted)
            wanted = set()
            for other, stored in zip(ids, self.store.load_people(ids), strict=True):
                self.others[other] = stored
                if stored.redirect:
                    self.aliases[other] = stored.redirect
                    if stored.redirect not in self.others:
                        wanted.add(stored.redirect)

    def _plan(self) -> None:
        """Plan each event's claims and merges, limits counted as the batch goes.

        An owner whose redirects end at this person is already this person, but the
        survivor it was absorbed into may itself have been absorbed before it saved:
        every one of them this person has not recorded in ``merged_from`` is absorbed
        now (it is frozen, so its content is final), and the identifier is claimed
        back from it.
        """
        self._load_others()
        for one_id, person in self.people.items():
            held = [(kind, digest) for kind, digest in person.ids]
            recorded = {m[0] for m in person.merged_from}
            self.steps[one_id] = []
            for item in self.work[one_id]:
                if person.erased_ms or message_digest(item.event.message_id) in person.seen:
                    self.steps[one_id].append(_Step(item))  # erased person or replay: no joins
                else:
                    self._plan_event(one_id, item, held, recorded)

    def _plan_event(
        self, one_id: str, item: Resolved, held: list[tuple[str, str]], recorded: set[str]
    ) -> None:
        """Plan one event's joins; ``held`` and ``recorded`` grow as the batch goes."""
        identity = self.settings.identity
        step = _Step(item)
        raws: list[str | None] = []
        finals: list[str | None] = []
        for ident, seen in zip(item.identifiers, item.owners, strict=True):
            raw = self._raw_owner(ident.digest, seen)
            chain = self._chain(raw) if raw else [None]
            raws.append(raw)
            erased_ms = self._erased_ms(chain[-1])
            if erased_ms and item.event.event_ms <= erased_ms:
                step.erased = True  # its owner was erased after this event happened
            # The router sends later events of its batch to a person an earlier event would
            # create; until that person is saved, the identifier counts as nobody's here. An
            # erased person is nobody too: newer events start afresh.
            finals.append(chain[-1] if self._exists(chain[-1]) and not erased_ms else None)
            if raw and raw != one_id and chain[-1] == one_id:
                for orphan in chain[:-1]:  # absorbed before its survivor saved: absorb it here
                    if orphan not in recorded:
                        recorded.add(orphan)
                        step.merges.append((orphan, ""))
                self.takebacks.append((ident, one_id, raw, step))
        plan = plan_join(one_id, held, item.identifiers, finals, identity)
        strongest = item.identifiers[0]
        if strongest in plan.over_limit and finals[0] is None and strongest.digest != one_id:
            # A new strongest identifier this person may not hold (a second userId on a
            # shared computer): the event is someone else's; the tie is refused there.
            self._again(strongest.digest, [replace(item, one_id=strongest.digest)])
            return
        self.steps[one_id].append(step)
        claimed = [(i.kind, i.digest) for i in plan.claims]
        verdicts = self._merge_verdicts(one_id, held + claimed, plan.merges)
        allowed = [other for other, reason, _ in verdicts if not reason]
        if allowed and min(allowed) < one_id:
            # The smaller One-ID always survives, so two people never absorb each other at
            # once and redirects cannot form a cycle: the event goes to the survivor.
            self.steps[one_id].pop()
            self.takebacks = [t for t in self.takebacks if t[3] is not step]
            self._again(min(allowed), [replace(item, one_id=min(allowed))])
            return
        taking_back = {t[0] for t in self.takebacks if t[3] is step}
        for ident in plan.claims:
            if ident not in taking_back:  # those are claimed from their frozen owner, later
                self.claims.append((ident, one_id, "", step))
            held.append((ident.kind, ident.digest))
        for other, reason, other_ids in verdicts:
            if not reason:
                held += [i for i in other_ids if i not in held]
                recorded.add(other)
            step.merges.append((other, reason))

    def _merge_verdicts(
        self, one_id: str, held: list[tuple[str, str]], others: Sequence[str]
    ) -> list[tuple[str, str, list[tuple[str, str]]]]:
        """(other, refusal reason or '', its identifiers) per person to merge; limits cumulate."""
        trial = list(held)
        out = []
        for other in others:
            stored = self.others.get(other)
            if stored is None or stored.redirect:
                self.contended.add(one_id)  # learnt only now: plan again next round
                continue
            other_ids = [(k, d) for k, d in self._other(other).ids]
            reason = merge_refusal(trial, other_ids, self.settings.identity)
            if not reason:
                trial += [i for i in other_ids if i not in trial]
            out.append((other, reason, other_ids))
        return out

    def _claim_and_freeze(self) -> None:
        self._claim(self.claims)
        plans = [
            (other, one_id, self.others[other].version, step)
            for one_id, steps in self.steps.items()
            if one_id not in self.contended
            for step in steps
            for other, reason in step.merges
            if not reason
        ]
        for _ in range(MAX_ROUNDS):
            if not plans:
                break
            plans = self._freeze(plans)
        else:
            raise RuntimeError("announced absorptions nest deeper than expected")
        # Take identifiers back only from people now frozen into this person's chain.
        self._claim(
            [
                t
                for t in self.takebacks
                if t[1] not in self.contended and self._chain(t[2])[-1] == t[1]
            ]
        )

    def _claim(self, claims: list[tuple[Identifier, str, str, _Step]]) -> None:
        wanted = [(i.digest, o, stale, step.item.event.event_ms) for i, o, stale, step in claims]
        for (ident, one_id, _, step), owner in zip(claims, self.store.claim(wanted), strict=True):
            if owner is None:
                step.erased = True  # older than an erasure of this identifier: dropped
            elif owner != one_id:
                self.known[ident.digest] = owner  # someone else got it first: plan again
                self.contended.add(one_id)
            elif (
                one_id in self.people and [ident.kind, ident.digest] not in self.people[one_id].ids
            ):
                self.people[one_id].ids.append([ident.kind, ident.digest])

    def _freeze(
        self, plans: list[tuple[str, str, int, _Step]]
    ) -> list[tuple[str, str, int, _Step]]:
        """Announce, then freeze; return the freezes the frozen people's own announcements add."""
        self.store.announce([(one_id, other) for other, one_id, _, _ in plans])
        results = self.store.freeze(
            [(other, one_id, version) for other, one_id, version, _ in plans]
        )
        adopted: list[tuple[str, _Step, str]] = []
        for (other, one_id, _, step), stored in zip(plans, results, strict=True):
            if stored.redirect:
                self.aliases.setdefault(other, stored.redirect)
            # Frozen for us, or an orphan whose redirects already end here: its content is final.
            if not (stored.redirect and self._chain(other)[-1] == one_id):
                self.contended.add(one_id)
                continue
            frozen = self.frozen[other] = decode_state(other, stored.state, stored.version)
            done = {m[0] for m in frozen.merged_from} | {
                m[0] for m in self.people[one_id].merged_from
            }
            for orphan in stored.pending:  # it announced them; absorb what it did not record
                if orphan not in done and orphan != one_id and orphan not in self.frozen:
                    step.merges.append((orphan, ""))
                    adopted.append((orphan, step, one_id))
        versions = self.store.load_people([o for o, _, _ in adopted])
        return [
            (o, one_id, v.version, step)
            for (o, step, one_id), v in zip(adopted, versions, strict=True)
        ]

    def _apply(self) -> None:
        """Absorb, then apply each event, in order, for every uncontended person."""
        for one_id, person in self.people.items():
            if one_id in self.contended:
                self._again(one_id, [step.item for step in self.steps[one_id]])
                continue
            out = self.produced[one_id] = []
            for step in self.steps[one_id]:
                event = step.item.event
                for other, reason in step.merges:
                    if reason:
                        out.append(
                            refuse_merge(person, other, reason, event, self.rules, self.now_ms)
                        )
                    elif not any(m[0] == other for m in person.merged_from):
                        out.append(
                            absorb(person, self.frozen[other], event, self.rules, self.now_ms)
                        )
                if event.trusted and event.name == ERASE and not person.erased_ms:
                    self.erasures[one_id] = (
                        [d for _, d in person.ids],
                        [o for o, _ in person.merged_from],
                    )
                    out.append(erase(person, event, self.rules, self.now_ms))
                    continue
                records, promotion = apply_event(person, event, self.rules, self.now_ms)
                if promotion is None:
                    out.extend(records)
                else:
                    self.promotions.append(promotion)
        tickets = self.store.draw_tickets([(p.queue, p.decision_id) for p in self.promotions])
        for promotion, ticket in zip(self.promotions, tickets, strict=True):
            records = complete_promotion(promotion, ticket, self.rules, self.now_ms)
            self.produced[promotion.person.one_id].extend(records)

    def _save(self, outputs: list[Output]) -> None:
        """Save whoever changed; emit the records of those saved; losers go round again."""
        identity = self.settings.identity
        block_ms = identity.erasure_block_days * 86_400_000
        saves, done = [], []
        for one_id in self.produced:
            person = self.people[one_id]
            raw = encode_state(person)
            if raw == self.loaded[one_id]:
                done.append(one_id)  # only replays: nothing to save, records to re-emit
            else:
                saves.append((one_id, person.version, raw, block_ms if person.erased_ms else 0))
        for (one_id, _, _, _), status in zip(saves, self.store.save_people(saves), strict=True):
            if status == SAVED:
                done.append(one_id)
            else:
                self._again(one_id, [step.item for step in self.steps[one_id]])
        repoints: list[tuple[str, str, str]] = []
        ingested = {p.decision_id: p.event.ingested_ms for p in self.promotions}
        m = metrics()
        for one_id in done:
            person = self.people[one_id]
            outputs.extend(self.produced[one_id])
            for record in self.produced[one_id]:
                cause = record.value.get("cause", "")
                if cause == "merge" and record.value["merged_from"] in self.frozen:
                    m.merges.inc()
                    absorbed = self.frozen[record.value["merged_from"]]
                    repoints += [(d, absorbed.one_id, one_id) for _, d in absorbed.ids]
                elif cause.startswith("merge_refused:"):
                    m.merges_refused.labels(cause.removeprefix("merge_refused:")).inc()
                elif record.kind == DECISION and record.value["decision_id"] in ingested:
                    m.promotions.labels(person.queue).inc()
                    m.assignments.labels(person.queue, person.owner).inc()
                    latency_s = max(0, self.now_ms - ingested[record.value["decision_id"]]) / 1000
                    m.decision_latency.labels(person.queue).observe(latency_s)
            if one_id in self.erasures:
                digests, absorbed_ids = self.erasures[one_id]
                repoints += [(d, one_id, "") for d in digests]
                self.store.mark_erased(
                    digests, person.erased_ms, identity.erasure_block_days * 86_400
                )
                self.store.drop_people(absorbed_ids)
                m.erasures.inc()
        self.store.repoint(repoints)
