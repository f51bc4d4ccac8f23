"""`leadflow collect` / `leadflow api` as processes for the tests, with keys in their config."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

from engine.settings import DEFAULT_CONFIG_DIR
from leadflow.servers import LocalRedis, free_port, stop_process


@dataclass
class Server:
    """A running HTTP server of Leadflow's."""

    url: str
    proc: subprocess.Popen[bytes]
    log: Path


@contextmanager
def http_server(
    command: str,
    tmp: Path,
    bootstrap: str,
    redis: LocalRedis,
    tables: list[str],
    env: dict[str, str] | None = None,
) -> Iterator[Server]:
    """``leadflow <command>`` on a free port, ``tables`` appended to its engine.toml.

    Stopped with SIGTERM afterwards, which must end it with exit code 0.
    """
    config = tmp / f"{command}-config"
    shutil.copytree(DEFAULT_CONFIG_DIR, config)
    with (config / "engine.toml").open("a") as f:
        f.write("\n" + "\n".join(tables))
    port = free_port()
    log = tmp / f"{command}.log"
    prefix = "LEADFLOW_COLLECTOR" if command == "collect" else "LEADFLOW_API"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "leadflow.cli", command],
            env={
                **os.environ,
                "LEADFLOW_CONFIG_DIR": str(config),
                "LEADFLOW_KAFKA_BOOTSTRAP": bootstrap,
                "LEADFLOW_REDIS_URL": redis.url,
                f"{prefix}_PORT": str(port),
                f"{prefix}_LISTEN": "127.0.0.1",
                **(env or {}),
            },
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            httpx.get(url + "/openapi.json", timeout=1)
            break
        except httpx.TransportError:
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
    try:
        yield Server(url, proc, log)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, log.read_text()
    finally:
        stop_process(proc, sig=signal.SIGKILL)
