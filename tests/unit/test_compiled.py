"""The compiled rules are used only while they were built from the sources now in engine/."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import engine
from engine import COMPILED, DIGESTS, PURE_PYTHON, compiled_build_problem, source_digests


def test_a_build_is_used_only_while_every_source_has_its_recorded_digest(tmp_path: Path) -> None:
    sources = tmp_path / "engine"
    shutil.copytree(engine.SOURCES, sources, ignore=shutil.ignore_patterns("__pycache__"))
    build = tmp_path / "build"
    assert "no compiled build" in str(compiled_build_problem(build, sources))
    build.mkdir()
    (build / DIGESTS).write_text(json.dumps(source_digests(sources)))
    assert compiled_build_problem(build, sources) is None
    edited = sources / "scoring.py"
    edited.write_text(edited.read_text() + "\n# an edit after the build\n")
    assert compiled_build_problem(build, sources) == (
        f"engine/scoring.py changed since {build} was compiled (make compiles it again)"
    )


def test_the_modules_in_use_are_the_ones_the_flag_names() -> None:
    """Compiled modules come from the build, or every one from its source: never a mix."""
    import importlib

    places = {importlib.import_module(f"engine.{name}").__file__ for name in COMPILED}
    where = engine.BUILD if engine.compiled else engine.SOURCES
    assert all(Path(str(p)).is_relative_to(where) for p in places), places
    assert engine.compiled == (
        compiled_build_problem() is None and os.environ.get(PURE_PYTHON) != "1"
    )


def test_plain_python_can_be_asked_for() -> None:
    shown = subprocess.run(
        [
            sys.executable,
            "-c",
            "import engine, engine.scoring as s; print(engine.compiled, s.__file__)",
        ],
        env={**os.environ, PURE_PYTHON: "1"},
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert shown == ["False", str(engine.SOURCES / "scoring.py")]
