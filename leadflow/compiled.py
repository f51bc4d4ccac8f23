"""Compile the engine's per-event rules with mypyc: ``python -m leadflow.compiled`` (``make``).

The modules in :data:`engine.COMPILED` are copied to a scratch directory,
compiled there (so no ``.so`` ever lands beside the sources, where it would
shadow an edit), and moved whole into ``build/mypyc/`` with the SHA-256 of the
sources they were built from; ``engine/__init__.py`` uses them only while the
sources still match. Needs a C compiler (gcc or clang); without one it says so
and the engine runs as plain Python. A mypyc failure exits 1. ``--clean`` removes the build.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from engine import BUILD, COMPILED, DIGESTS, SOURCES, source_digests


def compile_engine(build: Path = BUILD) -> None:
    """Compile :data:`engine.COMPILED` into ``build``, replacing what was there."""
    if shutil.which("cc") is None and shutil.which("gcc") is None:
        print("mypyc: no C compiler (cc or gcc) on PATH: the engine runs as plain Python")
        return
    started = time.monotonic()
    build.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="mypyc-", dir=build.parent) as scratch:
        work = Path(scratch)
        shutil.copytree(SOURCES, work / "engine", ignore=shutil.ignore_patterns("__pycache__"))
        digests = source_digests(work / "engine")  # what is compiled, even if edited meanwhile
        print(f"mypyc: compiling {len(COMPILED)} engine modules (under a minute)", flush=True)
        done = subprocess.run(
            [sys.executable, "-m", "mypyc", *(f"engine/{name}.py" for name in COMPILED)],
            cwd=work,
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode != 0:
            sys.stderr.write(done.stdout[-4000:] + done.stderr[-4000:])
            raise SystemExit(f"mypyc failed (exit {done.returncode}); the engine runs as Python")
        staged = work / "staged"
        (staged / "engine").mkdir(parents=True)
        for library in work.glob("*.so"):  # the shared runtime, a top-level module
            shutil.move(library, staged)
        for module in (work / "engine").glob("*.so"):
            shutil.move(module, staged / "engine")
        (staged / DIGESTS).write_text(json.dumps(digests, indent=1, sort_keys=True) + "\n")
        shutil.rmtree(build, ignore_errors=True)
        staged.rename(build)
    print(f"mypyc: {build} ready in {time.monotonic() - started:.0f} s", flush=True)


def main() -> None:
    """Command line: compile, or ``--clean``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--clean", action="store_true", help="remove the compiled build")
    args = parser.parse_args()
    if args.clean:
        shutil.rmtree(BUILD, ignore_errors=True)
        print(f"removed {BUILD}: the engine runs as plain Python")
        return
    compile_engine()


if __name__ == "__main__":
    main()
