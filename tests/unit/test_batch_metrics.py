"""A batch's tally counted into the metrics once per label: the same totals as its records."""

from __future__ import annotations

from collections import Counter

from dataflows.metrics import metrics
from dataflows.stages import count_batch
from engine.person import DECISION, LIFECYCLE
from tests.unit.test_batch import ITEMS, T0, Engine


def counted() -> dict[tuple[str, ...], float]:
    """Every sample of the counters count_batch adds to, by name and label values."""
    m = metrics()
    out: dict[tuple[str, ...], float] = {}
    for metric in (m.transitions, m.promotions, m.assignments, m.rejected):
        for family in metric.collect():
            for s in family.samples:
                if s.name.endswith("_total"):
                    out[(s.name, *s.labels.values())] = s.value
    return out


def added(before: dict[tuple[str, ...], float]) -> Counter[tuple[str, ...]]:
    return Counter({k: v - before.get(k, 0) for k, v in counted().items() if v != before.get(k, 0)})


def test_a_batch_counts_each_new_record_once_and_a_replay_nothing() -> None:
    engine = Engine()
    before = counted()
    records = engine.apply(ITEMS)
    assert engine.last is not None
    count_batch(engine.last.tally, T0)
    moves = Counter(
        (r.value["from"] or "none", r.value["to"])
        for r in records
        if r.kind == LIFECYCLE and r.value["from"] != r.value["to"]
    )
    decisions = [r for r in records if r.kind == DECISION]
    got = added(before)

    def total(name: str) -> float:
        return sum(n for k, n in got.items() if k[0] == name)

    assert {k[1:]: n for k, n in got.items() if k[0] == "leadflow_stage_transitions_total"} == moves
    assert total("leadflow_mql_promotions_total") == len(decisions) == 3
    assert total("leadflow_assignments_total") == 3
    before = counted()
    engine.apply(ITEMS)  # a replay: every record re-emitted, none new
    assert engine.last is not None
    count_batch(engine.last.tally, T0)
    assert not added(before)
