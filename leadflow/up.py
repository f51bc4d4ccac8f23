"""``leadflow up``: everything, on this machine, until Ctrl-C: try Leadflow with a real tracker.

Starts the embedded broker and a Redis whose data lives in ``var/up/redis`` (AOF:
people, scores, owners and the roster survive a restart), creates the topics, then
the engine (``leadflow run``), the collector with the HTTP API (``leadflow collect``)
and the alert sender (``leadflow alerts``), each a child process logging to
``var/up/<name>.log``. Prints the collector's URL, a browser write key, an API key,
the metrics and health URLs and how to open the example page, and runs until
Ctrl-C or SIGTERM (or until a child dies), stopping everything it started.

The keys are made on the first run and kept in ``var/up/config`` (a copy of the
configuration with their digests added, and ``keys.json`` with the keys
themselves), so a tracker set up once keeps working. The broker keeps its data in
memory only: what is on the topics (events not yet scored, the decisions and
audit trail, parked alerts) is gone after a restart; the engine notices the new
broker (README, "Delivery guarantees": input resets) and goes on from Redis.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

import httpx

from engine.settings import DEFAULT_CONFIG_DIR, load_settings
from leadflow.api import key_table
from leadflow.collector import write_key_table
from leadflow.endpoints import new_key
from leadflow.servers import LocalBroker, LocalRedis, die_with_parent, free_port, stop_process
from leadflow.topics import create_topics

CHILDREN = ("engine", "collect", "alerts")
EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@dataclass(frozen=True)
class UpOptions:
    """Where ``leadflow up`` keeps its data and which configuration it starts from."""

    home: Path = Path("var/up")
    config_dir: str | None = None
    collector_port: int = 8080


def _keys(home: Path, base: Path) -> tuple[Path, dict[str, str]]:
    """The configuration directory of ``up`` (keys added) and the keys, made once."""
    config, saved = home / "config", home / "keys.json"
    if saved.exists() and config.exists():
        return config, json.loads(saved.read_text())
    keys = {"write_key": new_key(), "api_key": new_key()}
    shutil.rmtree(config, ignore_errors=True)
    shutil.copytree(base, config)
    with (config / "engine.toml").open("a") as f:
        f.write("\n# Added by `leadflow up`: the keys are in ../keys.json\n")
        f.write(write_key_table("website", keys["write_key"]) + "\n")
        f.write(key_table("up", keys["api_key"], ["read", "feedback", "read_pii"]))
    saved.write_text(json.dumps(keys, indent=2))
    saved.chmod(0o600)
    return config, keys


class _Stop:
    requested = False


def run_up(opts: UpOptions) -> int:
    """Start everything, print how to reach it, wait for Ctrl-C; return the exit code."""
    home = opts.home.resolve()
    home.mkdir(parents=True, exist_ok=True)
    config, keys = _keys(home, Path(opts.config_dir or DEFAULT_CONFIG_DIR))
    for part in ("redis", "broker"):
        (home / part).mkdir(exist_ok=True)
    broker = LocalBroker(str(home / "broker"))
    redis = LocalRedis("", appendonly=True, workdir=str(home / "redis"))
    children: dict[str, subprocess.Popen[bytes]] = {}

    def stop(_sig: int, _frame: FrameType | None) -> None:
        _Stop.requested = True

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    try:
        broker.start()
        redis.start()
        ports = {"metrics": free_port(), "health": free_port(), "alerts": free_port()}
        env = {
            **os.environ,
            "LEADFLOW_CONFIG_DIR": str(config),
            "LEADFLOW_KAFKA_BOOTSTRAP": broker.bootstrap,
            "LEADFLOW_REDIS_URL": redis.url,
            "LEADFLOW_METRICS_PORT": str(ports["metrics"]),
            "LEADFLOW_HEALTH_PORT": str(ports["health"]),
            "LEADFLOW_ALERTS_METRICS_PORT": str(ports["alerts"]),
            "LEADFLOW_METRICS_LISTEN": "127.0.0.1",
            "LEADFLOW_COLLECTOR_PORT": str(opts.collector_port),
            "LEADFLOW_COLLECTOR_LISTEN": "127.0.0.1",
            "LEADFLOW_RECOVERY_DIR": str(home / "recovery"),
            "LEADFLOW_ALLOW_SHIPPED_SALT": "1",  # a laptop's made-up visitors
        }
        settings = load_settings(config, env)
        create_topics(settings)
        commands = {"engine": ["run"], "collect": ["collect"], "alerts": ["alerts"]}
        for name in CHILDREN:
            with (home / f"{name}.log").open("ab") as log:
                children[name] = subprocess.Popen(  # our own interpreter and module
                    [sys.executable, "-m", "leadflow.cli", *commands[name]],
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    preexec_fn=die_with_parent,  # noqa: PLW1509  # children die with us
                    # Their own session: Ctrl-C reaches `up` alone, which stops each child
                    # with one SIGTERM (a second signal would cut the engine's graceful stop).
                    start_new_session=True,
                )
        collector = f"http://127.0.0.1:{opts.collector_port}"
        _wait_ready(
            children,
            home,
            {
                "collect": f"{collector}/openapi.json",
                "engine": f"http://127.0.0.1:{ports['health']}/readyz",
            },
        )
        print(
            f"Leadflow is up (data in {home}; Ctrl-C stops everything)\n\n"
            f"collector    {collector}   (Segment's HTTP API; the HTTP API too)\n"
            f"write key    {keys['write_key']}   (source 'website', browsers)\n"
            f"API key      {keys['api_key']}   (read, feedback, read_pii)\n"
            f"metrics      http://127.0.0.1:{ports['metrics']}/metrics  (engine),"
            f" http://127.0.0.1:{ports['alerts']}/metrics  (alerts), {collector}/metrics\n"
            f"health       http://127.0.0.1:{ports['health']}/readyz\n"
            f"broker       {broker.bootstrap} (memory: topics are gone after a restart)\n"
            f"redis        {redis.url} (append-only file in {home / 'redis'})\n"
            f"logs         {home}/{{engine,collect,alerts}}.log\n\n"
            f"Send events:  analytics.js with cdnURL {collector} and the write key above;\n"
            f"              the Python SDKs with host={collector}.\n"
            f"Example page: (cd {EXAMPLES} && npm ci) && python -m http.server -d {EXAMPLES}"
            f" 8000\n"
            f"              http://127.0.0.1:8000/?collector={collector}"
            f"&writeKey={keys['write_key']}\n"
            f"Look a lead up: curl -H 'Authorization: Bearer {keys['api_key']}'"
            f" {collector}/v1/leads/<e-mail>",
            flush=True,
        )
        return _wait(children, home)
    finally:
        for proc in children.values():
            stop_process(proc)
        redis.stop()
        broker.stop()
        print("stopped: engine, collector, alert sender, broker, redis", flush=True)


READY_TIMEOUT_S = 60.0


def _wait_ready(
    children: dict[str, subprocess.Popen[bytes]], home: Path, probes: dict[str, str]
) -> None:
    """Until each probed child answers 200, so what is printed next works at once."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    for name, url in probes.items():
        while True:
            if children[name].poll() is not None:
                raise RuntimeError(
                    f"{name} exited with {children[name].returncode}: see {home / name}.log"
                )
            try:
                if httpx.get(url, timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                print(
                    f"warning: {name} not ready after {READY_TIMEOUT_S:.0f} s ({url})",
                    file=sys.stderr,
                )
                break
            time.sleep(0.2)


def _wait(children: dict[str, subprocess.Popen[bytes]], home: Path) -> int:
    """Until a stop signal (0) or a child's death (1, with its log named)."""
    while not _Stop.requested:
        for name, proc in children.items():
            if proc.poll() is not None:
                print(
                    f"{name} exited with {proc.returncode}: see {home / name}.log; stopping",
                    file=sys.stderr,
                )
                return 1
        time.sleep(0.2)
    return 0
