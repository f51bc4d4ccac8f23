"""Liveness and readiness over HTTP, for Kubernetes probes and load balancers.

``GET /livez``: 200 while the process serves requests (the dataflow runs in the
main thread: when it ends, the process ends). ``GET /readyz``: 200 when Redis
answers a PING, the Kafka cluster answers a metadata request, the dataflow is
running and, if this process reads input partitions, it polled them in the
last ``STALE_INPUT_S`` seconds and its consumer reports no error (a poll that
brings only errors is no read); 503 otherwise. The body also says how many
messages were read and lists input partitions found reset (a broker that lost
its log, see dataflows.kafka_io). Both answer JSON with each
check's result. Checks are cached for ``CACHE_S`` so probes cost nothing.
"""

from __future__ import annotations

import logging
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import orjson
import redis
from confluent_kafka.admin import AdminClient

from dataflows.kafka_io import INPUT_CLOCK, client_options
from engine.settings import Settings

log = logging.getLogger(__name__)

CACHE_S = 2.0
STALE_INPUT_S = 30.0


class Health:
    """What the probes report for this process."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.running = False  # set around the dataflow's run
        self._cached: tuple[float, bool, dict[str, Any]] = (-CACHE_S, False, {})
        self._lock = threading.Lock()

    def ready(self) -> tuple[bool, dict[str, Any]]:
        """Whether this process is ready, and every check's outcome."""
        with self._lock:
            at, ok, checks = self._cached
            if time.monotonic() - at < CACHE_S:
                return ok, checks
            checks = {
                "redis": _redis_check(self.settings),
                "kafka": _kafka_check(self.settings),
                "dataflow": "ok" if self.running else "not running",
                "input": _input_check(),
            }
            ok = all(v == "ok" for v in checks.values())
            self._cached = (time.monotonic(), ok, checks)
            return ok, checks


def _redis_check(settings: Settings) -> str:
    client = redis.Redis.from_url(settings.redis.url, socket_timeout=1, socket_connect_timeout=1)
    try:
        client.ping()
        return "ok"
    except redis.RedisError as e:
        return f"unreachable: {type(e).__name__}"
    finally:
        client.close()


def _kafka_check(settings: Settings) -> str:
    try:
        AdminClient(client_options(settings)).list_topics(timeout=2)
        return "ok"
    except Exception as e:  # any failure means "not ready", with its name
        return f"unreachable: {type(e).__name__}"


def _input_check() -> str:
    """Reading: polled lately, and the polls bring messages or nothing, not only errors."""
    if not INPUT_CLOCK.partitions:
        return "ok"  # this process reads no input partition (more workers than partitions)
    if INPUT_CLOCK.consumer_errors:
        topic, error = next(iter(INPUT_CLOCK.consumer_errors.items()))
        return f"consumer error on {topic}: {error}"
    idle = time.monotonic() - INPUT_CLOCK.last_read
    return "ok" if idle < STALE_INPUT_S else f"no read for {idle:.0f}s"


def serve_health(health: Health, port: int, listen: str = "0.0.0.0") -> ThreadingHTTPServer:
    """Serve /livez and /readyz on ``listen``:``port`` from a daemon thread."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # the name http.server calls
            body: dict[str, Any]
            if self.path == "/livez":
                code, body = 200, {"status": "alive"}
            elif self.path == "/readyz":
                ok, checks = health.ready()
                code, body = (200 if ok else 503), {"ready": ok, "checks": checks}
                body["messages_read"] = INPUT_CLOCK.messages
                if INPUT_CLOCK.resets:  # handled by kafka.on_input_reset, but never silent
                    body["input_resets"] = INPUT_CLOCK.resets
            else:
                code, body = 404, {"error": "try /livez or /readyz"}
            data = orjson.dumps(body)
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:  # probes are not news
            return

    server = ThreadingHTTPServer((listen, port), Handler)
    threading.Thread(target=server.serve_forever, name="health", daemon=True).start()
    log.info("health on http://%s:%d/livez and /readyz", listen, port)
    return server
