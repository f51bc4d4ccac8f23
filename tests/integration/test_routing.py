"""SDR assignment on the real dataflow (2 workers), a real broker and a real Redis.

The last test checks the Lua script that assigns in Redis against the rule it
implements, engine.routing.assign_lead, over random sequences.
"""

from __future__ import annotations

import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from dataflows.stages import IdentityStage, PersonStage
from engine.events import Event, Origin, decode_event
from engine.routing import Assignment, Candidate, QueueBooks, assign_lead, release_lead
from engine.settings import RedisSettings, Settings
from engine.store import RedisStore
from leadflow.roster import apply_roster
from leadflow.servers import LocalRedis
from tests.integration.flow import hot_lead, outputs, person_of, queue_counts, run_flow, send

EQUAL = [{"id": s, "name": s, "queue": "inbound"} for s in ("sdr-ana", "sdr-bruno", "sdr-chen")]


def use_roster(settings: Settings, tmp_path: Path, sdrs: list[dict[str, Any]]) -> int:
    """Write ``sdrs`` as a roster file and apply it, as sales ops would."""
    lines = []
    for sdr in sdrs:
        lines.append("[[sdrs]]")
        for key, value in sdr.items():
            text = f'"{value}"' if isinstance(value, str) else str(value).replace("'", '"')
            lines.append(f"{key} = {text}")
    path = tmp_path / f"roster-{time.monotonic_ns()}.toml"
    path.write_text("\n".join(lines) + "\n")
    return apply_roster(settings, path)


def mqls(settings: Settings, n: int, prefix: str, company: str = "") -> None:
    """``n`` buyers who each become an MQL."""
    send(settings, [e for i in range(n) for e in hot_lead(f"{prefix}-{i}", t=i, company=company)])


def assigned(settings: Settings) -> Counter[str]:
    """How many decisions each SDR received on the decisions topic."""
    return Counter(d["sdr"] for d in outputs(settings).decisions.values())


def test_300_mqls_over_three_equal_sdrs_go_100_to_each(settings: Settings) -> None:
    mqls(settings, 300, "eq")
    run_flow(settings, 2)
    assert assigned(settings) == {"sdr-ana": 100, "sdr-bruno": 100, "sdr-chen": 100}
    assert queue_counts(settings) == {"sdr-ana": 100, "sdr-bruno": 100, "sdr-chen": 100}


def test_weights_2_1_1_split_300_mqls_150_75_75(settings: Settings, tmp_path: Path) -> None:
    use_roster(settings, tmp_path, [{**EQUAL[0], "weight": 2}, EQUAL[1], EQUAL[2]])
    mqls(settings, 300, "w")
    run_flow(settings, 2)
    assert assigned(settings) == {"sdr-ana": 150, "sdr-bruno": 75, "sdr-chen": 75}


def test_a_daily_cap_is_never_exceeded_and_the_others_wait(
    settings: Settings, tmp_path: Path
) -> None:
    use_roster(settings, tmp_path, [{**s, "daily_cap": 5} for s in EQUAL])
    mqls(settings, 20, "cap")
    run_flow(settings, 2)
    seen = outputs(settings)
    assert Counter(d["sdr"] for d in seen.decisions.values()) == {
        "sdr-ana": 5,
        "sdr-bruno": 5,
        "sdr-chen": 5,
    }
    waiting = [r for r in seen.lifecycle.values() if r["cause"] == "waiting_for_sdr"]
    assert len(waiting) == 5 and all(r["retry_at"] > r["recorded_at"] for r in waiting)


def test_an_sdr_out_of_office_gets_nothing_until_back_and_is_not_flooded(
    settings: Settings, tmp_path: Path
) -> None:
    today = datetime.now(UTC).date().isoformat()
    away = {**EQUAL[2], "out_of_office": [[today, today]]}
    use_roster(settings, tmp_path, [EQUAL[0], EQUAL[1], away])
    mqls(settings, 30, "ooo")
    run_flow(settings, 2)
    assert assigned(settings) == {"sdr-ana": 15, "sdr-bruno": 15}
    use_roster(settings, tmp_path, EQUAL)  # back
    mqls(settings, 30, "back")
    run_flow(settings, 2)
    assert assigned(settings) == {"sdr-ana": 25, "sdr-bruno": 25, "sdr-chen": 10}


def test_a_roster_change_mid_stream_keeps_the_remaining_rotation_fair(
    settings: Settings, tmp_path: Path
) -> None:
    mqls(settings, 150, "before")
    run_flow(settings, 2)
    assert assigned(settings) == {"sdr-ana": 50, "sdr-bruno": 50, "sdr-chen": 50}
    dana = {"id": "sdr-dana", "name": "Dana", "queue": "inbound"}
    use_roster(settings, tmp_path, [*EQUAL, dana])  # no restart: the next batch sees it
    mqls(settings, 100, "after")
    run_flow(settings, 2)
    assert assigned(settings) == {"sdr-ana": 75, "sdr-bruno": 75, "sdr-chen": 75, "sdr-dana": 25}


def test_a_company_with_an_owner_goes_to_that_owner(settings: Settings) -> None:
    mqls(settings, 4, "initech", company="initech.example")
    mqls(settings, 3, "solo")
    run_flow(settings, 2)
    decisions = outputs(settings).decisions.values()
    initech = {person_of(settings, {"anonymousId": f"initech-{i}"}).one_id for i in range(4)}
    owners = {d["sdr"] for d in decisions if d["one_id"] in initech}
    assert len(owners) == 1  # the first Initech buyer's SDR takes all four
    assert len([d for d in decisions if d["one_id"] not in initech]) == 3


def test_a_crash_between_the_redis_write_and_the_kafka_send_assigns_once(
    settings: Settings,
) -> None:
    """The person stage runs, its records are lost (the crash), and the batch comes again."""
    events = [_event(e, n) for n, e in enumerate(e for i in range(6) for e in hot_lead(f"c{i}"))]
    resolved = IdentityStage(settings, None)(events)
    first = [o for o in PersonStage(settings)(resolved) if o.kind == "decision"]
    again = [o for o in PersonStage(settings)(resolved) if o.kind == "decision"]
    assert len(first) == 6
    assert [(o.value["decision_id"], o.value["sdr"]) for o in again] == [
        (o.value["decision_id"], o.value["sdr"]) for o in first
    ]
    assert queue_counts(settings) == {"sdr-ana": 2, "sdr-bruno": 2, "sdr-chen": 2}


def _event(raw: dict[str, Any], n: int) -> Event:
    import orjson

    event = decode_event(
        orjson.dumps(raw),
        Origin("leadflow.events", 0, n),
        ingested_ms=int(time.time() * 1000),
        trusted=False,
        max_bytes=32_768,
        max_future_skew_ms=86_400_000,
    )
    assert isinstance(event, Event)
    return event


SDRS = ("sdr-a", "sdr-b", "sdr-c", "sdr-d")
candidate = st.builds(
    lambda name, weight, available, cap, day: Candidate(
        name, weight, available, cap, 0, f"2026-12-0{day}", "2026-W49"
    ),
    st.sampled_from(SDRS),
    st.sampled_from([0.5, 1.0, 2.0, 3.0]),
    st.booleans(),
    st.integers(0, 3),
    st.integers(1, 2),
)
step = st.one_of(
    st.tuples(
        st.just("assign"),
        st.integers(0, 12),  # the decision: repeats are asked again
        st.sampled_from(["", "acme.example", "globex.example"]),
        st.lists(candidate, min_size=1, max_size=4, unique_by=lambda c: c.sdr),
    ),
    st.tuples(st.just("release"), st.integers(0, 30)),
)


@hypothesis_settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(steps=st.lists(step, min_size=5, max_size=30))
def test_the_lua_assignment_chooses_as_assign_lead(
    redis_server: LocalRedis, steps: list[tuple[Any, ...]]
) -> None:
    """Redis' atomic twin of the rule answers, counts and levels exactly as engine.routing does."""
    store = RedisStore(RedisSettings(url=redis_server.url))
    queue = f"q{time.monotonic_ns()}"  # a queue of its own per example: no flush needed
    books = QueueBooks()
    given_out: list[tuple[Assignment, str]] = []
    try:
        for kind, *args in steps:
            if kind == "assign":
                number, company, sdrs = args
                request = Assignment(queue, f"d{number}", company, tuple(sdrs))
                (in_redis,) = store.assign([request])
                assert in_redis == assign_lead(books, request), steps
                if in_redis:
                    given_out.append((request, in_redis))
            elif given_out:
                request, sdr = given_out[args[0] % len(given_out)]
                assert store.release([(request, sdr)]) == int(release_lead(books, request, sdr))
            assert store.queue_counts(queue) == books.leads
        q = store.queue_key(queue)
        for (sdr, day), n in books.day_leads.items():
            assert int(store.client.get(f"{q}:d:{sdr}:{day}") or 0) == n
        for company, owner in books.company_owners.items():
            assert store.client.get(f"{q}:co:{company}") == owner.encode()
    finally:
        store.close()
