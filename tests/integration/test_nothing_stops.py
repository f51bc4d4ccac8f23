"""Nothing stops the engine and nothing is lost silently, through the real dataflow.

The poison-pill guard, client resends, late (backfilled) events, and a save that
loses a compare-and-set race after its SDR was taken.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.request import urlopen

import orjson
import pytest
from bytewax.errors import BytewaxRuntimeError
from msgspec.structs import replace

from dataflows.stages import IdentityStage, PersonStage
from engine import lifecycle
from engine.batch import SaveStatus
from engine.events import Event, Origin, decode_event
from engine.person import DECISION, decode_state, encode_state
from engine.settings import Settings
from engine.store import RedisStore
from leadflow.servers import free_port
from leadflow.topics import create_topics
from tests.integration.flow import hot_lead, outputs, person_of, queue_counts, run_flow, send


def corrupt(settings: Settings, anon: str) -> bytes:
    """Overwrite the stored state of the person behind ``anon`` with bytes no decoder reads."""
    person = person_of(settings, {"anonymousId": anon})
    store = RedisStore(settings.redis)
    try:
        bad = f"{person.version}|{{not json".encode()
        store.client.set(store.person_key(person.one_id), bad)
        return bad
    finally:
        store.close()


def test_one_persons_failing_events_go_to_the_dlq_and_the_stream_goes_on(
    settings: Settings,
) -> None:
    send(settings, hot_lead("poison")[:1])
    run_flow(settings, 1)
    bad = corrupt(settings, "poison")
    send(settings, [*hot_lead("poison")[1:], *hot_lead("healthy")])
    run_flow(settings, 1)
    seen = outputs(settings)
    (decision,) = seen.decisions.values()  # the healthy buyer's, untouched by the other
    assert decision["trigger"]["message_id"].startswith("healthy-")
    failed = [r for r in seen.dlq if r.reason == "processing_error"]
    # Every event of the failing person this run read (the flow reads the topic from the
    # start: its first event too), none of the other's.
    assert len(failed) == 4
    assert all(r.detail.startswith("JSONDecodeError") for r in failed)
    assert all(b"poison" in r.value for r in failed)  # the original event, to re-send
    store = RedisStore(settings.redis)
    try:
        one_id = person_of_key(store, settings, "poison")
        assert store.client.get(store.person_key(one_id)) == bad  # left as it was
    finally:
        store.close()


def person_of_key(store: RedisStore, settings: Settings, anon: str) -> str:
    from engine.identity import identifiers_of

    probe = Event(type="page", message_id="p", event_ms=0, ingested_ms=0, anonymous_id=anon)
    (one_id,), _ = store.owners([identifiers_of(probe, settings.identity)[0].digest])
    assert one_id is not None
    return one_id


def test_on_processing_error_stop_stops_the_flow(settings: Settings) -> None:
    stop = replace(settings, limits=replace(settings.limits, on_processing_error="stop"))
    send(stop, hot_lead("poison")[:1])
    run_flow(stop, 1)
    corrupt(stop, "poison")
    send(stop, hot_lead("poison")[1:])
    with pytest.raises(BytewaxRuntimeError):
        run_flow(stop, 1)


def test_a_client_resend_of_a_deciding_event_re_emits_nothing(settings: Settings) -> None:
    events = hot_lead("twice")
    # The tracker retried the promoting event twice (one run: a second run of the test
    # flow would read the topic again from the start, a replay, which does re-emit).
    send(settings, [*events, events[-1], events[-1]])
    run_flow(settings, 1)
    seen = outputs(settings)
    assert len(seen.decisions) == 1
    assert seen.duplicates == 0  # no record was emitted twice
    assert sum(queue_counts(settings).values()) == 1


def days_ago(days: float, seconds: float = 0) -> str:
    moment = datetime.now(UTC) - timedelta(days=days) + timedelta(seconds=seconds)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def test_a_backfill_of_old_events_pages_no_sdr_and_says_why(settings: Settings) -> None:
    old = [{**e, "timestamp": days_ago(200, n)} for n, e in enumerate(hot_lead("old"))]
    fresh = hot_lead("fresh")
    send(settings, [*old, *fresh])
    run_flow(settings, 1)
    seen = outputs(settings)
    (decision,) = seen.decisions.values()  # only the lead that is hot now
    assert decision["trigger"]["message_id"].startswith("fresh-")
    person = person_of(settings, old[0])
    assert person.stage == lifecycle.LEAD and not person.timers and not person.owner
    late = [r for r in seen.lifecycle.values() if r["cause"] == "late_promotion"]
    assert len(late) == 1 and late[0]["one_id"] == person.one_id
    assert late[0]["qualified_on"] == ["total"] and late[0]["score_now"] < 100


def test_alert_late_promotions_true_keeps_the_old_behaviour(settings: Settings) -> None:
    lc = replace(settings.lifecycle, alert_late_promotions=True)
    alerting = replace(settings, lifecycle=lc)
    send(alerting, [{**e, "timestamp": days_ago(200, n)} for n, e in enumerate(hot_lead("old"))])
    run_flow(alerting, 1)
    assert len(outputs(alerting).decisions) == 1


class RacingStore(RedisStore):
    """A real store whose first save of a person meets another worker's write.

    Just before the compare-and-set, another writer (here: the test, through the
    same Redis) saves a newer version of the person that has been disqualified,
    as a concurrent merge could. The save then conflicts and the batch goes round
    again from fresh reads, which no longer promote.
    """

    raced = False

    def save_people(self, saves: Any) -> list[SaveStatus]:
        if not self.raced:
            self.raced = True
            for one_id, version, new, _, _ in saves:
                theirs = decode_state(one_id, self.load_people([one_id])[0].state, version)
                theirs.disqualified, theirs.stage = "spam", lifecycle.DISQUALIFIED
                assert self.save_people([(one_id, version, new, encode_state(theirs), 0)]) == [0]
        return super().save_people(saves)


def test_an_assignment_whose_save_lost_a_race_charges_no_sdr(settings: Settings) -> None:
    store = RacingStore(settings.redis)
    identity, people = IdentityStage(settings, store), PersonStage(settings, store)
    now_ms = int(datetime.now(UTC).timestamp() * 1000)
    events = []
    for raw in hot_lead("race"):
        event = decode_event(
            orjson_bytes(raw),
            Origin("leadflow.events", 0, 0),
            ingested_ms=now_ms,
            trusted=False,
            max_bytes=32_768,
            max_future_skew_ms=86_400_000,
        )
        assert isinstance(event, Event)
        events.append(event)
    identity(events[:1])
    people(identity(events[:1]))  # the person exists: the race is on their next save
    out = people(identity(events[1:]))
    assert store.raced
    assert [o for o in out if o.kind == DECISION] == []  # the retry no longer promotes
    assert sum(queue_counts(settings).values()) == 0  # and nobody was charged for it
    store.close()


def orjson_bytes(raw: dict[str, Any]) -> bytes:
    return orjson.dumps(raw)


def test_a_broker_that_lost_its_data_is_read_again_and_every_new_event_scored(
    tmp_path: Path,
) -> None:
    """The embedded broker restarts (memory storage: its log is gone) under a running engine.

    Redis keeps the input's done offsets and people's positions from the old log;
    the broker reports the same cluster id. Every event sent afterwards must be
    scored, the reset logged, counted and shown by /readyz; and an engine started
    afterwards, whose stored position is beyond the new log's end, reads it from
    its start instead of skipping.
    """
    from tests.integration.test_reliability import rig, start_engine

    with rig(tmp_path, "lost") as r:
        health = free_port()
        r.env["LEADFLOW_HEALTH_PORT"] = str(health)
        create_topics(r.settings, partitions=1)
        proc = start_engine(r)
        try:
            before = [e for n in range(30) for e in hot_lead(f"old-{n}")]
            send(r.settings, before)
            wait_for(lambda: scored(r.settings, "old-29"), "the first events to be scored")
            r.broker.restart()
            create_topics(r.settings, partitions=1)
            after = [e for n in range(20) for e in hot_lead(f"new-{n}")]
            send(r.settings, after)
            wait_for(
                lambda: all(scored(r.settings, f"new-{n}") for n in range(20)),
                "every event sent after the broker restart to be scored",
            )
            ready = orjson.loads(urlopen(f"http://127.0.0.1:{health}/readyz", timeout=5).read())
            assert "beyond" in ready["input_resets"][0] or "after" in ready["input_resets"][0]
            scraped = urlopen(f"http://127.0.0.1:{r.settings.metrics.port}/metrics").read()
            assert b"leadflow_input_resets_total{" in scraped
            # The new log's done offset moves past what the next log will hold.
            wait_for(lambda: new_log_done(r.settings) >= 8, "the new log's done offset")
        finally:
            proc.send_signal(signal.SIGINT)
            assert proc.wait(60) == 0, r.log.read_text()[-3000:]
        # Restart the broker again while the engine is down: its stored position is now
        # beyond the end of the new, shorter log.
        r.broker.restart()
        create_topics(r.settings, partitions=1)
        send(r.settings, hot_lead("late-0"))
        proc = start_engine(r, "--stop-at-end")
        assert proc.wait(120) == 0, r.log.read_text()[-3000:]
        assert scored(r.settings, "late-0")
    log = r.log.read_text()
    assert log.count("input reset:") >= 2 and "beyond the partition's end" in log


def scored(settings: Settings, anon: str) -> bool:
    """Whether the hot lead behind ``anon`` has all 105 of its points."""
    from engine.identity import identifiers_of
    from engine.person import Rulebook, current_scores

    store = RedisStore(settings.redis)
    try:
        probe = Event(type="page", message_id="p", event_ms=0, ingested_ms=0, anonymous_id=anon)
        (one_id,), _ = store.owners([identifiers_of(probe, settings.identity)[0].digest])
        if one_id is None:
            return False
        stored = store.load_people([one_id])[0]
        person = decode_state(one_id, stored.state, stored.version)
        return current_scores(person, Rulebook(settings))[""] >= 100
    finally:
        store.close()


def new_log_done(settings: Settings) -> int:
    """The done offset of the input's second log (source names ending in ``.1``)."""
    store = RedisStore(settings.redis)
    try:
        return max((v for k, v in store.inputs_done().items() if k.endswith(".1")), default=-1)
    finally:
        store.close()


def wait_for(condition: Callable[[], bool], what: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"waited {timeout_s:.0f} s for {what}"
        time.sleep(0.2)


def test_on_input_reset_stop_refuses_to_start_with_exit_5(tmp_path: Path) -> None:
    """The broker lost its log while the engine was down, and the policy is to stop."""
    from tests.integration.test_reliability import finish, rig, start_engine

    with rig(tmp_path, "refuse") as r:
        create_topics(r.settings, partitions=1)
        send(r.settings, [e for n in range(5) for e in hot_lead(f"r-{n}")])
        finish(r)  # the recovery snapshot now holds position 20
        r.broker.restart()
        create_topics(r.settings, partitions=1)
        send(r.settings, hot_lead("r-9")[:1])
        engine = Path(r.env["LEADFLOW_CONFIG_DIR"]) / "engine.toml"
        engine.write_text(
            engine.read_text().replace('on_input_reset = "earliest"', 'on_input_reset = "stop"')
        )
        proc = start_engine(r, "--stop-at-end")
        assert proc.wait(120) == 5, r.log.read_text()[-3000:]
    (line,) = [x for x in r.log.read_text().splitlines() if x.startswith("leadflow: ")]
    assert "beyond the partition's end" in line and 'on_input_reset = "earliest"' in line
    assert "Traceback" not in r.log.read_text()
