"""The real dataflow on a real broker and a real Redis, on 1 and 2 workers."""

from __future__ import annotations

from collections import Counter

import orjson
import pytest

from engine.settings import Settings
from tests.integration.flow import (
    at,
    behavior_score,
    hot_lead,
    identify,
    outputs,
    page,
    person_of,
    queue_counts,
    run_flow,
    send,
    track,
)


@pytest.fixture(params=[1, 2], ids=["1-worker", "2-workers"])
def workers(request: pytest.FixtureRequest) -> int:
    return int(request.param)


def test_crossing_the_threshold_alerts_exactly_once(settings: Settings, workers: int) -> None:
    events = [
        page("p1", "anon-a", "/pricing", 0),  # 1 + 10
        identify("p1b", "anon-a", "Ana.Souza@Acme.example", 5),  # fit 25: company e-mail and name
        track("p2", "anon-a", "Demo Requested", 10),  # 50
        track("p3", "anon-a", "Webinar Attended", 20),  # 25 -> 86
        track("p4", "anon-a", "Contact Form Submitted", 30),  # 30 -> 116: crosses here
        track("p5", "anon-a", "Demo Requested", 40),  # still an MQL: no second alert
        page("p6", "anon-a", "/pricing", 50),
    ]
    send(settings, events)
    run_flow(settings, workers)
    seen = outputs(settings)

    assert len(seen.decisions) == 1
    (decision,) = seen.decisions.values()
    assert decision["trigger"]["message_id"] == "p4"
    assert decision["stage"] == "mql"
    assert decision["queue"] == "inbound"
    assert decision["sdr"] in {s.id for s in settings.roster.sdrs}
    assert decision["threshold"] == 100.0
    assert decision["score"] == pytest.approx(
        116.0, abs=0.01
    )  # decay over 30 s of a 30-day half-life is ~1e-3
    assert [r["rule"] for r in decision["reasons"]] == [
        "demo_request",
        "contact_form",
        "webinar_attended",
    ]
    assert decision["channels"] == ["email"]
    assert decision["sla_deadline"] > decision["decided_at"]
    stages = sorted((r["from"] or "", r["to"]) for r in seen.lifecycle.values())
    assert stages == [("", "lead"), ("lead", "mql")]
    assert seen.dlq == []
    person = person_of(settings, events[0])
    assert person.stage == "mql"
    assert person.owner == decision["sdr"]


def test_three_consecutive_mqls_go_one_to_each_of_three_sdrs(
    settings: Settings, workers: int
) -> None:
    send(settings, [e for n in range(3) for e in hot_lead(f"anon-{n}", t=n * 100)])
    run_flow(settings, workers)
    seen = outputs(settings)

    assert Counter(d["sdr"] for d in seen.decisions.values()) == {
        "sdr-ana": 1,
        "sdr-bruno": 1,
        "sdr-chen": 1,
    }
    assert queue_counts(settings) == {"sdr-ana": 1, "sdr-bruno": 1, "sdr-chen": 1}


def test_malformed_message_goes_to_dlq_and_next_good_one_is_processed(
    settings: Settings, workers: int
) -> None:
    garbage = (
        b'{"type": "track", "event": "Demo Requested", "anonymousId": "anon-x"'  # truncated JSON
    )
    no_id = orjson.dumps({"type": "track", "event": "Demo Requested", "anonymousId": "anon-x"})
    send(settings, [garbage, no_id, *hot_lead("anon-x")])
    run_flow(settings, workers)
    seen = outputs(settings)

    assert sorted((r.reason, r.value) for r in seen.dlq) == [
        ("invalid_json", garbage),
        ("missing_message_id", no_id),
    ]
    assert len(seen.decisions) == 1


def test_duplicated_event_does_not_double_the_score(settings: Settings, workers: int) -> None:
    demo = track("dup-1", "anon-d", "Demo Requested", 0)  # 50 points; twice would make 100 = MQL
    send(settings, [demo, demo, dict(demo)])
    run_flow(settings, workers)
    seen = outputs(settings)

    assert seen.decisions == {}
    assert behavior_score(settings, person_of(settings, demo)) == pytest.approx(50.0)


def test_replaying_the_whole_input_changes_nothing(settings: Settings, workers: int) -> None:
    """A second run from offset 0 is what Bytewax recovery does after a crash, at its worst."""
    send(
        settings,
        [e for n in range(4) for e in hot_lead(f"anon-r{n}", t=n)]
        + [page("r-p", "anon-cold", "/")],
    )
    run_flow(settings, workers)
    first = outputs(settings)
    before = {
        e: behavior_score(settings, person_of(settings, {"anonymousId": e}))
        for e in ("anon-r0", "anon-cold")
    }

    run_flow(settings, workers)
    second = outputs(settings)

    assert second.decisions == first.decisions  # same ids, same SDRs, same everything
    assert second.lifecycle == first.lifecycle
    assert len(first.decisions) == 4
    assert sum(queue_counts(settings).values()) == 4  # no lead assigned twice
    assert second.duplicates > 0  # the replay re-emitted its records, with the same ids
    after = {
        e: behavior_score(settings, person_of(settings, {"anonymousId": e}))
        for e in ("anon-r0", "anon-cold")
    }
    assert after == before


def test_identify_joins_a_cookie_and_an_email_into_one_person(
    settings: Settings, workers: int
) -> None:
    send(
        settings,
        [
            track("j1", "anon-j", "Demo Requested", 0),  # 50 on the cookie
            {
                "type": "identify",
                "messageId": "j2",
                "anonymousId": "anon-j",
                "timestamp": at(1),
                "traits": {"email": "Jun@Initech.example", "company": "Initech"},
            },
            # the same person from another device, known only by e-mail:
            {
                "type": "track",
                "event": "Contact Form Submitted",
                "messageId": "j3",
                "timestamp": at(2),
                "properties": {"email": "  jun@initech.example "},
            },
            {
                "type": "track",
                "event": "Webinar Attended",
                "messageId": "j4",
                "timestamp": at(3),
                "traits": {"email": "jun@initech.example"},
            },
        ],
        key="anon-j",  # one partition, so the order holds; merging two people is the One-ID issue's
    )
    run_flow(settings, workers)
    seen = outputs(settings)

    assert len(seen.decisions) == 1  # 50 on the cookie + 55 by e-mail: only together >= 100
    leads = [r for r in seen.lifecycle.values() if r["to"] == "lead"]
    assert len(leads) == 1


def test_a_junk_lead_is_disqualified_on_the_audit_trail_and_never_alerts(
    settings: Settings, workers: int
) -> None:
    junk = hot_lead("anon-junk")
    junk[0]["traits"]["phone"] = "+86 133 3333 3333"  # a made-up Chinese mobile
    send(settings, junk + hot_lead("anon-real"))
    run_flow(settings, workers)
    seen = outputs(settings)

    assert len(seen.decisions) == 1
    (decision,) = seen.decisions.values()
    assert decision["fit"] >= decision["fit_minimum"] == 25.0
    assert {f["factor"] for f in decision["fit_reasons"]} >= {"company_email", "has:company_name"}
    disqualified = [r for r in seen.lifecycle.values() if r["to"] == "disqualified"]
    assert [(r["from"], r["cause"]) for r in disqualified] == [("lead", "cleansing:fake_phone")]
    assert disqualified[0]["one_id"] != decision["one_id"]
