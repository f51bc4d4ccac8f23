"""One-ID on the real dataflow, real broker and real Redis, with 2 workers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

import pytest

from engine.settings import Settings
from tests.integration.flow import (
    at,
    behavior_score,
    held_identifiers,
    identify,
    outputs,
    person_of,
    run_flow,
    send,
    track,
)


def alias(message_id: str, user_id: str, previous: str, t: float) -> dict[str, Any]:
    return {
        "type": "alias",
        "messageId": message_id,
        "userId": user_id,
        "previousId": previous,
        "timestamp": at(t),
    }


def inspect_cli(settings: Settings, identifier: str) -> subprocess.CompletedProcess[str]:
    """``leadflow inspect`` as a user runs it, against the test's Redis."""
    env = {**os.environ, "LEADFLOW_REDIS_URL": settings.redis.url}
    return subprocess.run(
        [sys.executable, "-m", "leadflow.cli", "inspect", identifier],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )


def test_concurrent_merges_on_two_workers_end_with_one_person_each(settings: Settings) -> None:
    """Each buyer browses on two devices; the devices' events land on different partitions and
    workers; an identify on each device ties it to the e-mail. Every buyer ends as one person
    whose score is the sum of all their events."""
    events: list[dict[str, Any]] = []
    for n in range(6):
        a, b = f"dev-a-{n}", f"dev-b-{n}"
        events += [
            track(f"{n}-1", a, "Demo Requested", 0),  # 50 on device a
            track(f"{n}-2", b, "Webinar Attended", 1),  # 25 on device b
            identify(f"{n}-3", a, f"buyer{n}@acme.example", 2),
            identify(f"{n}-4", b, f"buyer{n}@acme.example", 3),  # the same person on device b
            track(f"{n}-5", b, "Contact Form Submitted", 4),  # 30: 105 only if all are one
        ]
    send(settings, events, key="")  # no key: the broker spreads them over both partitions
    run_flow(settings, 2)
    seen = outputs(settings)

    assert len(seen.decisions) == 6  # every buyer qualified once, as one person
    for n in range(6):
        on_a = person_of(settings, {"anonymousId": f"dev-a-{n}"})
        on_b = person_of(settings, {"anonymousId": f"dev-b-{n}"})
        assert on_a.one_id == on_b.one_id
        assert behavior_score(settings, on_a) == pytest.approx(105.0, abs=0.01)
        ids = held_identifiers(settings, on_a)
        assert {k for k, _ in ids} == {"email", "anon"} and len(ids) == 3


def test_two_logins_on_one_computer_are_not_merged_and_the_refusal_is_recorded(
    settings: Settings,
) -> None:
    send(
        settings,
        [
            alias("s1", "user-ana", "shared-pc", 0),
            track("s2", "shared-pc", "Demo Requested", 1),
            alias("s3", "user-bruno", "shared-pc", 2),  # a second login on the same cookie
        ],
        key="shared-pc",
    )
    run_flow(settings, 2)
    seen = outputs(settings)

    refusals = [r for r in seen.lifecycle.values() if r["cause"].startswith("merge_refused:")]
    assert [r["cause"] for r in refusals] == ["merge_refused:conflicting_user_id"]
    ana = person_of(settings, {"userId": "user-ana"})
    bruno = person_of(settings, {"userId": "user-bruno"})
    assert ana.one_id != bruno.one_id
    assert behavior_score(settings, ana) == 50.0 and behavior_score(settings, bruno) == 0.0


def send_person_to_forget(settings: Settings) -> None:
    """A person known by cookie and e-mail, with 50 points, before any erasure."""
    send(
        settings,
        [
            identify("e1", "erase-me", "gone@acme.example", 0),
            track("e2", "erase-me", "Demo Requested", 1),
        ],
    )


def send_erase_request(settings: Settings) -> None:
    """A trusted erase request for the cookie, at 09:00:10."""
    erase = {"type": "track", "event": "erase", "messageId": "er-1", "anonymousId": "erase-me"}
    send(settings, [{**erase, "timestamp": at(10)}], topic=settings.topics.feedback)


def test_erasure_forgets_the_person_and_old_events_cannot_bring_them_back(
    settings: Settings,
) -> None:
    send_person_to_forget(settings)
    run_flow(settings, 2)
    send_erase_request(settings)
    send(settings, [track("e3", "erase-me", "Webinar Attended", 5)])  # older than the erasure
    run_flow(settings, 2)
    gone = inspect_cli(settings, "email:gone@acme.example")
    assert json.loads(gone.stdout) == {
        "identifier": "email:gone@acme.example",
        "erased_at": at(10).replace("+00:00", "Z"),
    }
    send(settings, [track("e4", "erase-me", "Whitepaper Downloaded", 20)])  # newer: a new lead
    run_flow(settings, 2)
    seen = outputs(settings)

    erased = [r for r in seen.lifecycle.values() if r["to"] == "erased"]
    assert len(erased) == 1 and erased[0]["cause"] == "erase"
    reborn = person_of(settings, {"anonymousId": "erase-me"})
    assert behavior_score(settings, reborn) == 15.0  # only the event after the erasure
    ids = held_identifiers(settings, reborn)
    assert ids and all(k == "anon" for k, _ in ids)


def test_an_erasure_racing_an_older_event_on_another_worker_still_wins(settings: Settings) -> None:
    """An erase and an older identify arrive at the same moment on two partitions: whichever
    the resolver sees first, the e-mail ends with nobody."""
    send_person_to_forget(settings)
    send_erase_request(settings)
    run_flow(settings, 2)
    gone = inspect_cli(settings, "email:gone@acme.example")
    # Erase first: the identify is older than the erasure and dropped, so nobody has the
    # e-mail (exit 1). Identify first: the erasure forgets it (an erasure mark, no person).
    assert gone.returncode == 1 or set(json.loads(gone.stdout)) == {"identifier", "erased_at"}


def test_inspect_shows_the_person_behind_any_identifier(settings: Settings) -> None:
    send(
        settings,
        [
            identify("i1", "dev-i", "Li.Wei+news@Initech.example", 0),
            track("i2", "dev-i", "Demo Requested", 1),
        ],
    )
    run_flow(settings, 1)
    result = inspect_cli(settings, "li.wei@initech.example")
    assert result.returncode == 0, result.stderr
    person = json.loads(result.stdout)
    assert person["identifier"] == "email:li.wei@initech.example"
    assert {i["kind"] for i in person["identifiers"]} == {"email", "anon"}
    assert [i.get("value") for i in person["identifiers"] if i["kind"] == "email"] == [
        "li.wei@initech.example"
    ]
    assert person["scores"]["total"]["at_last_event"] == 50.0
    assert person["scores"]["total"]["top"][0]["rule"] == "demo_request"
    assert person["stage"] == "lead"
