"""One-ID under concurrency, against a real Redis: the identity protocol itself.

As in the dataflow on 1, 2 or 4 workers: a random interleaving of the events
of a few people is cut into as many input partitions, each read by a reader
thread in random batch sizes; its identity lookup sends the events of people
already known straight to the person-stage thread of their One-ID's shard, and
the rest to the one resolver thread, which resolves them in random batches and
hands them on the same way; the person-stage threads, each with its own Redis
connection, work through their queues at the same time, in random batch sizes,
as Bytewax workers would, and report what they applied (the readers' done
offsets). Then a random part of the stream is replayed, as after a crash.
Whatever the order, the split and the replay, every person must end as one
One-ID holding all their identifiers, with the score a single-threaded
reference computes from all their events; and in the replay, when everyone is
known, no event needs the resolver.
"""

from __future__ import annotations

import itertools
import queue
import random
import threading
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any, TypeVar

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from msgspec import structs

from dataflows.pipeline import person_shard
from dataflows.stages import IdentityLookup, IdentityStage, PersonStage
from engine.batch import Resolved
from engine.events import Event, Origin, decode_event
from engine.identity import identifiers_of
from engine.person import PersonState, Rulebook, apply_event, current_scores, decode_state
from engine.settings import Settings, load_settings
from engine.store import RedisStore
from leadflow.servers import LocalRedis

T0 = 1_793_000_000_000
NAMES = ["Demo Requested", "Webinar Attended", "Whitepaper Downloaded", "Trade Show Visited"]
_prefixes = itertools.count()
T = TypeVar("T")


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    with LocalRedis("redis") as server:
        assert isinstance(server, LocalRedis)
        yield server.url


def person_events(p: int, rnd: random.Random, n_events: int) -> list[dict[str, Any]]:
    """One person's events: cookies, an e-mail, maybe a userId; tied by identifies and an alias."""
    cookies = [f"c{p}-{k}" for k in range(rnd.randint(1, 3))]
    email = f"person{p}@acme.example"
    events: list[dict[str, Any]] = []
    for n in range(n_events):
        kind = rnd.choice(["track", "track", "identify", "page"])
        event: dict[str, Any] = {
            "type": kind,
            "messageId": f"p{p}-{n}",
            "anonymousId": rnd.choice(cookies),
            "timestamp": _iso(rnd.randrange(0, 20 * 3_600_000)),
        }
        if kind == "track":
            event["event"] = rnd.choice(NAMES)
            event["properties"] = {"n": n}
        elif kind == "page":
            event["properties"] = {"path": rnd.choice(["/", "/pricing", "/customers/acme"])}
        else:
            event["traits"] = {"email": email}
        events.append(event)
    # Every cookie meets the e-mail at least once, so the person is connected.
    for k, cookie in enumerate(cookies):
        events.append(
            {
                "type": "identify",
                "messageId": f"p{p}-id{k}",
                "anonymousId": cookie,
                "timestamp": _iso(rnd.randrange(0, 20 * 3_600_000)),
                "traits": {"email": email},
            }
        )
    if p % 2 == 0:  # an alias from the first cookie to a login
        events.append(
            {
                "type": "alias",
                "messageId": f"p{p}-alias",
                "userId": f"user-{p}",
                "previousId": cookies[0],
                "timestamp": _iso(rnd.randrange(0, 20 * 3_600_000)),
            }
        )
    return events


def _iso(offset_ms: int) -> str:
    from engine.person import iso

    return iso(T0 + offset_ms)


def decode(raw: dict[str, Any], n: int) -> Event:
    event = decode_event(
        orjson.dumps(raw),
        Origin("leadflow.events", 0, n),
        ingested_ms=T0 + 86_400_000,
        trusted=False,
        max_bytes=32_768,
        max_future_skew_ms=86_400_000,
    )
    assert isinstance(event, Event), event
    return event


DONE = None  # end of a queue


class Progress:
    """Which events the person stages have applied: each reader's done offset."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.applied: dict[str, set[int]] = {}
        self.done_below: dict[str, int] = {}

    def apply(self, items: list[Resolved]) -> None:
        with self.lock:
            for item in items:
                source = item.event.source
                self.applied.setdefault(source, set()).add(item.event.offset)
                done = self.done_below.get(source, -1)
                while done + 1 in self.applied[source]:
                    done += 1
                self.done_below[source] = done

    def done(self, source: str) -> int:
        with self.lock:
            return self.done_below.get(source, -1)


def batches(inbox: queue.Queue[T | None], sizes: random.Random) -> Iterator[list[T]]:
    """Whatever has arrived, in random batch sizes, until the queue ends."""
    ended = False
    while not ended:
        batch: list[T] = []
        limit = sizes.randint(1, 12)
        item = inbox.get()
        while True:
            if item is None:
                ended = True
                break
            batch.append(item)
            if len(batch) >= limit or inbox.empty():
                break
            item = inbox.get()
        if batch:
            yield batch


def reader(
    settings: Settings,
    events: list[Event],
    progress: Progress,
    to_resolver: queue.Queue[Event | None],
    queues: list[queue.Queue[Resolved | None]],
    looked_up: list[int],
    sizes: random.Random,
) -> None:
    """One input partition's worker: known people straight to their shard, the rest on."""
    lookup = IdentityLookup(settings, None, progress.done)
    i = 0
    while i < len(events):
        n = sizes.randint(1, 12)
        known, unknown = lookup(events[i : i + n])
        looked_up.append(len(known))
        for item in known:
            queues[int(person_shard(item)) % len(queues)].put(item)
        for event in unknown:
            to_resolver.put(event)
        i += n


def resolver(
    settings: Settings,
    inbox: queue.Queue[Event | None],
    queues: list[queue.Queue[Resolved | None]],
    sizes: random.Random,
) -> None:
    """Resolve what the readers send, in random batches; hand each to its shard's queue."""
    identity = IdentityStage(settings, None)
    for batch in batches(inbox, sizes):
        for item in identity(batch):
            queues[int(person_shard(item)) % len(queues)].put(item)


def person_worker(
    settings: Settings,
    inbox: queue.Queue[Resolved | None],
    progress: Progress,
    sizes: random.Random,
) -> None:
    """Apply whatever has arrived, in random batch sizes, until the queue ends."""
    people = PersonStage(settings)
    for batch in batches(inbox, sizes):
        people(batch)
        progress.apply(batch)


def run_concurrently(
    settings: Settings, events: list[Event], workers: int, rnd: random.Random
) -> int:
    """``workers`` readers (each its own input partition), one resolver and ``workers``
    person stages over ``events``, all at once, as the dataflow runs them; how many
    events the lookups sent straight to their person."""
    queues: list[queue.Queue[Resolved | None]] = [queue.Queue() for _ in range(workers)]
    to_resolver: queue.Queue[Event | None] = queue.Queue()
    progress = Progress()
    errors: list[BaseException] = []
    looked_up: list[int] = []

    def thread(target: Callable[..., None], *args: Any) -> threading.Thread:
        def run() -> None:
            try:
                target(*args, random.Random(rnd.random()))
            except BaseException as e:  # surfaced by the test
                errors.append(e)

        started = threading.Thread(target=run)
        started.start()
        return started

    partitions = [[replace(e) for e in events[r::workers]] for r in range(workers)]
    for r, partition in enumerate(partitions):
        for offset, event in enumerate(partition):
            event.source, event.offset = f"part{r}", offset
    stages = [thread(person_worker, settings, q, progress) for q in queues]
    resolving = thread(resolver, settings, to_resolver, queues)
    readers = [
        thread(reader, settings, p, progress, to_resolver, queues, looked_up) for p in partitions
    ]
    for t in readers:
        t.join(60)
    to_resolver.put(DONE)
    resolving.join(60)
    for q in queues:
        q.put(DONE)
    for t in stages:
        t.join(60)
    assert not errors, errors
    return sum(looked_up)


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    st.integers(2, 4),
    st.integers(4, 14),
    st.sampled_from([1, 2, 4]),
    st.randoms(use_true_random=False),
)
def test_concurrent_workers_end_with_one_person_per_person_and_exact_scores(
    redis_url: str, people: int, n_events: int, workers: int, rnd: random.Random
) -> None:
    base = load_settings(env={"LEADFLOW_REDIS_URL": redis_url})
    cfg = structs.replace(
        base, redis=structs.replace(base.redis, key_prefix=f"t{next(_prefixes)}:")
    )
    truth = {p: person_events(p, rnd, n_events) for p in range(people)}
    events = [decode(e, n) for n, e in enumerate(e for evs in truth.values() for e in evs)]
    rnd.shuffle(events)
    run_concurrently(cfg, events, workers, rnd)
    replayed = events[rnd.randrange(len(events)) :]  # a crash: the tail comes again
    # Everyone is known by now: no replayed event needs the resolver.
    assert run_concurrently(cfg, replayed, workers, rnd) == len(replayed)

    store = RedisStore(cfg.redis)
    rules = Rulebook(cfg)
    try:
        finals: dict[int, str] = {}
        for p, raws in truth.items():
            evs = [decode(e, 0) for e in raws]
            digests = {i.digest for e in evs for i in identifiers_of(e, cfg.identity)}
            owners, _ = store.owners(sorted(digests))
            ends = {_final(store, o) for o in owners if o}
            assert len(ends) == 1 and None not in owners, f"person {p} is split: {ends}"
            (one_id,) = ends
            finals[p] = one_id
            stored = store.load_people([one_id])[0]
            person = decode_state(one_id, stored.state, stored.version)
            held = {d for _, d in store.identifiers(one_id)}
            assert held == digests  # every identifier recorded on the person
            reference = PersonState("ref", is_new=True)
            for e in sorted(evs, key=lambda e: e.event_ms):
                apply_event(reference, e, rules, T0)
            assert current_scores(person, rules) == pytest.approx(
                current_scores(reference, rules), rel=1e-9
            )
        assert len(set(finals.values())) == people  # nobody glued to anybody else
    finally:
        store.close()


def _final(store: RedisStore, one_id: str) -> str:
    while (redirect := store.load_people([one_id])[0].redirect) is not None:
        one_id = redirect
    return one_id


def test_one_identifier_people_need_no_identifier_hash_and_the_old_layout_reads_the_same(
    redis_url: str,
) -> None:
    """A new visitor's cookie key says it founded them (no ``ids`` hash). People stored
    the way the store wrote them before (the One-ID in the cookie key, the cookie in an
    ``ids`` hash) are read, extended and merged exactly as people stored the new way."""
    base = load_settings(env={"LEADFLOW_REDIS_URL": redis_url})
    cfg = structs.replace(
        base, redis=structs.replace(base.redis, key_prefix=f"t{next(_prefixes)}:")
    )
    store = RedisStore(cfg.redis)
    client, p = store.client, cfg.redis.key_prefix

    def event(n: int, anon: str, email: str = "") -> dict[str, Any]:
        raw: dict[str, Any] = {"type": "page", "messageId": f"m{n}", "anonymousId": anon}
        if email:
            raw |= {"type": "identify", "traits": {"email": email}}
        return raw | {"timestamp": _iso(n * 1000)}

    def strongest(raw: dict[str, Any]) -> str:
        return identifiers_of(decode(raw, 0), cfg.identity)[0].digest

    def cookie(anon: str) -> str:
        return strongest(event(0, anon))

    identity = IdentityStage(cfg, store)
    new, old = cookie("new-visitor"), cookie("old-visitor")
    (first,) = identity([decode(event(0, "new-visitor"), 0)])
    assert first.one_id == new
    assert client.get(f"{p}id:{{{new}}}") == b"anon"
    assert not client.exists(f"{p}ids:{{{new}}}")
    assert store.identifiers(new) == [("anon", new)]
    assert store.owners([new]) == ([new], [0])

    # Written as before: the One-ID in the cookie key, the cookie in the ids hash.
    client.set(f"{p}id:{{{old}}}", old)
    client.hset(f"{p}ids:{{{old}}}", f"anon:{old}", "")
    assert store.identifiers(old) == [("anon", old)]
    assert store.owners([old]) == ([old], [0])

    # The new visitor gives an e-mail; then each cookie is seen with it: the old-layout
    # person, then a third, new-layout person, are merged into the new visitor.
    third = cookie("third-visitor")
    resolved = identity(
        [
            decode(event(1, "new-visitor", "a@acme.example"), 1),
            decode(event(2, "third-visitor"), 2),
            decode(event(3, "old-visitor", "a@acme.example"), 3),
            decode(event(4, "third-visitor", "a@acme.example"), 4),
        ]
    )
    assert [(r.one_id, r.merges) for r in resolved] == [
        (new, ()),
        (third, ()),
        (new, (old,)),
        (new, (third,)),
    ]
    email = strongest(event(0, "x", "a@acme.example"))
    assert store.owners([new, old, third, email]) == ([new] * 4, [0] * 4)
    assert set(store.identifiers(new)) == {
        ("anon", new),
        ("anon", old),
        ("anon", third),
        ("email", email),
    }
    assert client.get(f"{p}id:{{{new}}}") == b"anon"  # still the founder
    assert client.get(f"{p}id:{{{third}}}") == new.encode()
    assert not client.exists(f"{p}ids:{{{old}}}", f"{p}ids:{{{third}}}")
    assert [n.redirect for n in store.graph([old, third])] == [new, new]
    store.close()
