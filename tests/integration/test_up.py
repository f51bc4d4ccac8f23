"""`leadflow up` as a person trying Leadflow runs it: a tracker's events in, a lead out, Ctrl-C."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import psutil

from leadflow.servers import free_port, stop_process
from tests.integration.flow import hot_lead


@contextmanager
def up(home: Path, port: int) -> Iterator[tuple[subprocess.Popen[str], dict[str, str]]]:
    """``leadflow up`` until it printed its URLs; stopped with SIGINT (Ctrl-C) afterwards."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "leadflow.cli", "up", "--home", str(home), "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "LEADFLOW_LOG_LEVEL": "WARNING"},
    )
    assert proc.stdout is not None
    printed = []
    for line in proc.stdout:
        printed.append(line)
        if line.startswith("Look a lead up"):
            break
    text = "".join(printed)
    assert f"collector    http://127.0.0.1:{port}" in text, text
    keys = json.loads((home / "keys.json").read_text())
    assert keys["write_key"] in text and keys["api_key"] in text
    children = [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
    try:
        yield proc, keys
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 0
        assert "stopped:" in proc.stdout.read()
        time.sleep(0.5)
        left = [
            pid
            for pid in children
            if psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
        ]
        assert left == [], "every process `up` started is stopped"
    finally:
        stop_process(proc, sig=signal.SIGKILL)  # type: ignore[arg-type]


def lead(url: str, api_key: str, email: str) -> httpx.Response:
    return httpx.get(
        f"{url}/v1/leads/{email}", headers={"Authorization": f"Bearer {api_key}"}, timeout=10
    )


def test_up_takes_a_trackers_events_to_a_decision_and_keeps_people_across_a_restart(
    tmp_path: Path,
) -> None:
    home, port = tmp_path / "up", free_port()
    url = f"http://127.0.0.1:{port}"
    email = "up-buyer@up-buyer.example"
    with up(home, port) as (_, keys):
        batch = {"batch": hot_lead("up-buyer"), "writeKey": keys["write_key"]}
        assert httpx.post(f"{url}/v1/batch", json=batch, timeout=30).status_code == 200
        deadline = time.monotonic() + 60
        while (found := lead(url, keys["api_key"], email)).status_code != 200 or found.json()[
            "stage"
        ] != "mql":
            assert time.monotonic() < deadline, found.text
            time.sleep(0.5)
        assert found.json()["owner"]["queue"] == "inbound"

    with up(home, port) as (_, again):  # the same keys, and Redis kept the lead
        assert again == keys
        kept = lead(url, keys["api_key"], email)
        assert kept.status_code == 200 and kept.json()["stage"] == "mql"
