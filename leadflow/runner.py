"""Run the dataflow: one process, a local cluster of processes, or one member of a cluster.

Bytewax scales CPU-bound Python with processes, not threads (shared/BYTEWAX.md):
``processes = N`` on one host starts N child processes that form one Bytewax
cluster on loopback ports ``cluster_base_port + i``. For several hosts, run
``leadflow run --process-id I --addresses "h1:2101;h2:2101"`` on each host.
Membership is static: when one process dies the supervisor stops the others
and exits non-zero, so the service manager restarts the whole cluster, which
resumes from recovery.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from types import FrameType

from bytewax.recovery import RecoveryConfig, init_db_dir
from bytewax.run import cli_main
from prometheus_client import start_http_server

import engine
from dataflows.kafka_io import STOPPING, input_tag
from dataflows.metrics import metrics
from dataflows.pipeline import build_flow
from engine.settings import MEMBER_ERRORS, Settings
from engine.store import RedisStore
from leadflow.health import Health, serve_health
from leadflow.servers import die_with_parent, stop_process

log = logging.getLogger(__name__)

# Recovery partitions must be at least the largest worker count ever used.
MIN_RECOVERY_PARTITIONS = 16
# Names the Kafka cluster whose offsets the recovery partitions hold.
RECOVERY_MARKER = "leadflow-input.json"
# The engine allocates many short-lived dicts per batch while holding many live
# ones; with CPython's default threshold (700) the cyclic GC ran so often that
# JSON decoding cost 2.5x more (measured: 6.6 -> 2.7 us per event).
GC_THRESHOLDS = (50_000, 20, 20)


def tune_gc() -> None:
    """Collect young objects less often; move start-up objects out of the GC's sight."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


class _StopSignal:
    """Whether SIGINT or SIGTERM asked this process to stop."""

    received = False


def _graceful_stop() -> None:
    """Make SIGTERM and Ctrl-C drain and stop the flow; a second signal stops it at once.

    The first signal ends every input partition at its next read (STOPPING): the
    flow finishes the batches it holds and stops with its last epoch committed,
    and no exception crosses Bytewax's Rust code (which would print a panic).
    A second signal interrupts whatever runs (a flush waiting for a dead broker).
    """

    def handler(_sig: int, _frame: FrameType | None) -> None:
        if _StopSignal.received:
            raise KeyboardInterrupt
        _StopSignal.received = True
        STOPPING.set()
        log.info("stopping: finishing the batches in hand (signal again to stop at once)")

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


def serve_metrics(settings: Settings, process_id: int) -> None:
    """Serve /metrics (ours and Bytewax's Kafka gauges: one registry) on this process's port."""
    if settings.metrics.port:
        metrics()  # register ours before the first scrape
        port, listen = settings.metrics.port + process_id, settings.metrics.listen
        start_http_server(port, addr=listen)
        log.info("metrics on http://%s:%d/metrics", listen, port)


_PEER_LOST = ("Send thread panic", "Recv thread panic", "PanicException")


class MemberFailed(RuntimeError):
    """The dataflow stopped on a panic (a peer process failed); the cause is in its log."""


def causes(error: BaseException) -> list[BaseException]:
    """``error`` and the exceptions behind it, outermost first (Bytewax wraps what matters)."""
    chain, seen = [error], {id(error)}
    while True:
        inner = error.__cause__ or (None if error.__suppress_context__ else error.__context__)
        if inner is None or id(inner) in seen:
            return chain
        seen.add(id(inner))
        chain.append(inner)
        error = inner


def root_cause(error: BaseException) -> BaseException:
    """The innermost exception behind ``error``."""
    return causes(error)[-1]


def describe(error: BaseException) -> str:
    """One line: the root cause's type and message."""
    cause = root_cause(error)
    return f"{type(cause).__name__}: {str(cause).splitlines()[0] if str(cause) else ''}".strip()


def prepare_recovery(
    settings: Settings, cluster: dict[str, str], member: tuple[int, int] | None = None
) -> None:
    """Make the recovery directory ready: for this Kafka cluster, its partitions present.

    Recovery stores input offsets; offsets of another cluster (a new embedded
    broker, a rebuilt test cluster) would skip or misplace input, so such data
    is dropped with a warning and the flow starts from the beginning of the
    input, which the engine's idempotent state makes harmless. Partitions are
    created in a staging directory and renamed into place, so a crash during
    creation leaves all of them or none. Called once per host, before any
    process of the dataflow starts.

    ``member`` (process id, members) is a member on a host of its own, with a
    directory of its own. Bytewax needs every partition exactly once across the
    cluster, not once per host: copies made on each host break the first
    rescale (every process panics). So the first cluster on an input shares
    the partitions out, member ``i`` of ``n`` taking those ``p % n == i``, and
    records ``n`` in Redis; a member that joins later (``i >= n``) starts
    with none, and Bytewax brings the state it needs to it. A member whose
    share was made once and is gone (a lost volume) stops with
    :class:`RecoveryVolumeLost` and what to do: Bytewax cannot resume from the
    other members' partitions alone.
    """
    directory = settings.dataflow.recovery_dir
    if not directory:
        return
    path = Path(directory)
    marker = path / RECOVERY_MARKER
    if marker.exists() and json.loads(marker.read_text()) != cluster:
        log.warning(
            "recovery data in %s is for another Kafka cluster (%s); starting from the beginning",
            path,
            marker.read_text().strip(),
        )
        shutil.rmtree(path)
    layout = _RecoveryLayout(settings, cluster, member) if member else None
    if marker.exists() and (layout or any(path.glob("part-*.sqlite3"))):
        if layout:
            layout.made()
        return
    shutil.rmtree(path, ignore_errors=True)
    staging = path.parent / f".{path.name}.new"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    workers = settings.dataflow.processes * settings.dataflow.workers_per_process
    if layout:
        workers = layout.first * settings.dataflow.workers_per_process
    init_db_dir(staging, max(MIN_RECOVERY_PARTITIONS, workers))
    if layout:
        for part in staging.glob("part-*.sqlite3"):
            if int(part.stem.removeprefix("part-")) % layout.first != layout.index:
                part.unlink()
    (staging / RECOVERY_MARKER).write_text(json.dumps(cluster))
    staging.rename(path)
    if layout:
        layout.made()
    count = len(list(path.glob("part-*.sqlite3")))
    log.info("recovery partitions created in %s: %d of them", path, count)


class RecoveryVolumeLost(RuntimeError):
    """A member's share of the recovery partitions is gone: the cluster cannot resume."""


class _RecoveryLayout:
    """A member's share of the recovery partitions, as kept in Redis (engine.store)."""

    def __init__(self, settings: Settings, cluster: dict[str, str], member: tuple[int, int]):
        self.store = RedisStore(settings.redis)
        self.tag = input_tag(cluster)
        self.index = member[0]
        self.first, made = self.store.recovery_layout(self.tag, *member)
        directory = settings.dataflow.recovery_dir
        if made and not (Path(directory) / RECOVERY_MARKER).exists():
            self.store.close()
            # Bytewax cannot resume with a partition empty or missing (every process panics).
            raise RecoveryVolumeLost(
                f"the recovery directory {directory} of member {self.index} is gone, and with "
                f"it partitions of the whole cluster's recovery: restore it, or stop every "
                f"member, empty every member's recovery directory and delete the Redis key "
                f"{self.store.recovery_key(self.tag)}; the engine then resumes from the done "
                f"offsets in Redis"
            )

    def made(self) -> None:
        """Record in Redis that this member's share exists (a joiner's share is empty)."""
        if self.index < self.first:
            self.store.recovery_made(self.tag, self.index)
        self.store.close()


def recovery_config(settings: Settings) -> RecoveryConfig | None:
    """Recovery config for a prepared directory (:func:`prepare_recovery`); None when off."""
    directory = settings.dataflow.recovery_dir
    return RecoveryConfig(directory) if directory else None


def run_member(
    settings: Settings, process_id: int | None = None, addresses: list[str] | None = None
) -> None:
    """Run this process's part of the dataflow until the input ends or we are stopped."""
    _graceful_stop()
    tune_gc()
    serve_metrics(settings, process_id or 0)
    recovery = recovery_config(settings)
    epoch = timedelta(seconds=settings.dataflow.snapshot_interval_s)
    log.info(
        "starting dataflow: process %s of %s, %d worker(s), recovery %s, rules %s",
        process_id if process_id is not None else 0,
        len(addresses) if addresses else 1,
        settings.dataflow.workers_per_process,
        "on" if recovery else "off",
        "compiled (mypyc)" if engine.compiled else "plain Python",
    )
    health = Health(settings)
    if settings.metrics.health_port:
        serve_health(
            health, settings.metrics.health_port + (process_id or 0), settings.metrics.listen
        )
    health.running = True
    try:
        cli_main(
            build_flow(
                settings,
                workers=(len(addresses) if addresses else 1)
                * settings.dataflow.workers_per_process,
            ),
            workers_per_process=settings.dataflow.workers_per_process,
            process_id=process_id,
            addresses=addresses,
            epoch_interval=epoch,
            recovery_config=recovery,
        )
    except KeyboardInterrupt:
        log.info("stopped")
    except BaseException as e:  # Bytewax's errors, and pyo3's PanicException (not an Exception)
        if isinstance(e, SystemExit | GeneratorExit):
            raise
        # A second stop signal that lands inside a step (a Redis retry, a wait for
        # the broker) reaches us wrapped, or, inside librdkafka's flush, as a
        # SystemError without its KeyboardInterrupt: still a requested stop.
        if not _StopSignal.received:
            path = os.environ.get(MEMBER_ERRORS)
            if path and not Path(path).exists():  # a step's own report comes first
                Path(path).write_text(describe(e))
            if isinstance(e, Exception):
                raise
            raise MemberFailed(describe(e)) from e
        log.info("stopped (%s)", describe(e))
    else:
        if _StopSignal.received:
            log.info("stopped")


def run_local_cluster(settings: Settings, config_dir: str) -> int:
    """Start ``dataflow.processes`` member processes on this host and supervise them."""
    n = settings.dataflow.processes
    base = settings.dataflow.cluster_base_port
    addresses = ";".join(f"127.0.0.1:{base + i}" for i in range(n))
    extra = ["--stop-at-end"] if settings.dataflow.stop_at_end else []
    extra += ["--clock", settings.dataflow.clock]
    errors = Path(tempfile.mkdtemp(prefix="leadflow-members-"))
    children = [
        subprocess.Popen(  # our own interpreter and module
            [
                sys.executable, "-m", "leadflow.cli", "--config-dir", config_dir,
                "run", "--process-id", str(i), "--addresses", addresses, "--supervised", *extra,
            ],
            env={**os.environ, MEMBER_ERRORS: str(errors / f"member-{i}")},
            preexec_fn=die_with_parent,  # noqa: PLW1509  # children must not outlive us
        )
        for i in range(n)
    ]  # fmt: skip
    stopping = False

    def stop(_sig: int, _frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    exited: list[int] = []  # members in the order they exited
    try:
        while not stopping:
            codes = [c.poll() for c in children]
            exited += [i for i, code in enumerate(codes) if code is not None and i not in exited]
            if all(code is not None for code in codes) or any(codes):
                break
            time.sleep(0.2)
        # A member that failed brings the others down ("Send thread panic"): give them
        # a moment to say so, so the first failure can be told from its echoes.
        deadline = time.monotonic() + (0 if stopping else 2.0)
        while time.monotonic() < deadline and any(c.poll() is None for c in children):
            time.sleep(0.1)
    finally:
        for c in children:
            stop_process(c, sig=signal.SIGINT)
    return _cluster_exit(children, errors, stopping, exited)


def _cluster_exit(
    children: list[subprocess.Popen[bytes]], errors: Path, stopping: bool, exited: list[int]
) -> int:
    """The cluster's exit code, after logging which member failed first and why."""
    failed = []
    order = exited + [i for i in range(len(children)) if i not in exited]
    for i in order:  # the first to exit first: the others mostly follow it down
        c = children[i]
        if c.returncode:
            note = errors / f"member-{i}"
            failed.append((i, c.returncode, note.read_text() if note.exists() else ""))
    shutil.rmtree(errors, ignore_errors=True)
    if stopping or not failed:
        return 0
    # The member whose error is its own, not the loss of a peer, is the cause.
    cause = next((f for f in failed if f[2] and not f[2].startswith(_PEER_LOST)), failed[0])
    i, code, why = cause
    code = code if 0 < code < 128 else 1  # killed by a signal (an abort on the way down)
    log.error(
        "dataflow process %d failed (exit %d): %s; the cluster stopped", i, code, why or "no error"
    )
    for j, other, what in failed:
        if j != i:
            log.info("process %d stopped after it (exit %d): %s", j, other, what or "-")
    return code
