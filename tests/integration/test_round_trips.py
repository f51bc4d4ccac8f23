"""The Redis round trips of a batch, as dataflows/pipeline.py's docstring states them.

The stages run against a real Redis whose every call is reported to the store's
observer (the hook the metrics use): a typical batch of known people and a
routing batch are counted call by call, and the typical batch must find the
states this worker saved still unchanged (the state cache) instead of decoding them.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
from prometheus_client import REGISTRY

from dataflows.metrics import metrics
from dataflows.stages import IdentityStage, PersonStage
from engine.events import Event, Origin, decode_event
from engine.person import DECISION, Output
from engine.routing import Assignment, Candidate
from engine.settings import Settings
from engine.state_cache import StateCache
from engine.store import RedisStore, StoreUnavailable
from tests.integration.flow import at, hot_lead, page

COOKIES = 40


def decoded(raw: list[dict[str, Any]], first_offset: int, trusted: bool = False) -> list[Event]:
    """The events as the decoder makes them, at consecutive offsets of one partition."""
    out = []
    for n, item in enumerate(raw):
        event = decode_event(
            orjson.dumps(item),
            Origin("leadflow.feedback" if trusted else "leadflow.events", 0, first_offset + n),
            ingested_ms=int(time.time() * 1000),
            trusted=trusted,
            max_bytes=32_768,
            max_future_skew_ms=86_400_000,
        )
        assert isinstance(event, Event)
        out.append(event)
    return out


class Counted:
    """The resolver and a person stage on one real store, and the calls (by operation) made."""

    def __init__(self, settings: Settings):
        self.store = RedisStore(settings.redis)
        self.identity = IdentityStage(settings, self.store)
        self.people = PersonStage(settings, self.store)
        self.calls: Counter[str] = Counter()
        self.store.observer = lambda op, _seconds, _failed: self.calls.update([op])

    def __call__(self, events: list[Event]) -> list[Output]:
        """Run a batch through both stages."""
        return self.people(self.identity(events))

    def take(self) -> Counter[str]:
        """The calls made since the last take."""
        calls, self.calls = self.calls, Counter()
        return calls


def server_calls(store: RedisStore) -> Counter[str]:
    """Commands the server was sent by clients, by name, so far (``INFO commandstats``).

    What the store's observer cannot see: a client library's own extra round trips,
    such as redis-py's ``SCRIPT EXISTS`` before every pipeline holding a script.
    Commands that scripts run count too; these tests look only at the client's.
    """
    stats = store.client.info("commandstats")
    return Counter({name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in stats.items()})


def kept_loads() -> float:
    """``leadflow_state_loads_total{how="kept"}`` in this process."""
    metrics()  # registered on first use
    return REGISTRY.get_sample_value("leadflow_state_loads_total", {"how": "kept"}) or 0.0


@pytest.fixture
def counted(settings: Settings) -> Iterator[Counted]:
    stages = Counted(settings)
    yield stages
    stages.store.close()


def test_a_batch_of_known_people_costs_two_round_trips_and_decodes_nobody(
    counted: Counted,
) -> None:
    first = decoded([page(f"a{i}", f"c{i}", "/") for i in range(COOKIES)], 0)
    counted(first)
    counted.take()
    kept = kept_loads()

    again = decoded([page(f"b{i}", f"c{i}", "/pricing") for i in range(COOKIES)], COOKIES)
    before = server_calls(counted.store)
    counted(again)
    calls = counted.take()
    sent = server_calls(counted.store) - before
    # On the wire too: two EVALSHA, and no SCRIPT EXISTS before them.
    assert (sent["mget"], sent["evalsha"]) == (0, 2), sent
    assert not [name for name in sent if name.startswith("script")], sent
    # Resolver: it wrote these cookies' owners itself (0), nothing to change in the graph
    # (0). Person stage: load (1), save (1). The done offsets were read less than a second ago.
    assert calls == Counter({"load": 1, "save": 1}), calls
    assert kept_loads() - kept == COOKIES  # every state was still the one saved, not decoded


def test_the_resolver_reads_again_what_it_cannot_know_still_holds(
    counted: Counted, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Owners kept between batches (engine.owner_cache) are read again after a restart,
    a failed batch or an erasure; the people found are the same."""
    cookies = [page(f"a{i}", f"c{i}", "/") for i in range(COOKIES)]
    people = {r.one_id for r in counted.identity(decoded(cookies, 0))}
    counted.take()
    counted.identity = IdentityStage(settings, counted.store)  # a restart: nothing kept
    again = decoded([page(f"b{i}", f"c{i}", "/") for i in range(COOKIES)], COOKIES)
    assert {r.one_id for r in counted.identity(again)} == people
    assert counted.take()["mget"] == 1
    assert len(counted.identity.owners) == COOKIES

    def unavailable(_writes: object) -> None:
        raise StoreUnavailable("Redis unavailable after 1 attempts")

    with monkeypatch.context() as m:  # the batch's writes fail: Redis may hold part of them
        m.setattr(counted.store, "write_graph", unavailable)
        with pytest.raises(StoreUnavailable):
            counted.identity(decoded([page("n", "new", "/")], 2 * COOKIES))
    assert len(counted.identity.owners) == 0
    assert {r.one_id for r in counted.identity(again)} == people
    assert counted.take()["mget"] == 2  # the failed batch's read, and this one's

    erase = {
        "type": "track",
        "event": "erase",
        "anonymousId": "c0",
        "messageId": "e",
        "timestamp": at(10),
    }
    counted.identity(decoded([erase], 0, trusted=True))
    assert "mget" not in counted.take()  # the erased cookie's owner was kept
    (reborn,) = counted.identity(decoded([page("z", "c0", "/", t=20)], 3 * COOKIES))
    assert counted.take()["mget"] == 1  # an erased identifier is not kept
    assert reborn.one_id not in people


def test_a_routing_batch_adds_lists_roster_assignment_and_a_second_round(
    counted: Counted,
) -> None:
    # The lead's last event promotes; an event after it waits for the second round.
    raw = [*hot_lead("hot"), page("after", "hot", "/")]
    out = counted(decoded(raw, 0))
    assert len([o for o in out if o.kind == DECISION]) == 1
    calls = counted.take()
    assert calls["lists_holding"] == 1 and calls["roster_if_changed"] == 1, calls
    assert calls["assign"] == 1, calls  # one script call per assignment, one round trip
    assert calls["load"] == 2 and calls["save"] == 2, calls  # the second round


def test_each_worker_thread_keeps_its_own_states(counted: Counted) -> None:
    """Worker threads of one process share the stage; a state one takes out is its own."""
    mine = counted.people.states
    theirs: list[StateCache] = []
    worker = threading.Thread(target=lambda: theirs.append(counted.people.states))
    worker.start()
    worker.join()
    assert counted.people.states is mine and theirs[0] is not mine


def test_scripts_the_server_lost_are_loaded_again(counted: Counted) -> None:
    """After a restart or SCRIPT FLUSH, the next script call loads it, alone or pipelined."""
    raw = [*hot_lead("one"), *hot_lead("two", t=1)]
    counted.store.client.script_flush()
    out = counted(decoded(raw, 0))
    assert len([o for o in out if o.kind == DECISION]) == 2
    counted.store.client.script_flush()
    # Two assignments: one pipeline of two EVALSHA, both refused, then loaded and sent again.
    requests = [
        Assignment("inbound", f"d{n}", "", (Candidate("sdr-x", 1.0, True, 0, 0, "d", "w"),))
        for n in range(2)
    ]
    assert counted.store.assign(requests) == ["sdr-x", "sdr-x"]
    assert counted.store.queue_counts("inbound")["sdr-x"] == 2
