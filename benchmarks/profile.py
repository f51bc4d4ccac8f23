"""Where the engine's time goes: ``leadflow run`` under py-spy, summarised (``make profile``).

``python -m benchmarks.profile [--people 40000] [--events 100000] [--processes 1]``

Fills a local broker with the benchmark workload, runs ``leadflow run
--stop-at-end`` under ``py-spy record`` (200 samples/s, child processes
included) and prints the functions with the largest share of samples,
inclusive (the function and what it calls) and self (its own code; C
extensions such as orjson count as the calling function). The raw collapsed
stacks stay in ``var/profile.txt`` for flame-graph tools.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

from benchmarks import workload
from benchmarks.suite import create, produce
from engine.settings import load_settings
from leadflow.servers import LocalBroker, LocalRedis, free_port

_FRAME = re.compile(r"(.*?) \((?:.*/)?([^/:]+)(?::\d+)?\)$")


def shares(collapsed: Path) -> tuple[Counter[str], Counter[str], int]:
    """Inclusive and self samples per function (``name (file)``), and the total."""
    inclusive: Counter[str] = Counter()
    own: Counter[str] = Counter()
    total = 0
    for line in collapsed.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        n = int(count)
        total += n
        names = []
        for frame in stack.split(";"):
            m = _FRAME.match(frame)
            if m:  # process headers have no "(file:line)"
                names.append(f"{m.group(1)} ({m.group(2)})")
        for name in set(names):
            inclusive[name] += n
        if names:
            own[names[-1]] += n
    return inclusive, own, total


def main() -> None:
    """Profile one run and print the summary."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--people", type=int, default=40_000)
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--processes", type=int, default=1)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--out", default="var/profile.txt")
    args = parser.parse_args()
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    config = workload.bench_config(Path(tempfile.mkdtemp()) / "config")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with LocalBroker() as broker, LocalRedis("redis") as server:
        assert isinstance(broker, LocalBroker) and isinstance(server, LocalRedis)
        env = workload.engine_env(config, broker.bootstrap, server.url, free_port())
        settings = load_settings(config, env=env)
        create(broker.bootstrap, list(settings.topics.all()), 2)
        produce(
            broker.bootstrap, settings.topics.events, workload.encoded(args.people, args.events)
        )
        run = [sys.executable, "-m", "leadflow.cli", "run", "--stop-at-end"]
        run += ["--processes", str(args.processes)]
        subprocess.run(
            [spy, "record", "-r", "200", "-f", "raw", "-o", str(out), "--subprocesses", "--", *run],
            env=env,
            check=True,
            capture_output=True,
        )
    inclusive, own, total = shares(out)
    print(f"{total:,} samples; collapsed stacks in {out}")
    for title, counts in (("inclusive", inclusive), ("self", own)):
        print(f"\n{title}:")
        for name, n in counts.most_common(args.top):
            print(f"{100 * n / total:5.1f}%  {name}")


if __name__ == "__main__":
    main()
