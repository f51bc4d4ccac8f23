"""Same-batch orderings through the real dataflow: a promotion and what follows it in one batch.

Production reads a partition in batches, and every event of a batch is applied
before the batch's promotions are routed. Each test here produces a person's
whole sequence before the flow starts, so the flow reads it in one batch, and
checks the result is the one the same events give one at a time.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest

from engine import lifecycle
from engine.person import offsets_of
from engine.settings import Settings
from tests.integration.flow import (
    at,
    hot_lead,
    identify,
    outputs,
    person_of,
    queue_counts,
    run_flow,
    send,
)


def feedback(name: str, anon: str, t: float, **props: Any) -> dict[str, Any]:
    """A trusted sales event about the person behind cookie ``anon``."""
    return {
        "type": "track",
        "event": name,
        "messageId": f"fb-{name}-{anon}",
        "anonymousId": anon,
        "timestamp": at(t),
        "properties": {"actor": "crm-import", **props},
    }


def charged(settings: Settings) -> dict[str, int]:
    """Leads each SDR was charged with in Redis (SDRs with none left out)."""
    return {sdr: n for sdr, n in queue_counts(settings).items() if n}


def test_manual_mql_then_accepted_in_one_batch_ends_in_sal(settings: Settings) -> None:
    """The reproduction of the crash loop: a CRM import promotes and accepts at once."""
    send(settings, [identify("crm-0", "crm", "crm@acme.example")])
    send(
        settings,
        [feedback("manual_mql", "crm", 1), feedback("lead_accepted", "crm", 2)],
        topic=settings.topics.feedback,
        key="crm",
    )
    run_flow(settings, 1)
    person = person_of(settings, identify("crm-0", "crm", "crm@acme.example"))
    assert person.stage == lifecycle.SAL
    seen = outputs(settings)
    (decision,) = seen.decisions.values()
    assert decision["cause"] == "manual_mql" and person.owner == decision["sdr"]
    assert charged(settings) == {decision["sdr"]: 1}
    assert not person.timers  # accepted: no SLA, no demotion pending
    causes = [r["cause"] for r in seen.lifecycle.values()]
    assert causes == ["first_event", "manual_mql", "lead_accepted"]


FOLLOWERS: dict[str, tuple[dict[str, Any], str]] = {
    "lead_accepted": ({}, lifecycle.SAL),
    "lead_rejected": ({"reason": "timing"}, lifecycle.RECYCLED),
    "disqualify": ({}, lifecycle.DISQUALIFIED),
    "lost": ({}, lifecycle.RECYCLED),
    "recycle": ({}, lifecycle.RECYCLED),
}


@pytest.mark.parametrize("name", sorted(FOLLOWERS))
def test_a_promotion_followed_by_feedback_in_one_batch(settings: Settings, name: str) -> None:
    props, stage = FOLLOWERS[name]
    # All on the feedback topic (a CRM import), so one partition: one batch, in order.
    sequence = [*hot_lead("hot"), feedback(name, "hot", 5, **props)]
    send(settings, sequence, topic=settings.topics.feedback, key="hot")
    run_flow(settings, 1)
    person = person_of(settings, hot_lead("hot")[0])
    assert person.stage == stage
    seen = outputs(settings)
    # One decision, for the SDR whose count it spent, however the batch was cut.
    assert Counter(d["sdr"] for d in seen.decisions.values()) == charged(settings)
    assert len(seen.decisions) == 1
    assert not seen.dlq
    if stage != lifecycle.SAL:
        assert "sla" not in person.timers and not person.work  # out of the SDR's queue
    if stage == lifecycle.RECYCLED:
        assert not person.owner and set(person.timers) == {"nurture"}


def test_a_promotion_followed_by_a_cleansing_disqualification(settings: Settings) -> None:
    """A later event of the batch gives a competitor's address: the lead leaves sales."""
    events = hot_lead("cl")
    spoiler = {**identify("cl-9", "cl", "spy@salesforce.com", 9), "traits": {"phone": "12345678"}}
    send(settings, [*events, spoiler])
    run_flow(settings, 1)
    person = person_of(settings, events[0])
    seen = outputs(settings)
    assert person.stage == lifecycle.DISQUALIFIED and person.disqualified
    assert "sla" not in person.timers and not person.work
    # The decision was taken before the disqualifying event, as one at a time; the SDR
    # reads the disqualification on the lifecycle topic right after it.
    assert Counter(d["sdr"] for d in seen.decisions.values()) == charged(settings)
    causes = [r["cause"] for r in seen.lifecycle.values()]
    assert causes[-1].startswith("cleansing:")


def test_a_promotion_followed_by_a_flood_in_one_batch(settings: Settings) -> None:
    events = hot_lead("bot")
    flood = [
        {
            "type": "page",
            "messageId": f"bot-p{i}",
            "anonymousId": "bot",
            "timestamp": at(10),
            "properties": {"path": "/x"},
        }
        for i in range(130)
    ]
    send(settings, [*events, *flood])
    run_flow(settings, 1)
    person = person_of(settings, events[0])
    seen = outputs(settings)
    assert person.stage == lifecycle.DISQUALIFIED and person.disqualified == "rate_limited"
    assert Counter(d["sdr"] for d in seen.decisions.values()) == charged(settings)
    assert not person.timers
    # The flood's refusals neither fill the outbox nor the replay positions.
    assert sum(len(offsets_of(v)) for v in person.unsettled.values()) <= 4 + 121
