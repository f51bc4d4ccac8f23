"""``leadflow``: the command line.

Commands:
    run             the production entry point (external Kafka and Redis from config/env)
    demo            everything local: broker, Redis, engine, a synthetic stream, live alerts
    up              everything local until Ctrl-C, with the collector: try a real tracker
    report          the funnel per campaign, source and landing page; SDR performance
    backtest FILE   replay a history through the engine: promotions, AUC, threshold sweep
    tune FILE       propose rule points and a threshold from history with outcomes
    topics create   create the topics with a chosen partition count
    inspect ID      everything known about the person owning an identifier
    config show     print the effective configuration, secrets masked
    config check    validate the configuration and exit 0 or 2
    alerts          POST decisions to the queues' webhooks; ``alerts redrive`` re-sends parked ones
    collect         Segment's HTTP Tracking API and the HTTP API; ``collect key`` makes a write key
    api             the HTTP API: feedback, lead and queue look-ups; ``api key`` makes a key
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from engine.consent import LISTS
from engine.settings import (
    API_SCOPES,
    CLOCKS,
    MEMBER_ERRORS,
    ConfigError,
    Settings,
    check_private_salt,
    check_webhook_secrets,
    load_settings,
    mask_url,
    masked,
    with_secret_files,
)
from engine.store import StoreUnavailable
from leadflow.logs import FORMATS, configure_logging

# Exit codes (README, "Exit codes"): each cause its own, so a service manager or an
# operator knows what to fix without reading a traceback.
EXIT_FAILED = 1  # the engine stopped on an error of its own (a member failed, a processing error)
EXIT_CONFIG = 2  # the configuration is invalid: the message names file (or variable), key, problem
EXIT_UNAVAILABLE = 3  # Redis unreachable, refusing the credentials, or evicting keys
EXIT_KAFKA = 4  # Kafka unreachable, a topic missing, or access refused
EXIT_INPUT_RESET = 5  # the broker lost input and kafka.on_input_reset = "stop"


def _alerts_and_api_parsers(sub: Any) -> None:
    alerts = sub.add_parser("alerts", help="POST decisions to the queues' webhooks (own process)")
    alerts.add_argument(
        "--stop-at-end", action="store_true", help="exit once every decision so far is handled"
    )
    redrive = alerts.add_subparsers(dest="alerts_command").add_parser(
        "redrive", help="send parked alerts again, once each (those still failing stay parked)"
    )
    redrive.add_argument("--queue", help="only this queue's alerts")
    redrive.add_argument(
        "--since", help="only alerts parked since: an ISO-8601 time, or an age (30m, 2h, 7d)"
    )
    redrive.add_argument(
        "--give-up-after",
        type=float,
        default=10.0,
        metavar="S",
        help="retry each alert for at most S seconds (default 10)",
    )

    report = sub.add_parser(
        "report", help="the funnel per campaign, source and landing page; SDR performance"
    )
    report.add_argument(
        "--lifecycle", help="a JSON-lines file of lifecycle records (else the topic)"
    )
    report.add_argument("--decisions", help="a JSON-lines file of decisions (with --lifecycle)")
    report.add_argument("--json", action="store_true", help="print the whole report as JSON")
    report.add_argument(
        "--html", metavar="FILE", help="also write a self-contained HTML page (PNGs beside it)"
    )

    backtest = _history_parser(
        sub, "backtest", "replay a history through the engine: what this model would have done"
    )
    backtest.add_argument(
        "--against", metavar="DIR", help="a second configuration, compared on the same history"
    )
    backtest.add_argument(
        "--sweep",
        help="factors of the thresholds to sweep, comma-separated, each one run "
        "(default 0.25,0.5,0.75,1,1.25,1.5,2)",
    )
    backtest.add_argument(
        "--batch", type=int, default=500, help="lines per engine batch (default 500)"
    )
    tune = _history_parser(
        sub, "tune", "propose rule points and a threshold from history with outcomes"
    )
    tune.add_argument(
        "--mqls-per-week", type=float, help="target MQL volume (default: today's model's)"
    )

    up = sub.add_parser(
        "up", help="everything local until Ctrl-C: broker, Redis, engine, collector, alerts"
    )
    up.add_argument("--home", default="var/up", help="where its data lives (default var/up)")
    up.add_argument("--port", type=int, default=8080, help="the collector's port (default 8080)")

    collect = sub.add_parser(
        "collect", help="Segment's HTTP Tracking API (trackers post here) and the HTTP API"
    )
    write_key = collect.add_subparsers(dest="collect_command").add_parser(
        "key", help="make a write key: prints it once, and the [[collector.keys]] table"
    )
    write_key.add_argument("--name", required=True, help="the source (website, crm-sync...)")
    write_key.add_argument(
        "--topic",
        choices=["events", "feedback"],
        default="events",
        help="events (browsers, untrusted; default) or feedback (a trusted server-side tool)",
    )
    write_key.add_argument(
        "--rate", type=float, default=1000.0, help="events per second allowed (default 1000)"
    )

    api = sub.add_parser(
        "api", help="the HTTP API: feedback, lead and queue look-ups (own process)"
    )
    key = api.add_subparsers(dest="api_command").add_parser(
        "key", help="make an API key: prints it once, and the [[api.keys]] table for engine.toml"
    )
    key.add_argument("--name", required=True, help="who holds it (the actor of its feedback)")
    key.add_argument(
        "--scopes",
        default="read",
        help=f"comma-separated, of {', '.join(API_SCOPES)} (default read)",
    )


def _history_parser(sub: Any, name: str, text: str) -> argparse.ArgumentParser:
    """A command over a history (backtest, tune): the arguments both take."""
    p: argparse.ArgumentParser = sub.add_parser(name, help=text)
    p.add_argument(
        "events",
        help="history: Segment JSON lines (events and feedback), or kafka:[SINCE..UNTIL] "
        "for the configured topics over an ISO-8601 time range",
    )
    p.add_argument("--config", metavar="DIR", help="the configuration (default: --config-dir)")
    p.add_argument(
        "--outcomes", metavar="FILE", help="CSV or JSON lines: identifier,outcome (won/lost/...)"
    )
    p.add_argument("--out", default=f"var/{name}", help=f"output directory (default var/{name})")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="leadflow", description="Real-time lead scoring and routing.")
    p.add_argument(
        "--config-dir",
        help="directory of engine/scoring/routing/roster.toml (env LEADFLOW_CONFIG_DIR)",
    )
    p.add_argument(
        "--log-level",
        default=os.environ.get("LEADFLOW_LOG_LEVEL", "INFO"),
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="env LEADFLOW_LOG_LEVEL (default INFO)",
    )
    p.add_argument(
        "--log-format",
        default=os.environ.get("LEADFLOW_LOG_FORMAT", "text"),
        choices=FORMATS,
        help="text, or one JSON object per line; env LEADFLOW_LOG_FORMAT (default text)",
    )
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the dataflow against the configured Kafka and Redis")
    run.add_argument(
        "--processes", type=int, help="Bytewax processes on this host (overrides config)"
    )
    run.add_argument("--process-id", type=int, help="this process's index in a multi-host cluster")
    # Set by `leadflow run --processes N` for its children: it prepared the host's recovery.
    run.add_argument("--supervised", action="store_true", help=argparse.SUPPRESS)
    run.add_argument(
        "--addresses", help='all cluster members, "host:port;host:port" (with --process-id)'
    )
    run.add_argument(
        "--stop-at-end", action="store_true", help="stop when the input is drained (replays)"
    )
    run.add_argument(
        "--clock",
        choices=CLOCKS,
        help="wall (live) or event: apply history at its own times (with --stop-at-end)",
    )

    demo = sub.add_parser("demo", help="run everything locally on a synthetic stream")
    demo.add_argument("--people", type=int, default=300, help="synthetic people (default 300)")
    demo.add_argument("--rate", type=float, default=400.0, help="events per second (default 400)")
    demo.add_argument("--processes", type=int, default=1, help="Bytewax processes (default 1)")
    demo.add_argument("--redis", default="", help="redis, valkey or a server binary path")
    demo.add_argument("--seed", type=int, default=7, help="random seed of the synthetic stream")
    demo.add_argument("--quiet", action="store_true", help="print the summary only, not each alert")

    topics = sub.add_parser("topics", help="manage topics").add_subparsers(
        dest="topics_command", required=True
    )
    create = topics.add_parser("create", help="create all topics that do not exist yet")
    create.add_argument(
        "--partitions", type=int, help="partitions per topic (default topics.partitions)"
    )
    create.add_argument("--replication", type=int, default=1, help="replication factor (default 1)")

    inspect = sub.add_parser("inspect", help="show the person owning an identifier")
    inspect.add_argument(
        "identifier",
        help="kind:value (email:, user:, anon:, phone:, or a configured kind) or a bare value",
    )

    roster = sub.add_parser("roster", help="the SDR roster of running engines").add_subparsers(
        dest="roster_command", required=True
    )
    apply = roster.add_parser("apply", help="validate a roster file and apply it without restart")
    apply.add_argument(
        "file", nargs="?", default=None, help="roster TOML (default: roster.toml of the config)"
    )
    roster.add_parser("show", help="print the roster in force, availability and load, as JSON")

    lists = sub.add_parser(
        "lists", help="suppression lists: unsubscribe, dnc, blacklist, whitelist"
    ).add_subparsers(dest="lists_command", required=True)
    for verb, text in (("add", "put values on a list"), ("remove", "take values off a list")):
        change = lists.add_parser(verb, help=text)
        change.add_argument("list", choices=sorted(LISTS))
        change.add_argument("values", nargs="*", help="e-mail addresses, phone numbers, domains")
        change.add_argument("--file", help="read values from this file, one per line ('-': stdin)")
    show = lists.add_parser("show", help="print list members (digests and domains) as JSON")
    show.add_argument(
        "list", nargs="*", help=f"lists to show (default all: {', '.join(sorted(LISTS))})"
    )
    check = lists.add_parser("check", help="say which lists hold each value")
    check.add_argument("values", nargs="*")
    check.add_argument("--file", help="read values from this file, one per line ('-': stdin)")

    _alerts_and_api_parsers(sub)

    config = sub.add_parser("config", help="inspect configuration").add_subparsers(
        dest="config_command", required=True
    )
    config.add_parser("show", help="print the effective configuration as JSON, secrets masked")
    check = config.add_parser("check", help="validate the configuration")
    check.add_argument(
        "--connect", action="store_true", help="also reach Redis and Kafka and check them"
    )
    return p


def _settings(args: argparse.Namespace) -> Settings:
    return load_settings(args.config_dir)


def _settings_for_people(args: argparse.Namespace) -> Settings:
    """Settings of a command that digests identifiers: the shipped salt is refused."""
    settings = _settings(args)
    check_private_salt(settings, os.environ)
    return settings


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``leadflow`` console script.

    A failure is one line on standard error, naming what failed and how to fix
    it, and a documented exit code per cause; the traceback only with
    ``--log-level DEBUG``.
    """
    args = _parser().parse_args(argv)
    configure_logging(args.log_level, args.log_format)
    try:
        return _dispatch(args)
    except Exception as e:
        code, message = _failure(e)
        print(f"leadflow: {message}", file=sys.stderr)
        if args.log_level == "DEBUG":
            traceback.print_exc()
        # A member of a local cluster tells its supervisor why, unless a step already did.
        if (path := os.environ.get(MEMBER_ERRORS)) and not os.path.exists(path):
            with open(path, "w") as note:
                note.write(message)
        return code


def _failure(error: Exception) -> tuple[int, str]:
    """The exit code and one-line message of a failure (wrapped by Bytewax or not)."""
    from dataflows.kafka_io import InputReset
    from leadflow.preflight import KafkaUnavailable, RedisUnsafe
    from leadflow.runner import causes, describe

    for cause in causes(error):
        if isinstance(cause, ConfigError):
            return EXIT_CONFIG, f"configuration error: {cause}"
        if isinstance(cause, StoreUnavailable | RedisUnsafe):
            return EXIT_UNAVAILABLE, str(cause)
        if isinstance(cause, KafkaUnavailable):
            return EXIT_KAFKA, str(cause)
        if isinstance(cause, InputReset):
            return EXIT_INPUT_RESET, str(cause)
    return EXIT_FAILED, f"stopped on an error: {describe(error)} (--log-level DEBUG for details)"


def _dispatch(args: argparse.Namespace) -> int:
    handlers = {
        "config": _config,
        "roster": _roster,
        "inspect": _inspect,
        "alerts": _alerts,
        "api": _api,
        "collect": _collect,
        "lists": _lists,
        "backtest": _backtest,
        "tune": _tune,
    }
    if args.command in handlers:
        return handlers[args.command](args)
    if args.command == "topics":
        from leadflow.topics import create_topics

        settings = _settings(args)
        created = create_topics(settings, args.partitions, args.replication)
        print(f"created: {', '.join(created) or 'nothing (all topics exist)'}")
        return 0
    if args.command == "report":
        from leadflow.report import build_report, render

        lifecycle = Path(args.lifecycle) if args.lifecycle else None
        decisions = Path(args.decisions) if args.decisions else None
        built = build_report(_settings(args), lifecycle, decisions)
        print(json.dumps(built, indent=2) if args.json else render(built))
        if args.html:
            from leadflow.report import write_html

            print(f"wrote {write_html(built, Path(args.html))}", file=sys.stderr)
        return 0
    if args.command == "up":
        from leadflow.up import UpOptions, run_up

        return run_up(UpOptions(Path(args.home), args.config_dir, args.port))
    if args.command == "demo":
        from leadflow.demo import DemoOptions, run_demo

        return run_demo(
            DemoOptions(
                people=args.people,
                rate=args.rate,
                processes=args.processes,
                redis_flavor=args.redis,
                seed=args.seed,
                quiet=args.quiet,
                config_dir=args.config_dir,
            )
        )
    return _run(args)


def _sweep_factors(text: str | None) -> tuple[float, ...]:
    from leadflow.backtest import SWEEP_FACTORS

    if text is None:
        return SWEEP_FACTORS
    try:
        factors = tuple(float(f) for f in text.split(",") if f.strip())
    except ValueError:
        factors = ()
    if not factors or any(f <= 0 for f in factors):
        raise ConfigError("command line", "--sweep", f"expected positive numbers, got {text!r}")
    return tuple(sorted(set(factors)))


def _history_source(path: str) -> Path | str:
    """A history file, or ``kafka:SINCE..UNTIL`` (leadflow.backtest.read_source)."""
    if path.startswith("kafka:"):
        return path
    history = Path(path)
    if not history.is_file():
        raise ConfigError("command line", "EVENTS", f"no such file: {path}")
    return history


def _backtest(args: argparse.Namespace) -> int:
    from leadflow.backtest import clean_dir, run_backtest, write_pictures

    settings = load_settings(args.config or args.config_dir)
    against = load_settings(args.against) if args.against else None
    history = _history_source(args.events)
    out = Path(args.out)
    clean_dir(out)
    report = run_backtest(
        settings,
        history,
        out,
        Path(args.outcomes) if args.outcomes else None,
        against,
        _sweep_factors(args.sweep),
        args.batch,
        show_progress=not args.quiet,
    )
    page = write_pictures(report, settings.scoring.mql_threshold, out)
    figures = report["model"]["figures"]
    print(json.dumps(figures, indent=2))
    if "comparison" in report:
        c = report["comparison"]
        print(
            f"against {args.against}: both promote {c['both']}, only this model "
            f"{len(c['only_first'])}, only the other {len(c['only_second'])}"
        )
    print(f"wrote {out}/ (decisions, lifecycle, dlq .jsonl; report.json; {page.name}; PNGs)")
    return 0


def _tune(args: argparse.Namespace) -> int:
    from leadflow.tune import run_tune

    settings = load_settings(args.config or args.config_dir)
    config_dir = Path(args.config or args.config_dir or settings.config_dir)
    result = run_tune(
        settings,
        config_dir,
        _history_source(args.events),
        Path(args.outcomes) if args.outcomes else None,
        Path(args.out),
        args.mqls_per_week,
        show_progress=not args.quiet,
    )
    print(result)
    return 0


def _alerts(args: argparse.Namespace) -> int:
    import time

    from leadflow.alerts import parse_since, redrive, run_alerts

    settings = _settings(args)
    if args.alerts_command == "redrive":
        if args.queue is not None and args.queue not in {q.name for q in settings.routing.queues}:
            print(f"error: no queue {args.queue!r} in routing.toml", file=sys.stderr)
            return EXIT_CONFIG
        try:
            since = None if args.since is None else parse_since(args.since, time.time())
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return EXIT_CONFIG
        r = redrive(settings, args.queue, since, give_up_after_s=args.give_up_after, progress=print)
        print(
            f"redrive: {r.selected} parked alerts selected, {r.delivered} delivered, "
            f"{r.duplicates} delivered before (not resent), {r.no_webhook} without a webhook now, "
            f"{len(r.failed)} still failing (still parked)"
        )
        return EXIT_FAILED if r.failed else 0
    stats = run_alerts(settings, stop_at_end=args.stop_at_end)
    print(
        f"alerts: {stats.delivered} delivered, {stats.duplicates} delivered before (not resent), "
        f"{stats.retries} failed tries, {stats.parked} parked, {stats.skipped} without a webhook"
    )
    return 0


def _collect(args: argparse.Namespace) -> int:
    from leadflow.collector import write_key_table

    if args.collect_command == "key":
        return _new_key(
            "write key", args.name, "collect",
            lambda key: write_key_table(args.name, key, args.topic, args.rate),
        )  # fmt: skip
    return _serve(args, collector=True)


def _api(args: argparse.Namespace) -> int:
    from leadflow.api import key_table

    if args.api_command == "key":
        scopes = [s.strip() for s in args.scopes.split(",") if s.strip()]
        unknown = [s for s in scopes if s not in API_SCOPES]
        if unknown or not scopes:
            print(
                f"error: --scopes {args.scopes!r}: expected some of {API_SCOPES}", file=sys.stderr
            )
            return EXIT_CONFIG
        return _new_key("API key", args.name, "api", lambda key: key_table(args.name, key, scopes))
    return _serve(args, collector=False)


def _new_key(kind: str, holder: str, command: str, table: Callable[[str], str]) -> int:
    """Print a fresh key once, and the table (its digest) to add to engine.toml."""
    from leadflow.endpoints import new_key

    key = new_key()
    print(f"{kind} for {holder} (shown once; give it to its holder):\n  {key}\n")
    print(f"Add to engine.toml, then restart `leadflow {command}`:\n")
    print(table(key))
    return 0


def _serve(args: argparse.Namespace, collector: bool) -> int:
    """``leadflow collect`` / ``leadflow api``: serve until stopped, unless its port is 0."""
    from leadflow.web import serve

    settings = _settings(args)
    port, key = (
        (settings.collector.port, "collector.port")
        if collector
        else (settings.api.port, "api.port")
    )
    if not port:
        print(f"error: {key} is 0 (the server is off)", file=sys.stderr)
        return EXIT_CONFIG
    serve(settings, collector=collector)
    return 0


def _config(args: argparse.Namespace) -> int:
    settings = _settings(args)
    if args.config_command == "show":
        print(json.dumps(masked(settings), indent=2))
        return 0
    check_webhook_secrets(settings, with_secret_files(os.environ))
    print(f"configuration in {settings.config_dir} is valid")
    if args.connect:
        from leadflow.preflight import check_kafka, check_redis

        for warning in check_redis(settings):
            print(f"warning: {warning}")
        print(f"redis: ok ({mask_url(settings.redis.url)}, maxmemory-policy noeviction)")
        print(f"kafka: ok ({settings.kafka.bootstrap}, {check_kafka(settings)} topics)")
    return 0


def _inspect(args: argparse.Namespace) -> int:
    import time

    from leadflow.inspect import inspect_person, render

    person = inspect_person(_settings_for_people(args), args.identifier, int(time.time() * 1000))
    if person is None:
        print(f"leadflow: nobody owns {args.identifier!r}", file=sys.stderr)
        return 1
    print(render(person))
    return 0


def _lists(args: argparse.Namespace) -> int:
    from leadflow.lists import change_list, check_values, read_values, show_lists

    settings = _settings_for_people(args)
    if args.lists_command in ("add", "remove"):
        values = read_values(args.values, args.file)
        print(change_list(settings, args.list, values, add=args.lists_command == "add"))
    elif args.lists_command == "show":
        print(json.dumps(show_lists(settings, args.list), indent=2))
    else:
        for n, (_, held) in enumerate(
            check_values(settings, read_values(args.values, args.file)), 1
        ):
            # The value itself is not echoed: it may be an address or a number.
            print(f"value {n}: {', '.join(held) or 'on no list'}")
    return 0


def _roster(args: argparse.Namespace) -> int:
    from leadflow.roster import apply_roster, show_roster

    settings = _settings(args)
    if args.roster_command == "apply":
        path = Path(args.file or Path(settings.config_dir) / "roster.toml")
        version = apply_roster(settings, path)
        print(f"roster {path} applied as version {version}")
    else:
        print(json.dumps(show_roster(settings), indent=2, ensure_ascii=False))
    return 0


def _run(args: argparse.Namespace) -> int:
    from msgspec.structs import replace

    from dataflows.kafka_io import kafka_cluster
    from leadflow.preflight import preflight
    from leadflow.runner import prepare_recovery, run_local_cluster, run_member

    settings = _settings_for_people(args)
    dataflow = settings.dataflow
    if args.processes is not None:
        if args.processes < 1:
            raise ConfigError("command line", "--processes", f"must be >= 1, got {args.processes}")
        dataflow = replace(dataflow, processes=args.processes)
    if args.stop_at_end:
        dataflow = replace(dataflow, stop_at_end=True)
    if args.clock:
        dataflow = replace(dataflow, clock=args.clock)
    if dataflow.clock == "event" and not dataflow.stop_at_end:
        # Timers fire by the wall clock and never in a bounded run: event time is for replays.
        raise ConfigError("command line", "--clock", "event time needs --stop-at-end (a replay)")
    settings = replace(settings, dataflow=dataflow)
    if (args.process_id is None) != (args.addresses is None):
        raise ConfigError("command line", "--process-id/--addresses", "give both or neither")
    if args.addresses is not None:
        addresses = [a.strip() for a in args.addresses.split(";") if a.strip()]
        if not 0 <= args.process_id < len(addresses):
            raise ConfigError("command line", "--process-id", f"must be in 0..{len(addresses) - 1}")
        if not args.supervised:  # a member on its own host: the host's recovery is its own
            preflight(settings)
            member = (args.process_id, len(addresses))
            prepare_recovery(settings, kafka_cluster(settings), member)
        run_member(settings, args.process_id, addresses)
        return 0
    preflight(settings)
    prepare_recovery(settings, kafka_cluster(settings))
    if dataflow.processes == 1:
        run_member(settings)
        return 0
    return run_local_cluster(settings, settings.config_dir)


if __name__ == "__main__":
    sys.exit(main())
