"""Lifecycle timers and sales feedback against a real Redis, on an injected clock.

The identity and person stages run as the dataflow runs them; the clock is a
variable, and due timers come from the same poller the dataflow's timer input
uses. One test runs the real engine (``leadflow run``) on real time.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest
from msgspec.structs import replace

from dataflows.stages import IdentityStage, PersonStage
from dataflows.timers import LEASE_S, TimerPoller
from engine.events import Event, Origin, decode_event
from engine.person import DECISION, DLQ, LIFECYCLE, Output, Rulebook, current_scores, iso
from engine.settings import Settings
from engine.store import RedisStore
from leadflow.servers import LocalBroker, LocalRedis, free_port
from tests.conftest import local_settings
from tests.integration.flow import T0, hot_lead, outputs, person_of, send

START = datetime.fromisoformat(T0).timestamp() + 60  # a minute after the buyers' events
MINUTE, DAY = 60.0, 86_400.0


class Engine:
    """The two stages and the timer poller on one clock the test moves."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.now = START
        self.store = RedisStore(settings.redis)
        self.identity = IdentityStage(settings, self.store)
        self.people = PersonStage(settings, self.store, clock=lambda: self.now)
        self.poller = TimerPoller(self.store, clock=lambda: self.now)

    def send(self, *raw: dict[str, Any], trusted: bool = False) -> list[Output]:
        events = [_event(r, trusted, self.now) for r in raw]
        return self.people(self.identity(events))

    def at(self, seconds: float) -> list[Output]:
        """Move the clock to ``seconds`` after START and fire what is due."""
        self.now = START + seconds
        return self.people(self.poller.poll())


@pytest.fixture
def engine(settings: Settings) -> Iterator[Engine]:
    e = Engine(settings)
    yield e
    e.store.close()


def _event(raw: dict[str, Any], trusted: bool, now: float) -> Event:
    event = decode_event(
        orjson.dumps(raw),
        Origin("leadflow.feedback" if trusted else "leadflow.events", 0, 0),
        ingested_ms=int(now * 1000),
        trusted=trusted,
        max_bytes=32_768,
        max_future_skew_ms=400 * 86_400_000,
    )
    assert isinstance(event, Event), event
    return event


def feedback(name: str, anon: str, n: int = 0, **props: Any) -> dict[str, Any]:
    return {
        "type": "track",
        "event": name,
        "messageId": f"fb-{name}-{anon}-{n}",
        "anonymousId": anon,
        "properties": {"actor": "sdr-ana", **props},
    }


def decisions(outs: list[Output]) -> list[dict[str, Any]]:
    return [o.value for o in outs if o.kind == DECISION]


def causes(outs: list[Output]) -> list[str]:
    return [o.value["cause"] for o in outs if o.kind == LIFECYCLE]


def test_an_mql_not_accepted_in_time_goes_to_the_next_sdr_once(engine: Engine) -> None:
    (first,) = decisions(engine.send(*hot_lead("sla")))
    assert first["sla_deadline"] == iso(int(START * 1000) + 15 * 60_000)
    assert engine.at(15 * MINUTE - 1) == []  # not yet
    fired = engine.at(15 * MINUTE)
    (second,) = decisions(fired)
    assert causes(fired) == ["sla_breached"]
    assert second["sdr"] != first["sdr"] and second["breached"] == [first["sdr"]]
    assert second["replaces"] == first["decision_id"] != second["decision_id"]
    assert engine.at(16 * MINUTE) == []  # fired once
    assert engine.at(30 * MINUTE - 1) == []
    third = decisions(engine.at(30 * MINUTE))  # the second SDR did not accept either
    assert third[0]["sdr"] not in (first["sdr"], second["sdr"])


def test_an_accepted_mql_is_not_rerouted_and_the_audit_names_the_actor(engine: Engine) -> None:
    engine.send(*hot_lead("acc"))
    (accepted,) = engine.send(feedback("lead_accepted", "acc"), trusted=True)
    assert (accepted.value["from"], accepted.value["to"], accepted.value["actor"]) == (
        "mql",
        "sal",
        "sdr-ana",
    )
    assert engine.at(20 * MINUTE) == []
    assert engine.at(30 * DAY) == []  # no demotion of an accepted lead either


def test_demotion_happens_at_the_exact_moment_decay_crosses_the_threshold(
    engine: Engine,
) -> None:
    engine.send(*hot_lead("decay"))
    engine.send(feedback("lead_accepted", "other"), trusted=True)  # unrelated: no effect
    person = person_of(engine.settings, {"anonymousId": "decay"})
    due_ms = person.timers["demote"]
    # 105 points, half-life 30 days: below 100 after 30 * log2(1.05) days.
    assert 2.0 * DAY < due_ms / 1000 - START < 2.2 * DAY
    engine.at(due_ms / 1000 - START - 0.001)  # SLA fires meanwhile; no demotion yet
    assert person_of(engine.settings, {"anonymousId": "decay"}).stage == "mql"
    demoted = [o.value for o in engine.at(due_ms / 1000 - START) if o.kind == LIFECYCLE]
    assert [(r["from"], r["to"], r["cause"]) for r in demoted] == [
        ("mql", "recycled", "decay_below_threshold")
    ]
    assert demoted[0]["event_time"] == iso(due_ms)
    rules = Rulebook(engine.settings)
    after = person_of(engine.settings, {"anonymousId": "decay"})
    assert current_scores(after, rules)[""] < 100


def test_a_rejected_lead_is_recycled_then_nurtured_and_can_qualify_again(
    engine: Engine,
) -> None:
    (first,) = decisions(engine.send(*hot_lead("rej")))
    rejected = engine.send(feedback("lead_rejected", "rej", reason="timing"), trusted=True)
    assert [(o.value["to"], o.value["reason"]) for o in rejected] == [("recycled", "timing")]
    rules = Rulebook(engine.settings)
    person = person_of(engine.settings, {"anonymousId": "rej"})
    assert current_scores(person, rules)[""] == pytest.approx(52.5)  # 105 halved
    assert engine.at(30 * DAY - 1) == []
    back = engine.at(30 * DAY)
    assert causes(back) == ["nurture_reentry"]
    assert person_of(engine.settings, {"anonymousId": "rej"}).stage == "lead"
    # A month later the buyer is hot again: demo 50 + trade show 30 + 26.25 left = 106.25.
    again = engine.send(
        *[
            {
                "type": "track",
                "event": name,
                "messageId": f"rej-b{n}",
                "anonymousId": "rej",
                "properties": {"visit": 2},  # not the same form sent again
            }
            for n, name in enumerate(["Demo Requested", "Trade Show Visited"])
        ]
    )
    (second,) = decisions(again)
    assert second["decision_id"] != first["decision_id"] and second["promotion"] == 2


def test_a_rejection_for_a_disqualifying_reason_disqualifies(engine: Engine) -> None:
    engine.send(*hot_lead("spam"))
    out = engine.send(feedback("lead_rejected", "spam", reason="spam"), trusted=True)
    assert [o.value["to"] for o in out] == ["disqualified"]
    assert engine.at(40 * DAY) == []  # no timer outlives a disqualification


def test_an_illegal_transition_goes_to_the_dlq_and_changes_nothing(engine: Engine) -> None:
    engine.send(*hot_lead("won"))
    (refused,) = engine.send(feedback("won", "won"), trusted=True)
    assert refused.kind == DLQ and refused.value["reason"] == "illegal_transition"
    assert "mql -> customer" in refused.value["detail"]
    assert person_of(engine.settings, {"anonymousId": "won"}).stage == "mql"
    again = engine.send(feedback("won", "won"), trusted=True)
    assert again == [refused] and again[0].replayed  # a replay: the same record, marked so
    (unknown,) = engine.send(feedback("lead_accepted", "nobody"), trusted=True)
    assert unknown.kind == DLQ and "no lead is known" in unknown.value["detail"]
    assert RedisStore(engine.settings.redis).load_people([unknown.one_id])[0].state is None


def test_a_lead_waits_while_nobody_is_available_and_is_assigned_when_someone_is(
    engine: Engine, tmp_path: Path
) -> None:
    today = datetime.fromtimestamp(START, UTC).date().isoformat()
    roster = tmp_path / "roster.toml"
    roster.write_text(
        "".join(
            f'[[sdrs]]\nid = "{s}"\nqueue = "inbound"\nout_of_office = [["{today}", "{today}"]]\n'
            for s in ("sdr-ana", "sdr-bruno")
        )
    )
    from leadflow.roster import apply_roster

    apply_roster(engine.settings, roster)
    out = engine.send(*hot_lead("wait"))
    assert decisions(out) == [] and causes(out)[-1] == "waiting_for_sdr"
    (waiting,) = [o.value for o in out if o.value.get("cause") == "waiting_for_sdr"]
    retry_s = datetime.fromisoformat(waiting["retry_at"]).timestamp()
    assert (
        datetime.fromtimestamp(retry_s, UTC)
        .isoformat()
        .startswith(datetime.fromtimestamp(START + DAY, UTC).date().isoformat() + "T00:00")
    )
    assert engine.at(retry_s - START - 1) == []
    (assigned,) = decisions(engine.at(retry_s - START))
    assert assigned["sdr"] == "sdr-ana"


def test_the_running_engine_reroutes_on_real_time(tmp_path: Path) -> None:
    """``leadflow run`` with a 3-second SLA: the decision, then the re-route, on the topic."""
    config = tmp_path / "config"
    shutil.copytree(Path(__file__).parents[2] / "config", config)
    routing = config / "routing.toml"
    routing.write_text(routing.read_text().replace("sla_minutes = 15", "sla_minutes = 0.05"))
    with LocalBroker() as broker, LocalRedis("redis") as redis:
        assert isinstance(broker, LocalBroker) and isinstance(redis, LocalRedis)
        settings = local_settings(broker, redis)
        from leadflow.topics import create_topics

        create_topics(settings, partitions=1)
        env = {
            **os.environ,
            "LEADFLOW_KAFKA_BOOTSTRAP": broker.bootstrap,
            "LEADFLOW_REDIS_URL": redis.url,
            "LEADFLOW_METRICS_PORT": str(free_port()),
            "LEADFLOW_HEALTH_PORT": "0",
            "LEADFLOW_RECOVERY_DIR": str(broker.workdir / "recovery"),
            "LEADFLOW_CONFIG_DIR": str(config),
        }
        proc = subprocess.Popen(
            [sys.executable, "-m", "leadflow.cli", "run"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        try:
            send(settings, [{**e, "timestamp": None} for e in hot_lead("live")])
            deadline = time.monotonic() + 45
            seen = outputs(settings)
            while len(seen.decisions) < 2 and time.monotonic() < deadline:
                time.sleep(1)
                seen = outputs(settings)
        finally:
            proc.terminate()
            _, err = proc.communicate(timeout=30)
        ordered = sorted(seen.decisions.values(), key=lambda d: d["decided_at"])
        assert len(ordered) >= 2, err.decode()[-2000:]
        assert ordered[1]["replaces"] == ordered[0]["decision_id"]
        assert ordered[1]["breached"] == [ordered[0]["sdr"]]


def test_a_lead_nobody_can_take_moves_to_the_fallback_queue_after_max_wait(
    settings: Settings, tmp_path: Path
) -> None:
    routing = settings.routing
    inbound = replace(routing.queues[0], max_wait_minutes=10.0, fallback_queue="overflow")
    overflow = replace(routing.queues[0], name="overflow")
    cfg = replace(settings, routing=replace(routing, queues=(inbound, overflow)))
    # Away from START's day to the next: START is an hour ago, so the ten minutes may
    # cross midnight (UTC), when an away of one day would end and Ana take the lead.
    today = datetime.fromtimestamp(START, UTC).date()
    away = f'[["{today.isoformat()}", "{(today + timedelta(days=1)).isoformat()}"]]'
    roster = tmp_path / "roster.toml"
    roster.write_text(
        f'[[sdrs]]\nid = "sdr-ana"\nqueue = "inbound"\nout_of_office = {away}\n'
        '[[sdrs]]\nid = "sdr-olga"\nqueue = "overflow"\n'
    )
    from leadflow.roster import apply_roster

    apply_roster(cfg, roster)
    engine = Engine(cfg)
    try:
        out = engine.send(*hot_lead("fb"))
        assert decisions(out) == [] and causes(out)[-1] == "waiting_for_sdr"
        assert engine.at(10 * MINUTE - 1) == []
        moved = engine.at(10 * MINUTE)
        assert causes(moved) == ["fallback_queue"]
        (decision,) = decisions(moved)
        assert (decision["queue"], decision["sdr"]) == ("overflow", "sdr-olga")
    finally:
        engine.store.close()


def test_timers_survive_a_crash_between_the_save_and_their_scheduling(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    crashed = Engine(settings)

    def crash(*_: object) -> None:
        raise ConnectionError("the process died here")

    monkeypatch.setattr(crashed.store, "sync_timers", crash)
    with pytest.raises(ConnectionError):
        crashed.send(*hot_lead("crash"))  # saved, decided, but no timer in Redis yet
    assert crashed.store.due_timers(10**15, 10) == []
    restarted = Engine(settings)  # Bytewax replays the input since the last snapshot
    (decision,) = decisions(restarted.send(*hot_lead("crash")))  # re-emitted, same id
    assert restarted.at(15 * MINUTE)[0].value["cause"] == "sla_breached"
    assert decision["decision_id"]


def test_the_timers_of_a_person_merged_away_move_to_the_survivor(engine: Engine) -> None:
    """An MQL absorbed by a known user: its SLA fires once, for the survivor, and no entry is stale.

    Every scheduled timer belongs to a live (not redirected) person, the SLA of the
    absorbed MQL re-routes the survivor when due, and the set is empty of due
    entries afterwards (a stale one would come back every minute and, with
    enough of them, crowd every live timer out of the poll).
    """
    engine.send({"type": "page", "messageId": "u9-0", "userId": "u-9", "properties": {}})
    (first,) = decisions(engine.send(*hot_lead("mx")))
    merged = engine.send(
        {"type": "identify", "messageId": "u9-1", "userId": "u-9", "anonymousId": "mx"}
    )
    assert "merge" in causes(merged)
    survivor = person_of(engine.settings, {"anonymousId": "mx"})
    scheduled = engine.store.due_timers(10**15, 100)
    assert {o for o, _, _ in scheduled} == {survivor.one_id}
    assert {(k, due) for _, k, due in scheduled} == set(survivor.timers.items())
    assert engine.store.timers_pending() == len(survivor.timers)

    fired = engine.at(15 * MINUTE)
    (second,) = decisions(fired)
    assert second["replaces"] == first["decision_id"] and second["one_id"] == survivor.one_id
    assert engine.at(16 * MINUTE + LEASE_S) == []  # fired once, not again after the lease
    assert engine.store.due_timers(int((START + 17 * MINUTE + LEASE_S) * 1000), 100) == []


def test_timers_moved_or_cancelled_leave_the_timer_set(engine: Engine) -> None:
    engine.send(*hot_lead("cancel"))
    assert {k for _, k, _ in engine.store.due_timers(10**15, 100)} == {"sla", "demote"}
    engine.send(feedback("lead_accepted", "cancel"), trusted=True)
    assert engine.store.due_timers(10**15, 100) == []  # accepted: no SLA, no demotion
    assert engine.store.timers_pending() == 0
