"""``leadflow backtest``, ``leadflow tune`` and the HTML reports, as a user runs them."""

from __future__ import annotations

import csv
import os
import random
import re
import shutil
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest
from confluent_kafka import Producer
from matplotlib.image import imread

from dataflows.kafka_io import client_options
from engine.person import epoch_ms
from engine.settings import load_settings
from leadflow.backtest import read_history, read_source, run_backtest
from leadflow.olist import convert
from leadflow.report import read_json_lines
from leadflow.servers import LocalBroker, LocalRedis, free_port
from leadflow.synthetic import synthetic_events
from leadflow.topics import create_topics
from tests.conftest import local_settings
from tests.integration.flow import outputs

LEADFLOW = [sys.executable, "-m", "leadflow.cli"]
FIXTURES = Path(__file__).parents[1] / "fixtures"
T0 = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)  # a Monday: the history's first moment
HOUR = 3600.0


def _at(seconds: float) -> str:
    return (
        (T0 + timedelta(seconds=seconds)).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    )


def _person(anon: str, start: float, steps: list[tuple[float, str]]) -> list[dict[str, Any]]:
    """An identify (a company e-mail: fit 25, the default minimum) then ``steps``."""
    out: list[dict[str, Any]] = [
        {
            "type": "identify",
            "messageId": f"{anon}-id",
            "anonymousId": anon,
            "timestamp": _at(start),
            "traits": {"email": f"{anon}@{anon}-corp.example", "company": {"name": anon}},
        }
    ]
    for n, (after, what) in enumerate(steps):
        base = {"messageId": f"{anon}-{n}", "anonymousId": anon, "timestamp": _at(start + after)}
        if what.startswith("/"):
            out.append({**base, "type": "page", "properties": {"path": what}})
        else:
            out.append({**base, "type": "track", "event": what})
    return out


def _write_lines(path: Path, items: list[dict[str, Any]]) -> Path:
    path.write_bytes(b"".join(orjson.dumps(i) + b"\n" for i in items))
    return path


def _records(path: Path) -> list[dict[str, Any]]:
    return list(read_json_lines(path))


def _stamped_synthetic(people: int) -> list[dict[str, Any]]:
    """The demo's synthetic stream, one event every 20 s from T0."""
    return [{**e, "timestamp": _at(20 * i)} for i, e in enumerate(synthetic_events(people, 7))]


def test_a_small_history_gives_the_figures_computed_by_hand(tmp_path: Path) -> None:
    # a1: 50 + 25 + 30 = 105 at +180 s -> MQL.  b2: 15 + 50 + 25 + 30 = 120 -> MQL at +240 s.
    # c3: 15 (whitepaper).  d4: 1 + 10 (a pricing page view).
    history = [
        *_person("a1", 0, [(60, "Demo Requested"), (120, "Webinar Attended"),
                           (180, "Contact Form Submitted")]),
        *_person("b2", HOUR, [(60, "Whitepaper Downloaded"), (120, "Demo Requested"),
                              (180, "Webinar Attended"), (240, "Contact Form Submitted")]),
        *_person("c3", 2 * HOUR, [(60, "Whitepaper Downloaded")]),
        *_person("d4", 3 * HOUR, [(60, "/pricing")]),
    ]  # fmt: skip
    outcomes = tmp_path / "outcomes.csv"
    outcomes.write_text(
        "identifier,outcome\na1@a1-corp.example,won\nemail:c3@c3-corp.example,won\n"
        "b2@b2-corp.example,lost\nnobody@else.example,won\n"
    )
    # The configured Redis is down: the backtest never uses it, only a private one of its own.
    nowhere = load_settings(env={"LEADFLOW_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"})
    report = run_backtest(
        nowhere,
        _write_lines(tmp_path / "history.jsonl", history),
        tmp_path / "out",
        outcomes,
        sweep=(0.5, 1.0, 2.0),
        show_progress=False,
    )
    f = report["model"]["figures"]
    assert (f["people"], f["won"], f["promoted"]) == (4, 2, 2)
    # Promoted a1, b2; won a1, c3 ("nobody" is not in the history).
    assert (f["precision"], f["recall"]) == (0.5, 0.5)
    # Won: a1 ~105, c3 15. Not won: b2 ~120, d4 11. a1 > d4 and c3 > d4 only: 2 of 4 pairs.
    assert f["auc_behavior_score"] == 0.5
    assert f["auc_fit"] == 0.5  # everyone's fit is 25: all ties
    # 180 s and 240 s from first touch to MQL: the median is 210 s.
    assert f["hours_to_mql_median"] == pytest.approx(210 / 3600, abs=0.01)
    # First touches span 3 h (< a day, so a day counts): 2 MQLs in 1/7 week.
    assert f["mqls_per_week"] == 14.0
    load = report["model"]["sdr_load"]["inbound"]
    assert sorted(load["leads"].values()) == [0, 1, 1] and load["gini"] == 0.3333
    # Fit 25 is band C (25 and up), 105 and 120 engagement band 2 (100 and up); a1 won.
    assert report["model"]["grades"] == {"C2": {"leads": 2, "won": 1}}
    # At 50, a1 and b2 promote at the demo; at 200 nobody does.
    sweep = {r["threshold"]: (r["mqls"], r["precision"]) for r in report["threshold_sweep"]}
    assert sweep == {50.0: (2, 0.5), 100.0: (2, 0.5), 200.0: (0, None)}
    decisions = _records(tmp_path / "out/decisions.jsonl")
    # Stamped with the history's time, not today's.
    assert sorted(d["decided_at"] for d in decisions) == [_at(180), _at(HOUR + 240)]


def test_two_runs_of_the_same_backtest_are_byte_identical(tmp_path: Path) -> None:
    history = _write_lines(tmp_path / "history.jsonl", _stamped_synthetic(150))
    for run, quiet in (("one", []), ("two", ["--quiet"])):
        done = subprocess.run(
            [*LEADFLOW, "backtest", str(history), "--out", str(tmp_path / run), *quiet,
             "--sweep", "1"],
            capture_output=True, text=True, check=False, timeout=300,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr[-2000:]
        if not quiet:  # a progress bar with a rate and an ETA ("<00:01")
            assert re.search(r"backtest: +\d+%.*\d+/\d+ \[.*<.*event/s\]", done.stderr)
    for name in ("decisions.jsonl", "lifecycle.jsonl", "dlq.jsonl", "report.json"):
        first, second = (
            (tmp_path / "one" / name).read_bytes(),
            (tmp_path / "two" / name).read_bytes(),
        )
        assert first == second, name
    assert (tmp_path / "one/decisions.jsonl").read_bytes().count(b"\n") > 5


def test_the_records_do_not_depend_on_how_the_history_is_cut_into_batches(
    tmp_path: Path,
) -> None:
    history = _write_lines(tmp_path / "history.jsonl", _stamped_synthetic(120))
    cuts = [500, 1, 7, *random.Random(11).sample(range(2, 300), 3)]
    for size in cuts:
        run_backtest(
            load_settings(), history, tmp_path / str(size), sweep=(1.0,), batch=size,
            show_progress=False,
        )  # fmt: skip
    # The same records, and each person's in the same order (across people, the order of
    # a file follows the batches, as a topic's partitions would).
    for name, key in (("decisions.jsonl", "decision_id"), ("lifecycle.jsonl", "record_id")):
        first = _records(tmp_path / "500" / name)
        assert len(first) > 5
        for size in cuts[1:]:
            other = _records(tmp_path / str(size) / name)
            assert {r[key]: r for r in other} == {r[key]: r for r in first}, (size, name)
            assert _per_person(other, key) == _per_person(first, key), (size, name)


def _per_person(records: list[dict[str, Any]], key: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for r in records:
        out.setdefault(r["one_id"], []).append(r[key])
    return out


def test_the_backtest_decides_as_leadflow_run_does_on_one_partition(
    broker: LocalBroker, redis_server: LocalRedis, tmp_path: Path
) -> None:
    history = _stamped_synthetic(150)
    path = _write_lines(tmp_path / "history.jsonl", history)
    settings = local_settings(broker, redis_server)
    create_topics(settings, partitions=1)
    # The broker stamps each message with the line's own time, as the backtest reads it.
    producer = Producer(client_options(settings))
    for item in history:
        stamp = int(epoch_ms(item["timestamp"]) or 0)
        producer.produce(settings.topics.events, orjson.dumps(item), None, timestamp=stamp)
    assert producer.flush(10) == 0
    env = {
        **os.environ,
        "LEADFLOW_KAFKA_BOOTSTRAP": broker.bootstrap,
        "LEADFLOW_REDIS_URL": redis_server.url,
        "LEADFLOW_METRICS_PORT": str(free_port()),
        "LEADFLOW_HEALTH_PORT": "0",
        "LEADFLOW_RECOVERY_DIR": str(tmp_path / "recovery"),
    }
    done = subprocess.run(
        [*LEADFLOW, "run", "--stop-at-end", "--clock", "event"],
        env=env, capture_output=True, text=True, check=False, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    live = outputs(settings)

    report = run_backtest(load_settings(), path, tmp_path / "bt", sweep=(1.0,), show_progress=False)
    backtest = {d["decision_id"]: d for d in _records(tmp_path / "bt/decisions.jsonl")}
    lifecycle = _records(tmp_path / "bt/lifecycle.jsonl")
    # No timer fell due inside this history (they fire in the backtest, never in a bounded run).
    assert not {r["cause"] for r in lifecycle} & {
        "sla_breached", "decay_below_threshold", "nurture_reentry", "waiting_for_sdr"
    }  # fmt: skip
    assert report["model"]["figures"]["promoted"] >= 5
    assert live.decisions == backtest
    assert live.lifecycle == {r["record_id"]: r for r in lifecycle}

    # The same history read back from the topic (a time range of it) decides the same.
    last = history[-1]["timestamp"]
    assert (
        len(read_source(f"kafka:{history[1]['timestamp']}..{last}", settings)) == len(history) - 2
    )
    run_backtest(settings, "kafka:", tmp_path / "topic", sweep=(1.0,), show_progress=False)
    assert _records(tmp_path / "topic/decisions.jsonl") == list(backtest.values())


def _screenshot(page: Path, shot: Path, profile: Path) -> None:
    done = subprocess.run(
        ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
         "--no-first-run", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", f"--user-data-dir={profile}", "--window-size=1100,3000",
         f"--screenshot={shot}", page.as_uri()],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert shot.exists(), done.stderr[-2000:]


def _has_colour(png: Path, rgb: tuple[int, int, int], at_least: int) -> bool:
    """Whether ``png`` has at least ``at_least`` pixels of ``rgb`` (+-6 per channel)."""
    pixels = (imread(png)[:, :, :3] * 255).round()
    near = (abs(pixels - rgb) <= 6).all(axis=2)
    return int(near.sum()) >= at_least


def test_olist_sample_backtest_tune_and_the_report_in_chromium(tmp_path: Path) -> None:
    if shutil.which("chromium") is None:
        pytest.skip("chromium not on PATH: apt-get install chromium (.ci/run does)")
    olist = tmp_path / "olist"
    facts = convert(FIXTURES / "olist", olist)
    scoring_before = (olist / "config/scoring.toml").read_text()
    with (FIXTURES / "olist/olist_closed_deals_dataset.csv").open() as f:
        deals = list(csv.DictReader(f))
    assert facts["leads"] == 400 and facts["won"] == len(deals) == 46
    assert len(read_history(olist / "events.jsonl", load_settings())) == 800  # page + form each

    tuned = subprocess.run(
        [*LEADFLOW, "tune", str(olist / "events.jsonl"), "--config", str(olist / "config"),
         "--outcomes", str(olist / "outcomes.csv"), "--out", str(tmp_path / "tune"),
         "--mqls-per-week", "2", "--quiet"],
        capture_output=True, text=True, check=False, timeout=300,
    )  # fmt: skip
    assert tuned.returncode == 0, tuned.stderr[-2000:]
    assert "cross-validated AUC" in tuned.stdout
    # Proposed, never applied: the configuration tuned is as it was.
    assert (olist / "config/scoring.toml").read_text() == scoring_before
    diff = (tmp_path / "tune/scoring.toml.diff").read_text()
    assert "+mql_threshold = " in diff and "+[[scoring.rules]]  # tune: weight" in diff
    figures = orjson.loads((tmp_path / "tune/tune.json").read_bytes())
    assert 0 < figures["cv_auc"] < 1 and figures["baseline_cv_auc_source"] is not None

    out = tmp_path / "bt"
    done = subprocess.run(
        [*LEADFLOW, "backtest", str(olist / "events.jsonl"), "--config", str(olist / "config"),
         "--outcomes", str(olist / "outcomes.csv"), "--against", str(tmp_path / "tune/config"),
         "--out", str(out), "--sweep", "0.25,1", "--quiet"],
        capture_output=True, text=True, check=False, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    report = orjson.loads((out / "report.json").read_bytes())
    # The shipped rules give every Olist lead the same 31 points: nobody promoted, AUC 0.5.
    assert report["model"]["figures"]["promoted"] == 0
    assert report["model"]["figures"]["auc_behavior_score"] == 0.5
    # The tuned rules promote some, assigned round robin over Olist's SDRs.
    against = report["against"]
    assert against["figures"]["promoted"] > 0
    assert len(against["sdr_load"]["inbound"]["leads"]) == facts["sdrs"]
    assert report["comparison"]["both"] == 0
    for png in ("funnel", "threshold_sweep", "score_distribution", "sdr_load"):
        assert (out / f"{png}.png").stat().st_size > 5_000
    html = (out / "report.html").read_text()
    # Nothing to fetch: no script, no stylesheet or image from elsewhere.
    assert "<script" not in html and not re.search(r"(src|href)=[\"']?(https?:|//)", html)

    shot = tmp_path / "shot.png"
    _screenshot(out / "report.html", shot, tmp_path / "chromium")
    # The funnel's bars (#3b6ea5) and the sweep's precision line (#2a9d8f) are drawn.
    assert _has_colour(shot, (0x3B, 0x6E, 0xA5), 2_000)
    assert _has_colour(shot, (0x2A, 0x9D, 0x8F), 40)

    # The live report's page, from the backtest's files.
    page = tmp_path / "funnel/report.html"
    page.parent.mkdir()
    reported = subprocess.run(
        [*LEADFLOW, "report", "--lifecycle", str(out / "against/lifecycle.jsonl"),
         "--decisions", str(out / "against/decisions.jsonl"), "--html", str(page)],
        capture_output=True, text=True, check=False, timeout=120,
    )  # fmt: skip
    assert reported.returncode == 0, reported.stderr[-2000:]
    assert "paid_search" in reported.stdout
    shot = tmp_path / "funnel.png"
    _screenshot(page, shot, tmp_path / "chromium")
    assert _has_colour(shot, (0x3B, 0x6E, 0xA5), 2_000)


def test_bad_lines_and_bad_outcomes_are_named(tmp_path: Path) -> None:
    history = _person("a1", 0, [(60, "Demo Requested")])
    untimed = {"type": "page", "messageId": "x", "anonymousId": "z"}
    path = _write_lines(tmp_path / "history.jsonl", [untimed, *history])
    path.write_bytes(path.read_bytes() + b"{not json\n")
    report = run_backtest(
        load_settings(), path, tmp_path / "out", sweep=(1.0,), show_progress=False
    )
    dlq = _records(tmp_path / "out/dlq.jsonl")
    assert [(d["reason"], d["line"]) for d in dlq] == [("bad_timestamp", 0), ("invalid_json", 3)]
    assert report["model"]["figures"]["people"] == 1

    outcomes = tmp_path / "outcomes.csv"
    outcomes.write_text("identifier,outcome\na1@a1-corp.example,maybe\n")
    done = subprocess.run(
        [*LEADFLOW, "backtest", str(path), "--outcomes", str(outcomes), "--out",
         str(tmp_path / "o2"), "--quiet"],
        capture_output=True, text=True, check=False, timeout=120,
    )  # fmt: skip
    assert done.returncode == 2
    assert f"{outcomes}: line 2:" in done.stderr and "won, lost" in done.stderr
    missing = subprocess.run(
        [*LEADFLOW, "backtest", str(tmp_path / "nope.jsonl"), "--quiet"],
        capture_output=True, text=True, check=False, timeout=60,
    )  # fmt: skip
    assert missing.returncode == 2 and "no such file" in missing.stderr
