"""Leadflow's domain: events, identity, scoring, qualification, lifecycle, routing, store.

The per-event rules (:data:`COMPILED`) may run compiled: ``make`` compiles them
with mypyc, from these very sources, into ``build/mypyc/`` (under a minute with the
machine's C compiler), and recording each source's SHA-256 beside them. They are
used only while every source still has the recorded digest, so an edited module
never runs stale: the engine then runs as plain Python, the same code, and says
why once on the ``leadflow`` logger. ``LEADFLOW_PURE_PYTHON=1`` asks for plain
Python (a profiler that should see the rules' own frames). mypyc checks the type
hints at run time, which is why a hint here must be true, never silenced.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
from pathlib import Path

# The modules mypyc compiles: the rules an event runs through, the rule for a batch and
# the caches between batches. The store, the settings and person_records (msgspec
# structs, whose declared types a compiled class does not keep) stay Python.
COMPILED = (
    "events",
    "identity",
    "scoring",
    "profile",
    "fit",
    "cleansing",
    "qualification",
    "grade",
    "consent",
    "lifecycle",
    "routing",
    "sales",
    "person",
    "batch",
    "state_cache",
    "owner_cache",
)
SOURCES = Path(__file__).resolve().parent
BUILD = SOURCES.parent / "build" / "mypyc"
DIGESTS = "sources.json"  # in BUILD: module -> SHA-256 of the source it was built from
PURE_PYTHON = "LEADFLOW_PURE_PYTHON"


def source_digests(sources: Path = SOURCES) -> dict[str, str]:
    """The SHA-256 of each compiled module's source in ``sources``."""
    return {
        name: hashlib.sha256((sources / f"{name}.py").read_bytes()).hexdigest() for name in COMPILED
    }


def compiled_build_problem(build: Path = BUILD, sources: Path = SOURCES) -> str | None:
    """Why the compiled modules in ``build`` cannot be used now; None when they can."""
    try:
        built = json.loads((build / DIGESTS).read_text())
    except (OSError, ValueError):
        return f"no compiled build in {build} (make compiles one)"
    stale = sorted(n for n, d in source_digests(sources).items() if built.get(n) != d)
    if stale:
        return f"engine/{stale[0]}.py changed since {build} was compiled (make compiles it again)"
    return None


def _use_compiled() -> bool:
    if os.environ.get(PURE_PYTHON) == "1":
        return False
    problem = compiled_build_problem()
    if problem is not None:
        if BUILD.exists():  # a build that no longer fits the sources is worth a word
            logging.getLogger("leadflow").warning("engine runs as plain Python: %s", problem)
        return False
    # The package's compiled modules come first; their shared runtime is a top-level module.
    __path__.insert(0, str(BUILD / "engine"))
    sys.path.append(str(BUILD))
    return True


compiled = _use_compiled()
