"""The rule for a batch (engine.batch) on the in-memory store: cuts, replays, races, merges.

Production applies events in batches and replays them after a crash; these tests
check, without any server, that however a history is cut into batches and
whichever batches are applied twice, every person ends the same, every record
is emitted with the same content, and every decision charges one SDR once.
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Sequence
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from engine.batch import Batch, Resolved, Save, SaveStatus, batch_work
from engine.events import Event
from engine.memory_store import MemoryStore
from engine.person import DECISION, LIFECYCLE, Output, Rulebook, decode_state, encode_state
from engine.sales import apply_feedback
from engine.settings import load_settings
from engine.state_cache import StateCache

SETTINGS = load_settings(env={})
RULES = Rulebook(SETTINGS)
T0 = 1_793_000_000_000  # 26 Oct 2026; the default roster's SDRs work at any hour
BUYER = {"company": {"name": "Acme", "employee_count": 150}, "title": "CMO"}


def event(
    one_id: str, n: int, name: str = "", type_: str = "track", trusted: bool = False, **more: Any
) -> Event:
    """The ``n``-th event of the person ``one_id`` (its messageId and time follow from ``n``)."""
    payload: dict[str, Any] = {"properties": more}
    email = ""
    if type_ == "identify":
        email = f"{one_id}@{one_id}.example"
        payload = {"traits": {"email": email, **BUYER}}
    return Event(
        type=type_,
        message_id=f"{one_id}-{n}-{name}",
        event_ms=T0 + n * 60_000,
        ingested_ms=T0 + n * 60_000,
        name=name,
        anonymous_id=one_id,
        email=email,
        trusted=trusted,
        payload=payload,
    )


def history(people: Sequence[str]) -> list[Resolved]:
    """Each person turns hot (an MQL) and is then accepted or disqualified by sales, interleaved."""
    items: list[tuple[int, Resolved]] = []
    for i, one_id in enumerate(people):
        steps = [
            event(one_id, 0, type_="identify"),
            event(one_id, 1, "Demo Requested"),
            event(one_id, 2, "Webinar Attended"),
            event(one_id, 3, "Contact Form Submitted"),
            event(one_id, 4, "lead_accepted" if i % 2 else "disqualify", trusted=True),
            event(one_id, 5, "Pricing Page Viewed"),
        ]
        items += [(e.event_ms + i, Resolved(one_id, e)) for e in steps]
    return [r for _, r in sorted(items, key=lambda tr: tr[0])]


class Engine:
    """One worker applying batches to a store, as the person stage does."""

    def __init__(self, store: MemoryStore | None = None, cache_size: int = 100):
        self.store = store or MemoryStore()
        self.states = StateCache(cache_size)
        self.clock_s = T0 / 1000
        self.last: Batch | None = None  # the last batch applied, with its tally

    def apply(self, items: Sequence[Resolved]) -> list[Output]:
        """Apply one batch at event time."""
        batch = self.last = Batch(
            SETTINGS,
            RULES,
            self.store,
            self.states,
            lambda: SETTINGS.roster,
            {},
            lambda: self.clock_s,
            event_time=True,
        )
        return batch.apply(batch_work(items))

    def states_stored(self) -> dict[str, bytes]:
        """Every person's stored state bytes (versions left out: they are random)."""
        return {o: state for o, (_, state) in self.store.people.items()}

    def leads(self) -> dict[str, int]:
        """Leads charged per SDR in the inbound queue."""
        return dict(self.store.books("inbound").leads)


def by_person(records: Sequence[Output]) -> dict[str, list[tuple[str, Any]]]:
    """Each person's records in the order emitted (order across people may differ)."""
    out: dict[str, list[tuple[str, Any]]] = {}
    for r in records:
        out.setdefault(r.one_id, []).append((r.kind, r.value))
    return out


def cut(items: list[Resolved], cuts: Sequence[int]) -> list[list[Resolved]]:
    """``items`` cut at the given positions into consecutive batches."""
    edges = [0, *sorted(set(c % (len(items) + 1) for c in cuts)), len(items)]
    return [items[a:b] for a, b in itertools.pairwise(edges) if b > a]


ITEMS = history(["p1", "p2", "p3"])


def one_at_a_time() -> tuple[Engine, list[Output]]:
    engine = Engine()
    records = [r for item in ITEMS for r in engine.apply([item])]
    return engine, records


REFERENCE, REFERENCE_RECORDS = one_at_a_time()


def test_the_reference_history_promotes_everyone_once_and_charges_each_sdr_once() -> None:
    decisions = [r for r in REFERENCE_RECORDS if r.kind == DECISION]
    assert sorted(d.one_id for d in decisions) == ["p1", "p2", "p3"]
    assert REFERENCE.leads() == {"sdr-ana": 1, "sdr-bruno": 1, "sdr-chen": 1}
    stages = {o: decode_state(o, s).stage for o, s in REFERENCE.states_stored().items()}
    assert stages == {"p1": "disqualified", "p2": "sal", "p3": "disqualified"}


@settings(max_examples=60, deadline=None)
@given(
    cuts=st.lists(st.integers(0, 100), max_size=8),
    replays=st.lists(st.tuples(st.integers(0, 20), st.integers(1, 6)), max_size=3),
    cache_size=st.sampled_from([0, 1, 100]),
)
def test_any_cut_and_any_replay_end_as_one_event_at_a_time(
    cuts: list[int], replays: list[tuple[int, int]], cache_size: int
) -> None:
    """The batches of a random cut, with random stretches applied again (at-least-once)."""
    engine = Engine(cache_size=cache_size)
    first: list[Output] = []
    for batch in cut(ITEMS, cuts):
        first += engine.apply(batch)
    assert by_person([r for r in first if not r.replayed]) == by_person(REFERENCE_RECORDS)
    assert not [r for r in first if r.replayed]
    states, leads = engine.states_stored(), engine.leads()
    assert states == REFERENCE.states_stored() and leads == REFERENCE.leads()
    emitted = {(r.kind, r.one_id, repr(r.value)) for r in first}
    for start, length in replays:
        again = engine.apply(ITEMS[start : start + length])
        # A replay re-emits records already emitted, with the same content, and changes nothing.
        assert {(r.kind, r.one_id, repr(r.value)) for r in again} <= emitted
        assert engine.states_stored() == states and engine.leads() == leads


class RacingStore(MemoryStore):
    """A store where another worker disqualifies ``p1`` just before this one saves them."""

    def __init__(self) -> None:
        super().__init__()
        self.raced = False

    def save_people(self, saves: Sequence[Save]) -> list[SaveStatus]:
        for one_id, read, *_ in saves:
            if one_id == "p1" and read and not self.raced:
                self.raced = True
                version, state = self.people[one_id]
                person = decode_state(one_id, state, version)
                apply_feedback(person, event(one_id, 9, "disqualify", trusted=True), RULES, T0)
                self.people[one_id] = (version + 1, encode_state(person))
        return super().save_people(saves)


def test_a_save_that_loses_the_race_is_done_again_and_its_sdr_given_back() -> None:
    store = RacingStore()
    engine = Engine(store)
    records = engine.apply(ITEMS[:1]) + engine.apply(ITEMS[1:])
    # p1's promotion lost the race to the disqualification: done again, it promotes nobody.
    assert store.raced
    assert sorted(r.one_id for r in records if r.kind == DECISION) == ["p2", "p3"]
    assert decode_state("p1", engine.store.people["p1"][1]).stage == "disqualified"
    # The SDR it was assigned to was given back: two decisions, two leads.
    assert sum(engine.leads().values()) == 2
    assert len(engine.store.books("inbound").assigned) == 2
    others = by_person(records)
    assert {o: others[o] for o in ("p2", "p3")} == {
        o: by_person(REFERENCE_RECORDS)[o] for o in ("p2", "p3")
    }


def test_a_pending_absorption_is_folded_in_at_the_survivors_next_event() -> None:
    engine = Engine()
    engine.apply([i for i in ITEMS if i.one_id == "p2"][:4])  # an MQL waiting for acceptance
    engine.apply([Resolved("keep", event("keep", 1, "Demo Requested"))])
    gone = decode_state("p2", engine.store.people["p2"][1])
    gone_timers = {("p2", kind, due) for kind, due in gone.timers.items()}
    assert gone_timers and gone_timers <= engine.store.timers
    engine.store.merge("p2", "keep")  # what the resolver writes when it merges them
    records = engine.apply([Resolved("keep", event("keep", 7, "Contact Form Submitted"))])
    merges = [r.value for r in records if r.kind == LIFECYCLE and r.value["cause"] == "merge"]
    assert len(merges) == 1
    keep = decode_state("keep", engine.store.people["keep"][1])
    assert [m.one_id for m in keep.merged_from] == ["p2"]
    assert engine.store.pending["keep"] == set()
    # The absorbed person's timers, as scheduled, are struck off the set.
    assert not gone_timers & engine.store.timers
    # Applied again, the merge is not done twice.
    again = engine.apply([Resolved("keep", event("keep", 7, "Contact Form Submitted"))])
    assert again and all(r.replayed for r in again)
    keep = decode_state("keep", engine.store.people["keep"][1])
    assert [m.one_id for m in keep.merged_from] == ["p2"]


def test_a_person_on_the_blacklist_is_withheld_from_sales_and_charges_nobody() -> None:
    engine = Engine()
    engine.store.lists["blacklist"] = {"domain:p1.example"}
    records = engine.apply([i for i in ITEMS if i.one_id == "p1"])
    assert not [r for r in records if r.kind == DECISION]
    assert sum(engine.leads().values()) == 0
    assert Counter(r.value["cause"] for r in records if r.kind == LIFECYCLE)["first_event"] == 1
