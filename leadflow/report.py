"""``leadflow report``: the funnel and SDR performance, from the live topics or from files.

Reads ``leadflow.lifecycle`` and ``leadflow.decisions`` to their current end (or JSON-lines
files of the same records, e.g. a backtest's output), and prints the funnel overall and
per campaign, source and landing page, then SDR performance per queue
(:mod:`engine.funnel` computes it; ``--json`` prints it whole).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson

from engine.funnel import STAGES, funnel, grades, journeys, sdr_performance
from engine.settings import Settings
from leadflow import charts
from leadflow.watch import OutputWatcher


def read_json_lines(path: Path) -> Iterator[dict[str, Any]]:
    """The records of a JSON-lines file (blank lines skipped)."""
    with path.open("rb") as f:
        for line in f:
            if line.strip():
                yield orjson.loads(line)


def build_report(
    settings: Settings, lifecycle_file: Path | None = None, decisions_file: Path | None = None
) -> dict[str, Any]:
    """The report as data, from the files if given, else from the topics."""
    if lifecycle_file is not None:
        lifecycle = list(read_json_lines(lifecycle_file))
        decisions = list(read_json_lines(decisions_file)) if decisions_file else []
    else:
        watcher = OutputWatcher(settings)
        try:
            seen = watcher.read_to_end(timeout_s=120)
        finally:
            watcher.stop()
        lifecycle, decisions = list(seen.lifecycle.values()), list(seen.decisions.values())
    return {
        "funnel": funnel(journeys(lifecycle)),
        "sdr_performance": sdr_performance(decisions, lifecycle),
        "grades": grades(decisions),
        "records": {"lifecycle": len(lifecycle), "decisions": len(decisions)},
    }


def render(report: dict[str, Any], top: int = 10) -> str:
    """The report as text tables: the funnel overall and by group (largest first), SDRs."""
    lines = [
        f"{report['records']['lifecycle']} lifecycle records, "
        f"{report['records']['decisions']} decisions",
        "",
        "funnel (people reaching each stage; conversion to the next)",
    ]
    header = f"{'':<28}" + "".join(f"{s:>13}" for s in STAGES)
    funnel_ = report["funnel"]

    def row(name: str, figures: dict[str, Any]) -> str:
        counts, conversion = figures["counts"], figures["conversion"]
        cells = []
        for stage, nxt in zip(STAGES, [*STAGES[1:], ""], strict=True):
            rate = conversion.get(f"{stage}->{nxt}")
            cells.append(f"{counts[stage]:>6} {f'{rate:.0%}' if rate is not None else '':>5} ")
        return f"{name[:27]:<28}" + "".join(cells)

    lines += [header, row("all", funnel_["overall"])]
    medians = funnel_["overall"]["median_days"]
    lines.append(
        "median days: " + ", ".join(f"{k} {v}" for k, v in medians.items() if v is not None)
    )
    for group in ("campaign", "source", "landing_page"):
        by = funnel_[f"by_{group}"]
        largest = sorted(by.items(), key=lambda kv: -kv[1]["counts"]["lead"])[:top]
        lines += ["", f"by {group.replace('_', ' ')} (top {top} by leads)", header]
        lines += [row(name, figures) for name, figures in largest]
    by_grade = report.get("grades") or {}
    lines += [
        "",
        "decisions by grade: "
        + (", ".join(f"{g} {row['leads']}" for g, row in by_grade.items()) or "none"),
    ]
    lines += ["", "SDR performance"]
    lines.append(
        f"{'queue':<12}{'sdr':<16}{'decided':>8}{'accepted':>9}{'rejected':>9}"
        f"{'SLA breaches':>13}{'median min to accept':>22}"
    )
    for queue, sdrs in report["sdr_performance"].items():
        for sdr, s in sdrs.items():
            median = s["median_minutes_to_accept"]
            lines.append(
                f"{queue:<12}{sdr:<16}{s['decided']:>8}{s['accepted']:>9}"
                f"{sum(s['rejected'].values()):>9}{s['sla_breaches']:>13}"
                f"{'' if median is None else median:>22}"
            )
    return "\n".join(lines)


def write_html(report: dict[str, Any], path: Path) -> Path:
    """The report as one self-contained HTML page; returns its path.

    The funnel and the SDR load are inline SVG, and ``funnel.png`` and ``sdr_load.png``
    are written beside the page.
    """
    funnel_ = report["funnel"]
    load = {
        queue: {"leads": {sdr: row["decided"] for sdr, row in sdrs.items()}}
        for queue, sdrs in report["sdr_performance"].items()
    }
    svgs = charts.save(
        {
            "funnel": charts.funnel_chart(funnel_["overall"]["counts"]),
            "sdr_load": charts.load_chart(load, "Leads decided per SDR"),
        },
        path.parent,
    )
    sections = [("Funnel", charts.chart(svgs["funnel"]))]
    for group in ("campaign", "source", "landing_page"):
        rows = charts.funnel_rows(funnel_[f"by_{group}"])
        sections.append((f"By {group.replace('_', ' ')}", charts.table(charts.FUNNEL_HEADER, rows)))
    sections.append(
        (
            "Decisions by grade",
            charts.table(
                ["grade", "leads"], [[g, r["leads"]] for g, r in report["grades"].items()]
            ),
        )
    )
    sdr_rows = [
        [queue, sdr, s["decided"], s["accepted"], sum(s["rejected"].values()), s["sla_breaches"],
         s["median_minutes_to_accept"]]
        for queue, sdrs in report["sdr_performance"].items()
        for sdr, s in sdrs.items()
    ]  # fmt: skip
    sections.append(
        (
            "SDR performance",
            charts.chart(svgs["sdr_load"])
            + charts.table(
                ["queue", "sdr", "decided", "accepted", "rejected", "SLA breaches",
                 "median min to accept"],
                sdr_rows,
            ),
        )
    )  # fmt: skip
    records = report["records"]
    title = (
        f"Leadflow funnel ({records['lifecycle']:,} lifecycle records, "
        f"{records['decisions']:,} decisions)"
    )
    path.write_text(charts.page(title, sections), encoding="utf-8")
    return path
