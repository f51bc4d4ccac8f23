"""The pictures of a backtest or funnel report: one self-contained HTML page, PNGs beside it.

Charts are drawn with matplotlib (the Agg backend: no display) and embedded in the
page as inline SVG, so the page opens with no network and no other file; each chart
is also written as a PNG for slides. The page's tables carry the same figures as
``report.json``.
"""

from __future__ import annotations

import html
import io
import itertools
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # before pyplot: no display here, none needed
import matplotlib.pyplot as plt
from matplotlib.figure import Figure

from engine.funnel import STAGES

WIDTH, HEIGHT = 7.0, 3.6  # inches; 100 dpi PNG: 700 x 360
# SVG text stays text (smaller, searchable); the page names a common font first.
# A fixed salt for the SVG's element ids: the same report gives the same page.
plt.rcParams.update(
    {
        "svg.fonttype": "none",
        "svg.hashsalt": "leadflow",
        "font.size": 9,
        "font.family": "DejaVu Sans",
    }
)


def funnel_chart(counts: Mapping[str, int], title: str = "Funnel") -> Figure:
    """People reaching each stage, with the conversion from the stage before."""
    fig, ax = plt.subplots(figsize=(WIDTH, HEIGHT))
    values = [counts.get(s, 0) for s in STAGES]
    bars = ax.bar(
        [s.upper() if len(s) <= 3 else s.title() for s in STAGES], values, color="#3b6ea5"
    )
    for i, (bar, v) in enumerate(zip(bars, values, strict=True)):
        rate = f"\n{v / values[i - 1]:.0%}" if i and values[i - 1] else ""
        ax.annotate(
            f"{v:,}{rate}", (bar.get_x() + bar.get_width() / 2, v), ha="center", va="bottom"
        )
    ax.set_ylabel("people")
    ax.set_title(title)
    ax.margins(y=0.25)
    fig.tight_layout()
    return fig


def sweep_chart(rows: Sequence[Mapping[str, Any]], current: float) -> Figure:
    """Precision and recall per MQL threshold, and the MQLs per week each would give."""
    fig, ax = plt.subplots(figsize=(WIDTH, HEIGHT))
    xs = [r["threshold"] for r in rows]
    for key, colour in (("precision", "#2a9d8f"), ("recall", "#e76f51")):
        ax.plot(
            xs,
            [r[key] if r[key] is not None else float("nan") for r in rows],
            "o-",
            color=colour,
            label=key,
        )
    ax.set_xlabel("MQL threshold (behaviour score)")
    ax.set_ylabel("precision / recall of MQL vs won")
    ax.set_ylim(0, 1.05)
    ax.axvline(current, color="grey", linestyle=":", label=f"configured ({current:g})")
    volume = ax.twinx()
    volume.bar(
        xs,
        [r["mqls_per_week"] or 0 for r in rows],
        width=_bar_width(xs),
        alpha=0.2,
        color="#3b6ea5",
    )
    volume.set_ylabel("MQLs per week (bars)")
    ax.set_zorder(volume.get_zorder() + 1)
    ax.patch.set_visible(False)
    ax.legend(loc="upper right")
    ax.set_title("Threshold sweep")
    fig.tight_layout()
    return fig


def _bar_width(xs: Sequence[float]) -> float:
    gaps = [b - a for a, b in itertools.pairwise(xs) if b > a]
    return 0.6 * min(gaps) if gaps else 1.0


def score_chart(won: Sequence[float], not_won: Sequence[float], threshold: float) -> Figure:
    """The behaviour score of won and not-won people (share of each group per bin)."""
    fig, ax = plt.subplots(figsize=(WIDTH, HEIGHT))
    top = max([*won, *not_won, threshold, 1.0])
    bins = [top * i / 30 for i in range(31)]
    for values, label, colour in ((not_won, "not won", "#9aa5b1"), (won, "won", "#2a9d8f")):
        if values:
            weights = [1 / len(values)] * len(values)
            ax.hist(
                values,
                bins=bins,
                weights=weights,
                alpha=0.6,
                label=f"{label} ({len(values):,})",
                color=colour,
            )
    ax.axvline(threshold, color="black", linestyle=":", label=f"MQL threshold ({threshold:g})")
    ax.set_xlabel("behaviour score at promotion (else at the last event)")
    ax.set_ylabel("share of the group")
    ax.legend()
    ax.set_title("Score distribution: won vs not won")
    fig.tight_layout()
    return fig


def load_chart(load: Mapping[str, Mapping[str, Any]], title: str = "SDR load") -> Figure:
    """Leads per SDR, per queue, with each queue's Gini."""
    fig, ax = plt.subplots(figsize=(WIDTH, HEIGHT))
    names, values, colours = [], [], []
    palette = ["#3b6ea5", "#e9c46a", "#2a9d8f", "#e76f51", "#8e7dbe"]
    for i, (queue, row) in enumerate(load.items()):
        for sdr, n in row["leads"].items():
            names.append(f"{queue}/{sdr}" if len(load) > 1 else sdr)
            values.append(n)
            colours.append(palette[i % len(palette)])
    ax.bar(range(len(values)), values, color=colours)
    ax.set_xticks(
        range(len(values)),
        names,
        rotation=60 if len(values) > 8 else 0,
        ha="right" if len(values) > 8 else "center",
        fontsize=7 if len(values) > 16 else 9,
    )
    ginis = ", ".join(f"{q}: {r['gini']}" for q, r in load.items() if r.get("gini") is not None)
    ax.set_title(f"{title} (Gini {ginis})" if ginis else title)
    ax.set_ylabel("leads")
    fig.tight_layout()
    return fig


def _svg(fig: Figure) -> str:
    buffer = io.StringIO()
    fig.savefig(buffer, format="svg", metadata={"Date": None})  # no date: same input, same page
    text = buffer.getvalue()
    return text[text.index("<svg") :]  # inline: no XML prolog or doctype


def save(charts: Mapping[str, Figure], out_dir: Path) -> dict[str, str]:
    """Write each chart as ``<name>.png``; return each as inline SVG text."""
    out_dir.mkdir(parents=True, exist_ok=True)
    svgs = {}
    for name, fig in charts.items():
        fig.savefig(out_dir / f"{name}.png", dpi=100)
        svgs[name] = _svg(fig)
        plt.close(fig)
    return svgs


def table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """An HTML table, every cell escaped."""

    def cell(v: Any) -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:,.4g}"
        return html.escape(f"{v:,}" if isinstance(v, int) else str(v))

    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


STYLE = """
body{font-family:'DejaVu Sans',Arial,sans-serif;margin:2em auto;max-width:60em;color:#222}
h1{font-size:1.5em}h2{font-size:1.15em;margin-top:1.6em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.6em 0;font-size:.85em}
td,th{border:1px solid #ccc;padding:.25em .6em;text-align:right}
th{background:#f2f4f7}td:first-child,th:first-child{text-align:left}
.chart svg{max-width:100%;height:auto}.note{color:#555;font-size:.85em}
"""


def page(title: str, sections: Sequence[tuple[str, str]]) -> str:
    """A whole HTML page: a title and ``(heading, html)`` sections; no external resource."""
    body = "".join(
        f"<section><h2>{html.escape(h)}</h2>{content}</section>" for h, content in sections
    )
    return (
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title><style>{STYLE}</style></head>"
        f"<body><h1>{html.escape(title)}</h1>{body}</body></html>"
    )


def chart(svg: str) -> str:
    """An inline SVG chart in its frame."""
    return f"<div class='chart'>{svg}</div>"


def funnel_rows(by: Mapping[str, Mapping[str, Any]], top: int = 12) -> list[list[Any]]:
    """Table rows of a funnel grouping (largest groups first): counts, then lead -> MQL."""
    largest = sorted(by.items(), key=lambda kv: -kv[1]["counts"]["lead"])[:top]
    return [
        [name, *(f["counts"][s] for s in STAGES), f["conversion"]["lead->mql"]]
        for name, f in largest
    ]


FUNNEL_HEADER = ["group", *STAGES, "lead→MQL"]
