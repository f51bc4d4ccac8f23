"""The stage latency histogram: counted a batch at a time, served as a Prometheus histogram."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from dataflows.metrics import StageLatency


def test_a_batch_is_counted_into_buckets_as_prometheus_counts_observations() -> None:
    registry = CollectorRegistry()
    latency = StageLatency("x_stage_latency_seconds", registry)
    # Ingested 0, 5 and 30 ms before now; 0 = no broker time: skipped; from the future: 0.
    latency.observe("applied", [10_000, 9_995, 9_970, 0, 10_004], now_ms=10_000)
    (family,) = text_string_to_metric_families(generate_latest(registry).decode())
    samples = {(s.name, s.labels.get("stage"), s.labels.get("le")): s.value for s in family.samples}
    applied = {le: v for (name, stage, le), v in samples.items() if stage == "applied" and le}
    assert applied["0.001"] == 2  # the 0 ms one and the one from the future
    assert applied["0.005"] == 3  # a bound counts in its own bucket (le)
    assert applied["0.025"] == 3 and applied["0.05"] == 4 and applied["+Inf"] == 4
    assert samples[("x_stage_latency_seconds_count", "applied", None)] == 4
    assert samples[("x_stage_latency_seconds_sum", "applied", None)] == 0.035
    assert samples[("x_stage_latency_seconds_count", "decoded", None)] == 0
