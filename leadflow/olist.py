"""Olist's public B2B funnel as a Leadflow history: events, outcomes and a configuration.

``python -m leadflow.olist SRC OUT`` reads Olist's "Marketing Funnel" data set
(Olist, on Kaggle as ``olistbr/marketing-funnel-olist``, CC BY-NC-SA 4.0: attribution,
non-commercial, share-alike; used here for evaluation only) from ``SRC`` and writes to
``OUT``:

- ``events.jsonl``: per marketing-qualified lead, what its first contact was in Segment
  terms — a ``page`` view of its landing page (``/lp/<landing_page_id>``) carrying the
  origin as ``context.campaign.source`` (``unknown`` when blank), then a
  ``Contact Form Submitted`` track a second later: Olist's MQL is a seller who filled a
  landing page's form. The ``userId`` is the ``mql_id``. Olist gives the date only; the
  time of day is spread over 09:00-18:00 UTC by a hash of the id (stable, so the history
  is the same every time), and lines are in time order.
- ``outcomes.csv``: ``user:<mql_id>,won`` for the 842 closed deals, ``lost`` for the
  others (not closed within the data).
- ``config/``: the shipped configuration with two changes Olist's data forces, and no
  other: the roster is Olist's 32 SDRs of the closed deals (``sdr-`` and the first 8 hex
  digits of ``sdr_id``, always available, one queue), and the MQL rule asks for no fit
  or profile field (``min_fit = 0``, ``required_fields = []``): Olist's records carry no
  e-mail, title or company size.
- ``facts.json``: figures of the data itself: leads, won, SDR load of Olist's own deals
  and its Gini.

The closed deals' descriptive columns (segment, lead type, revenue...) exist only for
won leads, so they are never turned into events: a model could not know them in advance.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import re
import shutil
import sys
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path

import orjson

from engine.backtest import gini
from engine.settings import DEFAULT_CONFIG_DIR

LEADS = "olist_marketing_qualified_leads_dataset.csv"
DEALS = "olist_closed_deals_dataset.csv"
ATTRIBUTION = (
    "Olist, Marketing Funnel by Olist (Kaggle: olistbr/marketing-funnel-olist), "
    "CC BY-NC-SA 4.0. Converted by leadflow.olist."
)


def _moment(mql_id: str, day: str) -> datetime:
    """A stable time of day between 09:00 and 18:00 UTC on ``day``."""
    seconds = int(hashlib.blake2b(mql_id.encode(), digest_size=4).hexdigest(), 16) % (9 * 3600)
    return datetime.fromisoformat(day).replace(tzinfo=UTC) + timedelta(hours=9, seconds=seconds)


def _iso(moment: datetime) -> str:
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def sdr_id(olist_sdr: str) -> str:
    """Our id of an Olist SDR."""
    return f"sdr-{olist_sdr[:8]}"


def convert(src: Path, out: Path, limit: int = 0) -> dict[str, object]:
    """Write the history, outcomes, configuration and facts; return the facts.

    ``limit`` keeps only the first ``limit`` leads by first contact (and their deals):
    the reduced form the tests use.
    """
    with (src / LEADS).open(newline="", encoding="utf-8") as f:
        leads = sorted(
            csv.DictReader(f),
            key=lambda r: (_moment(r["mql_id"], r["first_contact_date"]), r["mql_id"]),
        )
    if limit:
        leads = leads[:limit]
    kept = {r["mql_id"] for r in leads}
    with (src / DEALS).open(newline="", encoding="utf-8") as f:
        deals = {r["mql_id"]: r for r in csv.DictReader(f) if r["mql_id"] in kept}
    out.mkdir(parents=True, exist_ok=True)
    with (out / "events.jsonl").open("wb") as events:
        for r in leads:
            at = _moment(r["mql_id"], r["first_contact_date"])
            path = f"/lp/{r['landing_page_id']}"
            context = {"campaign": {"source": r["origin"] or "unknown"}, "page": {"path": path}}
            page = {
                "type": "page",
                "messageId": f"olist-{r['mql_id']}-page",
                "userId": r["mql_id"],
                "timestamp": _iso(at),
                "properties": {"path": path, "url": f"https://sellers.olist.example{path}"},
                "context": context,
            }
            form = {
                "type": "track",
                "event": "Contact Form Submitted",
                "messageId": f"olist-{r['mql_id']}-form",
                "userId": r["mql_id"],
                "timestamp": _iso(at + timedelta(seconds=1)),
                "properties": {"form": "seller_signup"},
                "context": context,
            }
            events.write(orjson.dumps(page) + b"\n" + orjson.dumps(form) + b"\n")
    with (out / "outcomes.csv").open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["identifier", "outcome", "at"])
        for r in leads:
            deal = deals.get(r["mql_id"])
            w.writerow(
                [f"user:{r['mql_id']}", "won" if deal else "lost", deal["won_date"] if deal else ""]
            )
    load = Counter(sdr_id(d["sdr_id"]) for d in deals.values())
    _write_config(out / "config", sorted(load))
    facts: dict[str, object] = {
        "source": ATTRIBUTION,
        "leads": len(leads),
        "won": len(deals),
        "sdrs": len(load),
        "deals_per_sdr": dict(sorted(load.items())),
        "gini_deals_per_sdr": round(gini(load.values()) or 0.0, 4),
    }
    (out / "facts.json").write_bytes(orjson.dumps(facts, option=orjson.OPT_INDENT_2))
    (out / "ATTRIBUTION").write_text(ATTRIBUTION + "\n", encoding="utf-8")
    return facts


def _write_config(config: Path, sdrs: list[str]) -> None:
    """The shipped configuration, with Olist's SDRs and an MQL rule that asks for no profile."""
    if config.exists():
        shutil.rmtree(config)
    shutil.copytree(DEFAULT_CONFIG_DIR, config)
    scoring = (config / "scoring.toml").read_text(encoding="utf-8")
    scoring, fits = re.subn(
        r"(?m)^min_fit = .*$", "min_fit = 0.0  # Olist: no profile data", scoring
    )
    scoring, fields = re.subn(r"(?m)^required_fields = .*$", "required_fields = []", scoring)
    if fits != 1 or fields != 1:
        raise RuntimeError("scoring.toml's [qualification] changed shape: update leadflow.olist")
    (config / "scoring.toml").write_text(scoring, encoding="utf-8")
    roster = ["# Olist's SDRs of the closed deals (leadflow.olist), always available.\n"]
    for sdr in sdrs:
        roster.append(f'\n[[sdrs]]\nid = "{sdr}"\nname = "{sdr}"\nqueue = "inbound"\n')
    (config / "roster.toml").write_text("".join(roster), encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    """``python -m leadflow.olist SRC OUT [--limit N]``."""
    p = argparse.ArgumentParser(
        prog="python -m leadflow.olist", description=__doc__.splitlines()[0]
    )
    p.add_argument("src", type=Path, help="folder of Olist's two CSV files")
    p.add_argument("out", type=Path, help="where to write the history, outcomes and config")
    p.add_argument("--limit", type=int, default=0, help="only the first N leads (0: all)")
    args = p.parse_args(argv)
    for name in (LEADS, DEALS):
        if not (args.src / name).is_file():
            print(
                f"error: {args.src / name} not found (Olist's data set, see --help)",
                file=sys.stderr,
            )
            return 2
    facts = convert(args.src, args.out, args.limit)
    print(
        f"{facts['leads']} leads, {facts['won']} won, {facts['sdrs']} SDRs "
        f"(Gini of deals per SDR {facts['gini_deals_per_sdr']}) -> {args.out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
