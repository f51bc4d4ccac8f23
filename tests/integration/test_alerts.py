"""Webhook alerts against a real broker, a real Redis and a real HTTP receiver on loopback."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
from confluent_kafka import Consumer, TopicPartition
from msgspec.structs import replace

from dataflows.kafka_io import client_options
from engine.settings import QueueSettings, Settings
from engine.store import RedisStore
from leadflow.alerts import (
    AlertSender,
    RedriveCounts,
    parse_since,
    redrive,
    retry_delay,
    run_alerts,
    signature,
    verify,
)
from tests.integration.alert_rig import (
    ENV,
    FAST,
    SECRET,
    Receiver,
    decision,
    emit,
    hooked,
)
from tests.integration.flow import hot_lead, run_flow, send


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver().start()
    yield r
    r.stop()


def three_decisions(settings: Settings) -> set[str]:
    """Three real decisions made by the real flow; their ids."""
    send(settings, [e for n in range(3) for e in hot_lead(f"alert-{n}", t=n)])
    run_flow(settings, 1)
    return {d["decision_id"] for d in read_topic(settings, settings.topics.decisions)}


def read_topic(settings: Settings, topic: str) -> list[dict[str, Any]]:
    """Every record of ``topic`` as JSON, with its headers under ``_headers``."""
    consumer = Consumer({**client_options(settings), "group.id": "t", "enable.partition.eof": True})
    parts = consumer.list_topics(topic, timeout=10).topics[topic].partitions
    consumer.assign([TopicPartition(topic, p, 0) for p in parts])
    out, eof = [], 0
    while eof < len(parts):
        msg = consumer.poll(5)
        assert msg is not None
        if msg.error():
            eof += 1
        else:
            record = orjson.loads(msg.value() or b"")
            record["_headers"] = dict(msg.headers() or [])
            out.append(record)
    consumer.close()
    return out


def test_decisions_are_posted_signed_and_retried_until_delivered(
    settings: Settings, receiver: Receiver
) -> None:
    ids = three_decisions(settings)
    sending = hooked(settings, f"{receiver.url}/flaky")
    stats = run_alerts(sending, stop_at_end=True, env=ENV)
    assert (stats.delivered, stats.retries, stats.parked) == (3, 3, 0)
    assert sorted(receiver.delivered("/flaky")) == sorted(ids)
    for post in receiver.posts:
        assert verify(
            post.headers["X-Leadflow-Signature"], post.body, [SECRET.encode()], time.time()
        )
        assert orjson.loads(post.body)["decision_id"] == post.decision_id
    again = run_alerts(sending, stop_at_end=True, env=ENV)
    assert again.delivered == 0 and len(receiver.posts) == 6  # offsets were committed


def test_the_retry_schedule_doubles_with_jitter_up_to_its_cap() -> None:
    waits = [retry_delay(n, FAST, lambda: 1.0) for n in range(1, 6)]
    assert waits == [0.05, 0.1, 0.2, 0.2, 0.2]
    assert retry_delay(2, FAST, lambda: 0.0) == 0.05  # jitter: half the wait at least
    assert retry_delay(10_000, FAST, lambda: 0.5) == pytest.approx(0.15)  # no overflow


def test_a_decision_read_again_is_never_posted_twice(
    settings: Settings, receiver: Receiver
) -> None:
    """The engine re-emits a decision after a crash (same record, same id): sent once."""
    records = [decision(n) for n in range(5)]
    emit(settings, records)
    sending = hooked(settings, f"{receiver.url}/ok")
    assert run_alerts(sending, stop_at_end=True, env=ENV).delivered == 5
    emit(settings, records[:3])  # re-emitted
    again = run_alerts(sending, stop_at_end=True, env=ENV)
    assert (again.delivered, again.duplicates) == (0, 3)
    assert Counter(receiver.delivered()) == Counter(r["decision_id"] for r in records)


def test_parked_alerts_are_redriven_once_each(settings: Settings, receiver: Receiver) -> None:
    records = [decision(n) for n in range(3)]
    emit(settings, records)
    down = hooked(settings, f"{receiver.url}/down", alerts=replace(FAST, give_up_after_s=0.3))
    stats = run_alerts(down, stop_at_end=True, env=ENV)
    assert (stats.delivered, stats.parked) == (0, 3)
    assert stats.retries >= 3 * 3  # each tried on the schedule for 0.3 s before parking
    parked = read_topic(settings, settings.topics.parked_alerts)
    assert sorted(p["decision_id"] for p in parked) == sorted(r["decision_id"] for r in records)
    assert {p["_headers"]["leadflow.reason"] for p in parked} == {b"webhook_failed"}
    assert {p["_headers"]["leadflow.detail"] for p in parked} == {b"HTTP 503"}
    assert {p["_headers"]["leadflow.queue"] for p in parked} == {b"inbound"}

    back = hooked(settings, f"{receiver.url}/ok")
    assert redrive(back, queue="other", env=ENV).selected == 0
    assert redrive(back, since_ms=int(time.time() * 1000) + 60_000, env=ENV).selected == 0
    first = redrive(back, queue="inbound", since_ms=parse_since("1h", time.time()), env=ENV)
    assert (first.selected, first.delivered, first.failed) == (3, 3, [])
    second = redrive(back, env=ENV)
    assert (second.selected, second.delivered, second.duplicates) == (3, 0, 3)
    assert Counter(receiver.delivered()) == Counter(r["decision_id"] for r in records)
    store = RedisStore(settings.redis)
    counts = {
        s.labels["outcome"]: s.value for m in RedriveCounts(store).collect() for s in m.samples
    }
    store.close()
    assert counts == {"delivered": 3, "duplicate": 3}


def test_a_dead_webhook_holds_back_only_its_own_queue(
    settings: Settings, receiver: Receiver
) -> None:
    sending = hooked(
        settings,
        f"{receiver.url}/down",
        queues=("inbound", "partners"),
        alerts=replace(FAST, give_up_after_s=1.0),
    )
    partners = replace(sending.routing.queues[1], webhook_url=f"{receiver.url}/ok")
    sending = replace(
        sending, routing=replace(sending.routing, queues=(sending.routing.queues[0], partners))
    )
    emit(settings, [decision(n, q) for n in range(10) for q in ("inbound", "partners")])
    stats = run_alerts(sending, stop_at_end=True, env=ENV)
    assert (stats.delivered, stats.parked) == (10, 10)
    with receiver.lock:
        posts = list(receiver.posts)
    last_ok = max(i for i, p in enumerate(posts) if p.path == "/ok")
    down_before = sum(1 for p in posts[:last_ok] if p.path == "/down")
    # Every partners alert went out while inbound's were still on their first tries.
    assert down_before <= 3 * 10, f"{down_before} tries of the dead queue before the last ok"
    assert sum(1 for p in posts if p.path == "/down") > 3 * 10


def test_a_signature_covers_the_time_and_the_body_and_rotates() -> None:
    body = b'{"decision_id": "d1"}'
    new, old = b"new-secret", b"old-secret"
    header = signature([new, old], body, 1_800_000_000)
    assert header.startswith("t=1800000000,v1=") and header.count("v1=") == 2
    assert verify(header, body, [new], 1_800_000_000 + 299)  # a receiver on the new secret
    assert verify(header, body, [old], 1_800_000_000)  # one still on the old one
    assert not verify(header, body + b" ", [new], 1_800_000_000)  # another body
    assert not verify(header, body, [b"guess"], 1_800_000_000)
    assert not verify(header, body, [new], 1_800_000_000 + 301)  # a replay, too late
    forged = header.replace("t=1800000000", "t=1800000600")  # a fresh stamp: no match
    assert not verify(forged, body, [new], 1_800_000_600)


def test_a_webhook_without_a_secret_stops_start_up_unless_marked_unsigned(
    settings: Settings, receiver: Receiver
) -> None:
    from engine.settings import ConfigError

    with pytest.raises(ConfigError, match="LEADFLOW_WEBHOOK_SECRET is not set"):
        run_alerts(hooked(settings, f"{receiver.url}/ok"), stop_at_end=True, env={})
    unsigned = hooked(settings, f"{receiver.url}/ok", webhook_unsigned=True)
    emit(settings, [decision(n) for n in range(3)])
    stats = run_alerts(unsigned, stop_at_end=True, env={})
    assert stats.delivered == 3
    assert all("X-Leadflow-Signature" not in p.headers for p in receiver.posts)


def test_the_readme_receiver_verifies_what_the_sender_signs() -> None:
    import re
    from pathlib import Path

    readme = (Path(__file__).parents[2] / "README.md").read_text()
    match = re.search(r"```python\n(import hashlib, hmac, time\n.*?)```", readme, re.S)
    assert match, "the receiver is in the README"
    receiver: dict[str, Any] = {}
    exec(match.group(1), receiver)  # the README's own code, as a receiver would paste it
    body = b'{"decision_id": "d1"}'
    header = signature([b"new", b"old"], body, int(time.time()))
    assert receiver["verify"](header, body, b"old")
    assert not receiver["verify"](header, body, b"other")
    stale = signature([b"new"], body, int(time.time()) - 600)
    assert not receiver["verify"](stale, body, b"new")


def test_the_parked_series_exists_at_zero_before_the_first_parking(
    settings: Settings, receiver: Receiver
) -> None:
    """So `increase()` in the LeadflowWebhookFailures rule sees the first parking."""
    from prometheus_client import REGISTRY

    # A queue name no other test uses: its series can only come from the sender's start.
    AlertSender(hooked(settings, f"{receiver.url}/down", queues=("fresh",)), ENV).close()
    labels = {"queue": "fresh", "outcome": "parked"}
    assert REGISTRY.get_sample_value("leadflow_webhook_deliveries_total", labels) is not None


def test_slack_and_teams_receive_messages_of_their_published_structure(
    settings: Settings, receiver: Receiver
) -> None:
    import jsonschema

    from tests.integration.chat_schemas import SLACK_MESSAGE, TEAMS_MESSAGE

    crm = "https://crm.example.com/leads?leadflow={one_id}&d={decision_id}"
    slack = QueueSettings(
        "slack", webhook_url=f"{receiver.url}/ok", webhook_format="slack", lead_url=crm
    )
    teams = QueueSettings(
        "teams", webhook_url=f"{receiver.url}/ok", webhook_format="teams", lead_url=crm
    )
    routing = replace(settings.routing, queues=(slack, teams), default_queue="slack")
    sending = replace(hooked(settings, receiver.url), routing=routing)
    graded = decision(1, "slack", grade="A")
    unknown = decision(2, "teams", lead={}, channels=[], reasons=[])  # nothing known, no channel
    emit(settings, [graded, decision(1, "teams"), unknown])
    assert run_alerts(sending, stop_at_end=True, env=ENV).delivered == 3
    bodies = {p.decision_id: orjson.loads(p.body) for p in receiver.posts}

    message = bodies[graded["decision_id"]]
    jsonschema.validate(message, SLACK_MESSAGE)
    text = orjson.dumps(message).decode()
    for shown in (
        "acme1.com",
        "250 employees",
        "software",
        "BR",
        "director",
        "126.803",
        "*Grade*\\nA",
        "85 (minimum 25)",
        "email, phone",
        graded["sla_deadline"],
        "demo_request: 50 points",
        "Ana &lt;Souza&gt; &amp; co",
    ):
        assert shown in text, shown
    button = message["blocks"][-1]["elements"][0]
    assert (
        button["url"] == f"https://crm.example.com/leads?leadflow={graded['one_id']}&d=d0001-slack"
    )

    card = bodies["d0001-teams"]
    jsonschema.validate(card, TEAMS_MESSAGE)
    content = card["attachments"][0]["content"]
    facts = dict(
        (f["title"], f["value"])
        for b in content["body"]
        if b["type"] == "FactSet"
        for f in b["facts"]
    )
    assert facts["Company"] == "acme1.com" and facts["Channels"] == "email, phone"
    assert "Grade" not in facts  # only when the decision has one
    assert content["actions"][0]["url"].startswith("https://crm.example.com/leads?leadflow=")

    bare = bodies[unknown["decision_id"]]
    jsonschema.validate(bare, TEAMS_MESSAGE)
    facts = dict(
        (f["title"], f["value"])
        for b in bare["attachments"][0]["content"]["body"]
        if b["type"] == "FactSet"
        for f in b["facts"]
    )
    assert facts["Channels"] == "none: do not contact"
    assert facts["Company"].startswith("unknown")
    with pytest.raises(jsonschema.ValidationError):  # the schema does refuse a wrong message
        jsonschema.validate(
            {"blocks": [{"type": "header", "text": {"type": "mrkdwn", "text": "x"}}]}, SLACK_MESSAGE
        )
