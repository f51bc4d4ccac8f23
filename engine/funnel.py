"""The funnel marketing and sales look at, from the audit trail and the decisions.

Counts at each stage (lead, MQL, SAL, SQL, opportunity, customer) per campaign, source
and landing page; the conversion between consecutive stages; the median time between
them; and per queue and SDR: leads decided, accepted, rejected (by reason), SLA breaches
and the median time to accept.

A person counts at a stage if any record of theirs reached it (a recycled lead that was
an MQL counts as one). People merged away count under the survivor; a person is
attributed by its ``first_event`` record's ``attribution`` (what its first event said:
campaign, source, medium, landing page), or ``"(unknown)"`` for records from before the
engine wrote it. Times are event times, so a backfill or a backtest measures the
history, not the replay.
"""

from __future__ import annotations

import itertools
import statistics
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from engine.person import epoch_ms

STAGES = ("lead", "mql", "sal", "sql", "opportunity", "customer")
UNKNOWN = "(unknown)"
GROUPS = ("campaign", "source", "landing_page")


@dataclass
class Journey:
    """One person's way through the stages: when each was first reached (epoch ms)."""

    reached: dict[str, float] = field(default_factory=dict)
    attribution: dict[str, str] = field(default_factory=dict)


def journeys(lifecycle: Iterable[Mapping[str, Any]]) -> dict[str, Journey]:
    """Each surviving person's journey, from lifecycle records (any order, duplicates ok)."""
    people: dict[str, Journey] = defaultdict(Journey)
    absorbed: dict[str, str] = {}
    for r in lifecycle:
        one_id = str(r.get("one_id"))
        for other in _absorbed_by(r):
            absorbed[other] = one_id
        at = epoch_ms(r.get("event_time"))
        to = r.get("to")
        journey = people[one_id]
        if to in STAGES and at is not None:
            journey.reached[to] = min(journey.reached.get(to, at), at)
        if r.get("cause") == "first_event" and isinstance(r.get("attribution"), dict):
            journey.attribution = {k: str(v) for k, v in r["attribution"].items()}
    for gone, survivor in survivors(absorbed).items():
        if gone in people and survivor != gone:
            merged = people.pop(gone)
            keeper = people[survivor]
            for stage, at in merged.reached.items():
                keeper.reached[stage] = min(keeper.reached.get(stage, at), at)
            keeper.attribution = keeper.attribution or merged.attribution
    return dict(people)


def survivors(absorbed: Mapping[str, str]) -> dict[str, str]:
    """Each absorbed person's survivor, following chains of merges (cycles cut)."""
    out = {}
    for gone, into in absorbed.items():
        survivor, hops = into, 0
        while survivor in absorbed and hops < len(absorbed):
            survivor, hops = absorbed[survivor], hops + 1
        out[gone] = survivor
    return out


def merges(lifecycle: Iterable[Mapping[str, Any]]) -> dict[str, str]:
    """Who absorbed whom, from the ``merge`` lifecycle records: absorbed -> absorber."""
    return {other: str(r.get("one_id")) for r in lifecycle for other in _absorbed_by(r)}


def _absorbed_by(record: Mapping[str, Any]) -> list[str]:
    """Whom a ``merge`` record absorbed: the engine names one (a string); a list is read too."""
    if record.get("cause") != "merge":
        return []
    merged = record.get("merged_from")
    return [merged] if isinstance(merged, str) else [str(m) for m in merged or []]


def _stage_figures(group: list[Journey]) -> dict[str, Any]:
    counts = {s: sum(1 for j in group if s in j.reached) for s in STAGES}
    conversion, median_days = {}, {}
    for a, b in itertools.pairwise(STAGES):
        conversion[f"{a}->{b}"] = round(counts[b] / counts[a], 4) if counts[a] else None
        waits = [
            (j.reached[b] - j.reached[a]) / 86_400_000
            for j in group
            if a in j.reached and b in j.reached and j.reached[b] >= j.reached[a]
        ]
        median_days[f"{a}->{b}"] = round(statistics.median(waits), 3) if waits else None
    return {"counts": counts, "conversion": conversion, "median_days": median_days}


def funnel(people: Mapping[str, Journey]) -> dict[str, Any]:
    """The funnel overall and per campaign, source and landing page."""
    report: dict[str, Any] = {"overall": _stage_figures(list(people.values()))}
    for key in GROUPS:
        by: dict[str, list[Journey]] = defaultdict(list)
        for j in people.values():
            by[j.attribution.get(key) or UNKNOWN].append(j)
        report[f"by_{key}"] = {name: _stage_figures(g) for name, g in sorted(by.items())}
    return report


def sdr_performance(
    decisions: Iterable[Mapping[str, Any]], lifecycle: Iterable[Mapping[str, Any]]
) -> dict[str, dict[str, Any]]:
    """Per queue and SDR: decided, accepted, rejected by reason, SLA breaches, time to accept.

    A lead's SDR is the one of its latest decision before the feedback (a re-route after an
    SLA breach changes it); time to accept runs from that decision to the moment the
    engine recorded ``lead_accepted`` (both on the engine's clock).
    """
    held: dict[str, list[tuple[float, str, str]]] = defaultdict(list)  # one_id -> decisions
    seen: set[str] = set()
    stats: dict[str, dict[str, Any]] = defaultdict(lambda: defaultdict(_sdr_row))
    for d in decisions:
        if d.get("decision_id") in seen:
            continue  # re-emitted after a crash: the same decision
        seen.add(str(d.get("decision_id")))
        at = epoch_ms(d.get("decided_at"))
        queue, sdr = str(d.get("queue")), str(d.get("sdr"))
        if at is not None:
            held[str(d.get("one_id"))].append((at, queue, sdr))
        stats[queue][sdr]["decided"] += 1
    waits: dict[tuple[str, str], list[float]] = defaultdict(list)
    done: set[str] = set()
    for r in lifecycle:
        # Compared with decided_at, the engine's clock: recorded_at, not the event's time.
        cause, at = r.get("cause"), epoch_ms(r.get("recorded_at") or r.get("event_time"))
        if cause not in ("lead_accepted", "lead_rejected", "sla_breached") or at is None:
            continue
        if r.get("record_id") in done:
            continue
        done.add(str(r.get("record_id")))
        before = [h for h in held.get(str(r.get("one_id")), []) if h[0] <= at]
        if not before:
            continue
        decided_at, queue, sdr = max(before)
        if cause == "sla_breached":
            sdr = str(r.get("sdr") or sdr)
            stats[queue][sdr]["sla_breaches"] += 1
        elif cause == "lead_accepted":
            stats[queue][sdr]["accepted"] += 1
            waits[queue, sdr].append((at - decided_at) / 60_000)
        else:
            stats[queue][sdr]["rejected"][str(r.get("reason") or "unspecified")] += 1
    out: dict[str, dict[str, Any]] = {}
    for queue, sdrs in sorted(stats.items()):
        out[queue] = {}
        for sdr, row in sorted(sdrs.items()):
            w = waits.get((queue, sdr))
            out[queue][sdr] = {
                **row,
                "rejected": dict(row["rejected"]),
                "median_minutes_to_accept": round(statistics.median(w), 2) if w else None,
            }
    return out


def grades(
    decisions: Iterable[Mapping[str, Any]], won: Iterable[str] = ()
) -> dict[str, dict[str, int]]:
    """Leads per grade (A1 … D4) at their decisions (each decision once), and how many won."""
    winners = set(won)
    seen: set[str] = set()
    out: dict[str, dict[str, int]] = {}
    for d in decisions:
        if d.get("decision_id") in seen or not d.get("grade"):
            continue
        seen.add(str(d.get("decision_id")))
        row = out.setdefault(str(d["grade"]), {"leads": 0, "won": 0})
        row["leads"] += 1
        row["won"] += str(d.get("one_id")) in winners
    return dict(sorted(out.items()))


def _sdr_row() -> dict[str, Any]:
    return {"decided": 0, "accepted": 0, "rejected": Counter(), "sla_breaches": 0}
