"""The benchmark workload: many people, Zipf-distributed activity, a realistic event mix.

``people`` buyers; each event picks its person by a Zipf law (a few people are
very active, most visit once or twice), and is a page view (85%), a scored
``track`` (10%) or an ``identify`` / form fill (5%) that names the person's
company e-mail, title, size and country. One person in ten browses on a second
device whose cookie the identify ties to the first: a merge. Countries spread
the leads over three queues (see :func:`bench_config`).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from engine.events import Event, Origin, decode_event
from engine.person import iso

PAGES = ["/", "/pricing", "/product/analytics/dashboards", "/product/routing", "/blog/decay"]
TRACKS = [
    "Whitepaper Downloaded",
    "Webinar Attended",
    "Demo Requested",
    "Contact Form Submitted",
    "Trade Show Visited",
]
COUNTRIES = ["BR", "MX", "DE", "AT", "US", "GB", "CN", "FR"]
TITLES = ["CTO", "Head of Sales", "Director of Marketing", "Engineer", "Analyst", "CEO"]
# Events start an hour ago: the engine pages an SDR only for leads still
# above the bar when it sees them (lifecycle.alert_late_promotions), so a fixed past
# date would turn every promotion into a late one as the date ages.
EPOCH_MS = (int(time.time()) // 3600 - 1) * 3_600_000
ZIPF_S = 1.0


def events(
    people: int, count: int, seed: int = 7, epoch_ms: int = EPOCH_MS
) -> Iterator[dict[str, Any]]:
    """``count`` events over ``people`` people, 50 ms apart from ``epoch_ms``, as Segment JSON."""
    rng = np.random.default_rng(seed)
    # Finite Zipf: the person of rank k is picked with probability ~ 1 / k^ZIPF_S;
    # shuffled so that rank is not the person id.
    weights = 1.0 / np.arange(1, people + 1) ** ZIPF_S
    ranks = rng.choice(people, size=count, p=weights / weights.sum())
    order = rng.permutation(people)
    who = order[ranks]
    kinds = rng.random(count)
    picks = rng.integers(0, 1 << 30, size=count)
    for n in range(count):
        p = int(who[n])
        pick = int(picks[n])
        second_device = p % 10 == 0 and pick % 2 == 1
        event: dict[str, Any] = {
            "messageId": f"m{n}",
            "anonymousId": f"c{p}{'b' if second_device else ''}",
            "timestamp": iso(epoch_ms + n * 50),
        }
        if kinds[n] < 0.85:
            event |= {"type": "page", "properties": {"path": PAGES[pick % len(PAGES)]}}
        elif kinds[n] < 0.95:
            event |= {
                "type": "track",
                "event": TRACKS[pick % len(TRACKS)],
                "properties": {"n": n},
            }
        else:
            event |= {
                "type": "identify",
                "traits": {
                    "email": f"buyer{p}@company{p % 5000}.example",
                    "title": TITLES[pick % len(TITLES)],
                    "company": {"name": f"Company {p % 5000}", "employee_count": 10 + p % 4000},
                    "country": COUNTRIES[p % len(COUNTRIES)],
                },
            }
        yield event


def decode(value: bytes | None, topic: str, now_ms: int) -> Event | None:
    """An input message as the engine's decoder sees it (None: it would go to the DLQ)."""
    event = decode_event(
        value,
        Origin(topic, 0, 0),
        ingested_ms=now_ms,
        trusted=False,
        max_bytes=32_768,
        max_future_skew_ms=86_400_000,
    )
    return event if isinstance(event, Event) else None


def encoded(
    people: int, count: int, seed: int = 7, epoch_ms: int = EPOCH_MS
) -> list[tuple[bytes, bytes]]:
    """The workload as ``(key, value)`` Kafka messages, keyed by cookie."""
    return [
        (str(e["anonymousId"]).encode(), orjson.dumps(e))
        for e in events(people, count, seed, epoch_ms)
    ]


ROUTING_EXTRA = """
[[routing.rules]]
name = "latam"
queue = "latam"
regions = ["latam"]

[[routing.rules]]
name = "dach"
queue = "dach"
regions = ["dach"]

[[routing.queues]]
name = "latam"
sla_minutes = 15

[[routing.queues]]
name = "dach"
sla_minutes = 15
"""


def engine_env(config: Path, bootstrap: str, redis_url: str, metrics_port: int) -> dict[str, str]:
    """The environment of a ``leadflow run`` on these servers: this config, fresh recovery."""
    return {
        **os.environ,
        "LEADFLOW_CONFIG_DIR": str(config),
        "LEADFLOW_KAFKA_BOOTSTRAP": bootstrap,
        "LEADFLOW_REDIS_URL": redis_url,
        "LEADFLOW_METRICS_PORT": str(metrics_port),
        "LEADFLOW_HEALTH_PORT": "0",
        "LEADFLOW_RECOVERY_DIR": tempfile.mkdtemp(prefix="leadflow-recovery-"),
        "LEADFLOW_ALLOW_SHIPPED_SALT": "1",  # made-up people
    }


def bench_config(into: Path) -> Path:
    """The shipped configuration plus two queues chosen by region and their SDRs.

    No rate limit per person: the Zipf law makes the busiest cookie send about
    one event in eight, which the limit would mostly refuse, and the peers we
    compare with apply no such limit.
    """
    shutil.copytree(Path(__file__).parents[1] / "config", into)
    engine = into / "engine.toml"
    engine.write_text(
        engine.read_text().replace("max_events_per_minute = 120", "max_events_per_minute = 0")
    )
    routing = into / "routing.toml"
    text = routing.read_text()
    head, sep, tail = text.partition("[lifecycle]")
    routing.write_text(head + ROUTING_EXTRA + "\n" + sep + tail)
    with (into / "roster.toml").open("a") as roster:
        for queue in ("latam", "dach"):
            for n in range(3):
                roster.write(f'\n[[sdrs]]\nid = "sdr-{queue}-{n}"\nqueue = "{queue}"\n')
    return into
