"""``leadflow tune``: propose points per scoring rule and a threshold, from history with outcomes.

The history runs through the engine once (:mod:`leadflow.backtest`, on event time), which
resolves every event to its person; :mod:`engine.tune` then fits a regularised logistic
model of "won" on what each person did (:mod:`engine.tune` says how). The proposal is
written for review and never applied:

- ``OUT/scoring.toml.diff``: a unified diff against the configuration's ``scoring.toml``,
  each changed line carrying its reason (the weight, and how many people the rule matched);
- ``OUT/config/``: the configuration with that ``scoring.toml``, loaded and validated, for
  ``leadflow backtest HISTORY --against OUT/config``;
- ``OUT/tune.json``: every weight and the cross-validated figures.

Decisions written down:

- **Scale.** The largest weight becomes :data:`TOP_POINTS` points; every other rule's
  points are on the same scale (points are log-odds times one factor), rounded to 0.5.
- **Threshold.** The score of the person ranked at the target volume (``--mqls-per-week``
  times the history's weeks; default: today's model's volume, else as many as won), so
  that many people would reach it. The engine's score decays and its MQL rule has more
  conditions than the score, so the backtest of the proposal is the real volume.
- **Candidate rules.** A campaign source or a page path becomes a proposed rule when at
  least :data:`MIN_SUPPORT_SHARE` of the people (and :data:`MIN_SUPPORT` people) have it:
  rarer values would be noise with points.
- Rules no event of the history matched, or matched equally for everyone, are left as
  they are (nothing to learn from), and so is a rule whose points would round to 0
  (a rule cannot score 0: removing it is for a person to decide).
"""

from __future__ import annotations

import difflib
import re
import shutil
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from engine.backtest import WON, auc, weeks_spanned
from engine.batch import Resolved
from engine.funnel import journeys, merges, survivors
from engine.person import Rulebook
from engine.scoring import _lookup
from engine.settings import ConfigError, ScoringRule, Settings, load_settings
from engine.tune import (
    L2_GRID,
    baseline_auc,
    cross_validated_auc,
    fit_logistic,
    fold_of,
    volume_threshold,
)
from leadflow.backtest import BATCH, Backtest, RunResult, read_outcomes, read_source

TOP_POINTS = 50.0
MIN_SUPPORT, MIN_SUPPORT_SHARE = 20, 0.005
SOURCE = "context.campaign.source"
_GLOB = re.compile(r"[*?\[\]]")


@dataclass(frozen=True)
class Column:
    """One feature: an existing rule (``rule`` set) or a proposed one."""

    name: str  # the rule's name in scoring.toml
    rule: ScoringRule | None = None
    source: str = ""  # proposed: a campaign source
    path: str = ""  # proposed: a page path

    @property
    def why(self) -> str:
        """What the column counts, for the diff's comments."""
        if self.rule is not None:
            return "awards"
        return f"source {self.source}" if self.source else f"viewed {self.path}"


def _slug(text: str, limit: int) -> str:
    return (re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_.-") or "blank")[:limit]


def features(
    result: RunResult, resolved: Sequence[Resolved], settings: Settings
) -> tuple[list[str], list[Column], np.ndarray]:
    """The people (One-IDs), the columns, and each person's count per column."""
    into = survivors(merges(result.records.lifecycle))
    people = [p.one_id for p in result.people]
    row = {o: i for i, o in enumerate(people)}
    model = Rulebook(settings).scoring
    counts: dict[tuple[int, str], int] = defaultdict(int)
    sources: dict[str, set[int]] = defaultdict(set)
    paths: dict[str, set[int]] = defaultdict(set)
    for r in resolved:
        i = row.get(into.get(r.key, r.key))
        if i is None:
            continue
        event = r.event
        for rule in model.matching_rules(event):
            counts[i, rule.name] += 1
        if event.type in ("page", "screen"):
            source = _lookup(event.payload, SOURCE)
            if isinstance(source, str) and source:
                sources[source].add(i)
            if event.path and not _GLOB.search(event.path):
                paths[event.path].add(i)
    columns = [Column(rule.name, rule) for rule in settings.scoring.rules]
    support = max(MIN_SUPPORT, int(MIN_SUPPORT_SHARE * len(people)))
    columns += [
        Column(f"source_{_slug(s, 50)}", source=s)
        for s in sorted(sources)
        if len(sources[s]) >= support
    ]
    columns += [
        Column(f"page_{_slug(p, 50)}", path=p) for p in sorted(paths) if len(paths[p]) >= support
    ]
    x = np.zeros((len(people), len(columns)))
    for j, c in enumerate(columns):
        if c.rule is not None:
            cap = c.rule.cap or 10**9
            for i in range(len(people)):
                x[i, j] = min(counts.get((i, c.name), 0), cap)
        else:
            for i in sources[c.source] if c.source else paths[c.path]:
                x[i, j] = 1.0
    used = [j for j in range(len(columns)) if x[:, j].any()]
    return people, [columns[j] for j in used], x[:, used]


def _points_line(old: str, points: float, reason: str) -> str:
    return re.sub(r"points = [-0-9.]+.*$", f"points = {points:g}  # tune: {reason}", old)


def proposed_scoring(
    text: str,
    changes: dict[str, tuple[float, str]],
    threshold: tuple[float, str],
    new_rules: list[str],
) -> str:
    """``scoring.toml``'s text with rule points, the threshold and new rules replaced/added."""
    lines = text.splitlines(keepends=True)
    current, in_scoring = "", False
    for n, line in enumerate(lines):
        stripped = line.strip()
        if stripped.startswith("["):
            in_scoring = stripped == "[scoring]"
            current = ""
        if m := re.match(r'name = "([^"]+)"', stripped):
            current = m.group(1)
        if in_scoring and stripped.startswith("mql_threshold ="):
            lines[n] = f"mql_threshold = {threshold[0]:g}  # tune: {threshold[1]}\n"
        if current in changes and stripped.startswith("points ="):
            points, reason = changes[current]
            lines[n] = _points_line(line.rstrip("\n"), points, reason) + "\n"
    out = "".join(lines)
    if new_rules:
        out += (
            "\n# Rules proposed by `leadflow tune` from the history's campaign sources and pages.\n"
        )
        out += "".join(new_rules)
    return out


def _new_rule(c: Column, points: float, reason: str) -> str:
    if c.source:
        match = f'path = "*"\nwhere = {{ "{SOURCE}" = [{orjson.dumps(c.source).decode()}] }}\n'
    else:
        match = f"path = {orjson.dumps(c.path).decode()}\n"
    return (
        f"\n[[scoring.rules]]  # tune: {reason}\n"
        f'name = "{c.name}"\ntype = "page"\n{match}'
        f"points = {points:g}\ncap = 1\ncap_period_days = 0\n"
    )


def _half(x: float) -> float:
    return round(x * 2) / 2


def run_tune(
    settings: Settings,
    config_dir: Path,
    history_path: Path | str,
    outcomes_path: Path | None,
    out_dir: Path,
    mqls_per_week: float | None,
    show_progress: bool = True,
) -> str:
    """Fit, propose, write the diff and the proposed configuration; return a summary."""
    history = read_source(history_path, settings)
    outcomes = read_outcomes(outcomes_path) if outcomes_path else []
    resolved: list[Resolved] = []
    with Backtest(history, BATCH, show_progress) as bt:
        result = bt.run(settings, outcomes, "tune", on_resolved=resolved.extend)
    people, columns, x = features(result, resolved, settings)
    y = np.array([p.outcome == WON for p in result.people])
    if not y.any() or y.all():
        raise ConfigError(
            "command line",
            "--outcomes",
            f"tune needs people who won and people who did not; {int(y.sum())} of {len(y)} won",
        )
    fold = fold_of(people)
    # A column equal for everyone (the form every Olist lead filled) says nothing of who
    # wins: it is not fitted, and its rule keeps its points (which still count below).
    varies = x.std(axis=0) > 0
    grid = {l2: cross_validated_auc(x[:, varies], y, fold, l2) for l2 in L2_GRID}
    l2 = max(grid, key=lambda k: grid[k] or 0.0)
    w = np.zeros(len(columns))
    w[varies] = fit_logistic(x[:, varies], y, l2)[:-1]
    attribution = [journeys_attr(result, key) for key in ("source", "landing_page")]
    baseline, source_alone = (
        baseline_auc(attribution, y, fold),
        baseline_auc(attribution[:1], y, fold),
    )
    weeks = weeks_spanned(result.people)
    promoted_now = sum(1 for p in result.people if p.promoted_ms is not None)
    target = mqls_per_week * weeks if mqls_per_week else (promoted_now or int(y.sum()))
    scale = TOP_POINTS / max(float(np.max(np.abs(w))), 1e-9)
    rule_points_all = np.array(
        [
            _half(float(weight * scale)) if fitted else (c.rule.points if c.rule else 0.0)
            for c, weight, fitted in zip(columns, w, varies, strict=True)
        ]
    )
    scores = x @ rule_points_all  # what the engine adds up with the proposed points (before decay)
    threshold = round(volume_threshold(scores, round(target)), 2)
    reached = int((scores >= threshold).sum())
    changes, new_rules, table = {}, [], []
    for c, weight, rule_points, column in zip(
        columns, w, rule_points_all.tolist(), x.T, strict=True
    ):
        points = float(rule_points)
        matched = int((column > 0).sum())
        reason = f"weight {weight:+.3f} log-odds per award; matched {matched} people"
        table.append(
            {
                "rule": c.name,
                "counts": c.why,
                "weight": round(float(weight), 4),
                "points": points,
                "people": matched,
            }
        )
        if c.rule is not None:
            # A rule cannot score 0: one the model finds worthless is left for a person to remove.
            if points not in (0, c.rule.points):
                changes[c.name] = (points, f"was {c.rule.points:g}; {reason}")
        elif points != 0:
            new_rules.append(_new_rule(c, points, reason))
    scoring_path = config_dir / "scoring.toml"
    text = scoring_path.read_text(encoding="utf-8")
    reason = (
        f"was {settings.scoring.mql_threshold:g}; {reached} of {len(scores)} people reach it"
        f" (target {target:.0f})"
    )
    proposed = proposed_scoring(text, changes, (threshold, reason), new_rules)
    proposal = out_dir / "config"
    if proposal.exists():
        shutil.rmtree(proposal)
    shutil.copytree(config_dir, proposal)
    (proposal / "scoring.toml").write_text(proposed, encoding="utf-8")
    load_settings(proposal)  # the proposal must be a valid configuration
    diff = "".join(
        difflib.unified_diff(
            text.splitlines(keepends=True),
            proposed.splitlines(keepends=True),
            f"{scoring_path}",
            f"{proposal / 'scoring.toml'} (proposed)",
        )
    )
    (out_dir / "scoring.toml.diff").write_text(diff, encoding="utf-8")
    figures: dict[str, Any] = {
        "people": len(people),
        "won": int(y.sum()),
        "l2": l2,
        "cv_auc_by_l2": {str(k_): v for k_, v in grid.items()},
        "cv_auc": grid[l2],
        "baseline_cv_auc_source_and_landing_page": baseline,
        "baseline_cv_auc_source": source_alone,
        "current_model_auc": auc([p.behavior_score for p in result.people], y.tolist()),
        "threshold": threshold,
        "target_mqls": round(target, 1),
        "people_reaching_threshold": reached,
        "weeks": round(weeks, 2),
        "rules": table,
    }
    (out_dir / "tune.json").write_bytes(orjson.dumps(figures, option=orjson.OPT_INDENT_2))
    return "\n".join(
        [
            f"{len(people)} people, {int(y.sum())} won, {len(columns)} rules and candidates",
            f"cross-validated AUC (5 folds): proposal {_f(grid[l2])}; baseline target-encoded "
            f"source + landing page {_f(baseline)}, source alone {_f(source_alone)}; "
            f"today's model {_f(figures['current_model_auc'])} (in-sample)",
            f"proposed threshold {threshold:g}: {reached} people reach it (target {target:.0f}) "
            f"({len(changes)} rules changed, {len(new_rules)} proposed)",
            f"review: {out_dir / 'scoring.toml.diff'}; try it: leadflow backtest {history_path} "
            f"--config {config_dir} --against {proposal}"
            + (f" --outcomes {outcomes_path}" if outcomes_path else ""),
        ]
    )


def _f(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def journeys_attr(result: RunResult, key: str) -> list[str]:
    """Each person's first-touch attribution ``key`` (source, landing page), in people order."""
    known = journeys(result.records.lifecycle)
    return [
        known[p.one_id].attribution.get(key, "") if p.one_id in known else "" for p in result.people
    ]
