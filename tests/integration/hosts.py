"""Several hosts on this machine: network namespaces on a private bridge.

Each host is a network namespace with its own address and its own loopback,
joined to the others by a veth pair on a bridge that lives in this namespace
and carries the bridge's own address (the "gateway"), where the tests' broker
and Redis listen. Nothing is routed off the machine. Making namespaces needs
root (CAP_NET_ADMIN and CAP_SYS_ADMIN), which CI here has.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass


@dataclass(frozen=True)
class Hosts:
    """The namespaces made, their addresses, and the bridge's address."""

    names: list[str]
    addresses: list[str]
    gateway: str

    def command(self, host: int, argv: list[str]) -> list[str]:
        """``argv`` run inside host ``host``'s network namespace."""
        return ["ip", "netns", "exec", self.names[host], *argv]


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


def why_no_hosts() -> str:
    """Why this machine cannot make test hosts ('' when it can)."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    name = f"lfprobe{os.getpid() % 100_000}"
    try:
        _ip("netns", "add", name)
    except (OSError, subprocess.CalledProcessError) as e:
        return f"`ip netns add` failed: {getattr(e, 'stderr', b'') or e}"
    _ip("netns", "del", name)
    return ""


@contextmanager
def hosts(count: int) -> Iterator[Hosts]:
    """``count`` hosts on a new bridge; every trace (processes, links, namespaces) removed after."""
    tag = f"{os.getpid() % 100_000}{random.randrange(100)}"
    subnet = f"10.213.{random.randrange(1, 250)}"
    bridge = f"lfb{tag}"
    made = Hosts([f"lf{tag}h{i}" for i in range(count)], [], f"{subnet}.254")
    try:
        _ip("link", "add", bridge, "type", "bridge")
        _ip("addr", "add", f"{made.gateway}/24", "dev", bridge)
        _ip("link", "set", bridge, "up")
        for i, ns in enumerate(made.names):
            outside, inside = f"lf{tag}v{i}", f"lf{tag}p{i}"
            _ip("netns", "add", ns)
            _ip("link", "add", outside, "type", "veth", "peer", "name", inside)
            _ip("link", "set", inside, "netns", ns)
            _ip("link", "set", outside, "master", bridge)
            _ip("link", "set", outside, "up")
            address = f"{subnet}.{i + 1}"
            _ip("-n", ns, "addr", "add", f"{address}/24", "dev", inside)
            _ip("-n", ns, "link", "set", inside, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
            made.addresses.append(address)
        yield made
    finally:
        for ns in made.names:
            pids = subprocess.run(
                ["ip", "netns", "pids", ns], capture_output=True, text=True, check=False
            ).stdout.split()
            for pid in pids:  # no process outlives its host
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)
        subprocess.run(["ip", "link", "del", bridge], capture_output=True, check=False)
