"""What a scoring model would have done on history, measured against what happened.

Pure figures over a backtest's records (:mod:`leadflow.backtest` produces them by
running the engine's own stages on the history): who was promoted, their scores at
promotion, the outcomes, and the SDRs' load. Definitions, stated once:

- The population is every person of the history (people merged away count under
  the survivor). A person is *won* when an outcome or a feedback event says so; a
  person without an outcome counts as not won.
- A person's behaviour score and fit are those of their first promotion, or, for
  people never promoted, at their latest event: what the model knew when it decided.
- AUC is the probability that a won person scores above a not-won one (ties count
  half), computed from ranks (Mann-Whitney U).
- Precision of "MQL" is the share of promoted people who won; recall the share of
  won people who were promoted.
- The Gini of SDR load is over the queue's SDRs, those given nothing included
  (0 = even, 1 = one SDR took everything).
"""

from __future__ import annotations

import statistics
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

WEEK_MS = 7 * 86_400_000
WON = "won"
OUTCOMES = ("won", "lost", "sql", "opportunity")


@dataclass(frozen=True)
class PersonResult:
    """One person of a backtest, as the figures need them."""

    one_id: str
    behavior_score: float
    fit: float
    promoted_ms: float | None  # the first promotion's event time, None if never
    first_ms: float | None  # the first event's time
    outcome: str = ""  # "" when nothing is known


def auc(scores: Sequence[float], positives: Sequence[bool]) -> float | None:
    """Area under the ROC curve of ``scores`` for ``positives``; None without both classes."""
    y = np.asarray(positives, dtype=bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if not n_pos or not n_neg:
        return None
    s = np.asarray(scores, dtype=float)
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(len(s))
    sorted_s = s[order]
    # Average ranks over ties: the tie's first and last positions, 1-based.
    _, first, counts = np.unique(sorted_s, return_index=True, return_counts=True)
    averaged = np.repeat(first + (counts + 1) / 2, counts)
    ranks[order] = averaged
    u = ranks[y].sum() - n_pos * (n_pos + 1) / 2
    return float(u / (n_pos * n_neg))


def gini(values: Iterable[float]) -> float | None:
    """Gini coefficient of non-negative ``values``; None when empty or all zero."""
    v = np.sort(np.asarray(list(values), dtype=float))
    if not len(v) or v.sum() == 0:
        return None
    n = len(v)
    index = np.arange(1, n + 1)
    return float((2 * (index * v).sum()) / (n * v.sum()) - (n + 1) / n)


def precision_recall(promoted: set[str], won: set[str]) -> tuple[float | None, float | None]:
    """Precision and recall of "promoted" against "won" (None where undefined)."""
    hit = len(promoted & won)
    return (
        hit / len(promoted) if promoted else None,
        hit / len(won) if won else None,
    )


def _rounded(x: float | None, digits: int = 4) -> float | None:
    return None if x is None else round(x, digits)


@dataclass
class ModelFigures:
    """The figures of one configuration on one history."""

    people: int
    won: int
    promoted: int
    auc_behavior_score: float | None
    auc_fit: float | None
    precision: float | None
    recall: float | None
    mqls_per_week: float | None
    hours_to_mql_median: float | None
    hours_to_mql_p90: float | None
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """Plain data for the JSON report."""
        return {
            "people": self.people,
            "won": self.won,
            "promoted": self.promoted,
            "auc_behavior_score": _rounded(self.auc_behavior_score),
            "auc_fit": _rounded(self.auc_fit),
            "precision": _rounded(self.precision),
            "recall": _rounded(self.recall),
            "mqls_per_week": _rounded(self.mqls_per_week, 2),
            "hours_to_mql_median": _rounded(self.hours_to_mql_median, 2),
            "hours_to_mql_p90": _rounded(self.hours_to_mql_p90, 2),
            **self.extra,
        }


def weeks_spanned(people: Iterable[PersonResult]) -> float:
    """The history's span in weeks, from its first to its last first-event (at least one day)."""
    firsts = [p.first_ms for p in people if p.first_ms is not None]
    if not firsts:
        return 1 / 7
    return max(max(firsts) - min(firsts), 86_400_000) / WEEK_MS


def model_figures(people: Sequence[PersonResult], weeks: float) -> ModelFigures:
    """AUC, precision, recall, volume and speed of one configuration's promotions."""
    won = {p.one_id for p in people if p.outcome == WON}
    promoted = {p.one_id for p in people if p.promoted_ms is not None}
    labels = [p.outcome == WON for p in people]
    precision, recall = precision_recall(promoted, won)
    hours = sorted(
        (p.promoted_ms - p.first_ms) / 3_600_000
        for p in people
        if p.promoted_ms is not None and p.first_ms is not None and p.promoted_ms >= p.first_ms
    )
    return ModelFigures(
        people=len(people),
        won=len(won),
        promoted=len(promoted),
        auc_behavior_score=auc([p.behavior_score for p in people], labels),
        auc_fit=auc([p.fit for p in people], labels),
        precision=precision,
        recall=recall,
        mqls_per_week=len(promoted) / weeks if weeks else None,
        hours_to_mql_median=statistics.median(hours) if hours else None,
        hours_to_mql_p90=float(np.percentile(hours, 90)) if hours else None,
    )


def sdr_load(
    decisions: Iterable[Mapping[str, Any]], roster: Mapping[str, Sequence[str]]
) -> dict[str, dict[str, Any]]:
    """Per queue: leads per SDR (first decision of each id) and the Gini of that load.

    ``roster`` names each queue's SDRs, so an SDR given nothing counts as 0.
    """
    seen: set[str] = set()
    per_queue: dict[str, Counter[str]] = {
        q: Counter(dict.fromkeys(s, 0)) for q, s in roster.items()
    }
    for d in decisions:
        if d.get("decision_id") in seen or not d.get("sdr"):
            continue
        seen.add(str(d.get("decision_id")))
        per_queue.setdefault(str(d.get("queue")), Counter())[str(d.get("sdr"))] += 1
    return {
        q: {"leads": dict(sorted(c.items())), "gini": _rounded(gini(c.values()))}
        for q, c in sorted(per_queue.items())
    }


def compare(a: Iterable[str], b: Iterable[str]) -> dict[str, Any]:
    """The people two configurations promote: both, only the first, only the second."""
    sa, sb = set(a), set(b)
    return {
        "both": len(sa & sb),
        "only_first": sorted(sa - sb),
        "only_second": sorted(sb - sa),
    }
