"""The HTTP collector's speed, and the measured choice of its server framework.

* ``frameworks``: the same handler (read a Segment batch, serialise each event, answer
  200; no Kafka) on Starlette under uvicorn and on aiohttp, one process each:
  requests/s with 8 connections posting 50-event batches, and p50/p99 at 1,000
  single-event requests/s. The collector uses the winner (benchmarks/README.md).
* ``collector``: ``leadflow collect`` itself, producing to the embedded broker: events/s
  in batch mode (100-event batches, 8 connections) and acknowledgement latency at 1,000
  single-event requests/s (each answered after the broker acknowledged it).

The load generator is asyncio on raw keep-alive connections (pre-built requests), in
a process of its own: open loop at a fixed rate (latency from the *scheduled* send
time, so a stall is not hidden) or closed loop (throughput).

Usage: ``python -m benchmarks.collector [frameworks|collector|all]``.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import orjson
from aiohttp import web

from engine.settings import DEFAULT_CONFIG_DIR, load_settings
from leadflow.collector import write_key_table
from leadflow.servers import LocalBroker, LocalRedis, free_port, stop_process, wait_listening
from leadflow.topics import create_topics

KEY = "lf_bench_write_key"
BATCH = 100
CONNECTIONS = 8


def event(n: int) -> dict[str, Any]:
    """An analytics.js-sized track event (about 600 bytes)."""
    return {
        "type": "track",
        "event": "Pricing Viewed",
        "anonymousId": f"anon-{n % 5000}",
        "messageId": f"bench-{n}",
        "timestamp": "2026-11-30T12:00:00.000Z",
        "properties": {"plan": "enterprise", "currency": "USD", "path": "/pricing"},
        "context": {
            "library": {"name": "analytics.js", "version": "next-1.84.3"},
            "page": {
                "path": "/pricing",
                "url": "https://www.acme.example/pricing",
                "referrer": "https://www.google.com/",
                "title": "Pricing",
            },
            "userAgent": "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 Chrome/156.0",
            "locale": "en-US",
        },
    }


def request(path: str, body: bytes, port: int) -> bytes:
    """A complete HTTP/1.1 POST with Basic auth, ready to write again and again."""
    auth = base64.b64encode(f"{KEY}:".encode()).decode()
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Basic {auth}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


async def _exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, req: bytes) -> int:
    writer.write(req)
    status_line = await reader.readline()
    length = 0
    while (line := await reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    await reader.readexactly(length)
    return int(status_line.split()[1])


async def _closed_loop(port: int, reqs: list[bytes], seconds: float) -> dict[str, float]:
    done, failed = 0, 0
    end = time.perf_counter() + seconds

    async def connection(i: int) -> None:
        nonlocal done, failed
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        k = i
        while time.perf_counter() < end:
            status = await _exchange(reader, writer, reqs[k % len(reqs)])
            k += CONNECTIONS
            done += 1
            failed += status != 200
        writer.close()

    started = time.perf_counter()
    await asyncio.gather(*(connection(i) for i in range(CONNECTIONS)))
    return {"requests_per_s": done / (time.perf_counter() - started), "failed": failed}


async def _open_loop(port: int, reqs: list[bytes], rate: float, seconds: float) -> dict[str, float]:
    idle: asyncio.Queue[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = asyncio.Queue()
    for _ in range(64):
        idle.put_nowait(await asyncio.open_connection("127.0.0.1", port))
    latencies: list[float] = []
    failed = 0
    start = time.perf_counter() + 0.1

    async def one(n: int) -> None:
        nonlocal failed
        due = start + n / rate
        await asyncio.sleep(max(0.0, due - time.perf_counter()))
        conn = await idle.get()
        status = await _exchange(*conn, reqs[n % len(reqs)])
        latencies.append(time.perf_counter() - due)  # from when it was due: no omission
        failed += status != 200
        idle.put_nowait(conn)

    await asyncio.gather(*(one(n) for n in range(int(rate * seconds))))
    ms = np.array(latencies) * 1000
    return {
        "rate": rate,
        "p50_ms": float(np.percentile(ms, 50)),
        "p99_ms": float(np.percentile(ms, 99)),
        "max_ms": float(ms.max()),
        "failed": failed,
    }


def _load(mode: str, port: int, seconds: float, rate: float = 0) -> dict[str, float]:
    """Run the load generator in its own process (the server keeps its core)."""
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.collector",
            "_load",
            mode,
            str(port),
            str(seconds),
            str(rate),
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=seconds + 120,
    )
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def _requests(mode: str, port: int) -> tuple[list[bytes], str]:
    if mode == "batch":
        bodies = [
            orjson.dumps({"batch": [event(b * BATCH + i) for i in range(BATCH)]}) for b in range(50)
        ]
        return [request("/v1/batch", body, port) for body in bodies], "batch"
    return [request("/v1/t", orjson.dumps(event(n)), port) for n in range(500)], "single"


# -- the two frameworks, the same handler --------------------------------------------


def _handle(body: bytes) -> int:
    """What both minimal servers do with a request: parse, serialise each event."""
    data = orjson.loads(body)
    events = data.get("batch", [data])
    for e in events:
        e["receivedAt"] = "2026-11-30T12:00:00.000Z"
        orjson.dumps(e)
    return len(events)


def _serve_starlette(port: int) -> None:
    # The candidate not chosen, installed by `make bench` only (extra "bench").
    import uvicorn  # noqa: PLC0415
    from starlette.applications import Starlette  # noqa: PLC0415
    from starlette.requests import Request  # noqa: PLC0415
    from starlette.responses import JSONResponse  # noqa: PLC0415
    from starlette.routing import Route  # noqa: PLC0415

    async def endpoint(request: Request) -> JSONResponse:
        _handle(await request.body())
        return JSONResponse({"success": True})

    app = Starlette(routes=[Route("/v1/{kind}", endpoint, methods=["POST"])])
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


def _serve_aiohttp(port: int) -> None:

    async def endpoint(request: web.Request) -> web.Response:
        _handle(await request.read())
        return web.json_response({"success": True}, dumps=lambda o: orjson.dumps(o).decode())

    app = web.Application()
    app.router.add_post("/v1/{kind}", endpoint)
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)


def frameworks(seconds: float = 10.0) -> dict[str, dict[str, Any]]:
    """Starlette/uvicorn against aiohttp on the same handler."""
    results: dict[str, dict[str, Any]] = {}
    for name in ("starlette", "aiohttp"):
        port = free_port()
        proc = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.collector", "_serve", name, str(port)]
        )
        try:
            wait_listening(port, proc)
            batch = _load("batch", port, seconds)
            results[name] = {
                "batch_requests_per_s": batch["requests_per_s"],
                "events_per_s": batch["requests_per_s"] * BATCH,
                "single_at_1000": _load("single", port, seconds, 1000.0),
            }
        finally:
            stop_process(proc)
    return results


# -- leadflow collect ------------------------------------------------------------------


def collector(bootstrap: str, redis_url: str, seconds: float = 10.0) -> dict[str, Any]:
    """``leadflow collect`` on the broker: batch throughput and ack latency at 1,000/s."""
    config = Path(tempfile.mkdtemp(prefix="bench-collect-")) / "config"
    shutil.copytree(DEFAULT_CONFIG_DIR, config)
    with (config / "engine.toml").open("a") as f:
        f.write("\n" + write_key_table("bench", KEY, rate_per_s=10_000_000))
    port = free_port()
    env = {
        **os.environ,
        "LEADFLOW_CONFIG_DIR": str(config),
        "LEADFLOW_KAFKA_BOOTSTRAP": bootstrap,
        "LEADFLOW_REDIS_URL": redis_url,
        "LEADFLOW_COLLECTOR_PORT": str(port),
        "LEADFLOW_COLLECTOR_LISTEN": "127.0.0.1",
        "LEADFLOW_LOG_LEVEL": "WARNING",
    }
    proc = subprocess.Popen([sys.executable, "-m", "leadflow.cli", "collect"], env=env)
    try:
        wait_listening(port, proc)
        batch = _load("batch", port, seconds)
        return {
            "events_per_s": batch["requests_per_s"] * BATCH,
            "failed_batches": batch["failed"],
            "single_at_1000": _load("single", port, seconds, 1000.0),
        }
    finally:
        stop_process(proc)


def main() -> None:
    """Print the chosen measures as JSON."""
    what = sys.argv[1] if len(sys.argv) > 1 else "all"
    if what == "_serve":
        (_serve_starlette if sys.argv[2] == "starlette" else _serve_aiohttp)(int(sys.argv[3]))
        return
    if what == "_load":
        mode, port, seconds, rate = (
            sys.argv[2],
            int(sys.argv[3]),
            float(sys.argv[4]),
            float(sys.argv[5]),
        )
        reqs, _ = _requests(mode, port)
        run = _open_loop(port, reqs, rate, seconds) if rate else _closed_loop(port, reqs, seconds)
        print(json.dumps(asyncio.run(run)))
        return
    results: dict[str, Any] = {}
    if what in ("frameworks", "all"):
        results["frameworks"] = frameworks()
    if what in ("collector", "all"):
        with LocalBroker() as broker, LocalRedis("redis") as redis_server:
            assert isinstance(broker, LocalBroker) and isinstance(redis_server, LocalRedis)
            create_topics(load_settings(env={"LEADFLOW_KAFKA_BOOTSTRAP": broker.bootstrap}))
            results["collector"] = collector(broker.bootstrap, redis_server.url)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
