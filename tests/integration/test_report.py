"""`leadflow report` on the live topics, after the real flow."""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

import orjson

from engine.settings import Settings
from leadflow.report import build_report
from tests.integration.flow import hot_lead, page, run_flow, send, track


def with_campaign(event: dict[str, Any], name: str) -> dict[str, Any]:
    return {**event, "context": {"campaign": {"name": name, "source": "google", "medium": "cpc"}}}


def test_the_report_counts_the_funnel_by_campaign_and_the_sdrs(settings: Settings) -> None:
    # Two buyers from "spring" (their first event a page view of /pricing), one visitor from "fall".
    for anon in ("r-1", "r-2"):
        send(settings, [with_campaign(page(f"{anon}-p", anon, "/pricing"), "spring"),
                        *hot_lead(anon, t=1)])  # fmt: skip
    send(settings, [with_campaign(page("r-3-p", "r-3", "/blog"), "fall")])
    run_flow(settings, 1)
    accepted = track("r-1-acc", "r-1", "lead_accepted", t=5)
    accepted["properties"] = {"actor": "sdr"}
    send(settings, [accepted], topic=settings.topics.feedback)
    run_flow(settings, 1)

    report = build_report(settings)
    by_campaign = report["funnel"]["by_campaign"]
    assert by_campaign["spring"]["counts"]["lead"] == 2
    assert by_campaign["spring"]["counts"]["mql"] == 2
    assert by_campaign["spring"]["counts"]["sal"] == 1
    assert by_campaign["spring"]["conversion"]["mql->sal"] == 0.5
    assert by_campaign["fall"]["counts"] == {
        "lead": 1,
        "mql": 0,
        "sal": 0,
        "sql": 0,
        "opportunity": 0,
        "customer": 0,
    }
    assert report["funnel"]["by_landing_page"]["/pricing"]["counts"]["lead"] == 2
    inbound = report["sdr_performance"]["inbound"]
    assert sum(s["decided"] for s in inbound.values()) == 2
    assert sum(s["accepted"] for s in inbound.values()) == 1

    printed = subprocess.run(
        [sys.executable, "-m", "leadflow.cli", "report"],
        env={**os.environ, "LEADFLOW_KAFKA_BOOTSTRAP": settings.kafka.bootstrap,
             "LEADFLOW_REDIS_URL": settings.redis.url},
        capture_output=True, text=True, timeout=120, check=True,
    ).stdout  # fmt: skip
    assert "by campaign" in printed and "spring" in printed and "SDR performance" in printed
    as_json = subprocess.run(
        [sys.executable, "-m", "leadflow.cli", "report", "--json"],
        env={**os.environ, "LEADFLOW_KAFKA_BOOTSTRAP": settings.kafka.bootstrap,
             "LEADFLOW_REDIS_URL": settings.redis.url},
        capture_output=True, text=True, timeout=120, check=True,
    ).stdout  # fmt: skip
    assert orjson.loads(as_json)["funnel"] == report["funnel"]
