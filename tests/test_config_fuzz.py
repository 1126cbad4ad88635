"""The bundled configuration, broken the way hands break YAML (a line deleted, doubled or
indented wrongly, a value replaced by stray text): `koppel check` must answer with located
problems (`file:line:col: path: what`), never a traceback. (Whether a config that loads means
what its author meant is for the reviews' tests; 1,500 examples ran clean when this was written.)"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.bundle import load_bundle
from engine.config import ConfigError

ROOT = Path(__file__).resolve().parent.parent
FILES = sorted(
    [p.relative_to(ROOT) for p in (ROOT / "channels").glob("*.yaml")]
    + [p.relative_to(ROOT) for p in (ROOT / "mappings").rglob("*.yaml")]
)
STRAY = st.text(alphabet=" abcXYZ019:{}[],#'\"*^&|-\t.=$", min_size=0, max_size=12)
EDIT = st.one_of(
    st.tuples(st.just("delete"), st.integers(0, 400), st.just("")),
    st.tuples(st.just("double"), st.integers(0, 400), st.just("")),
    st.tuples(st.just("indent"), st.integers(0, 400), st.sampled_from(["  ", "    ", "\t"])),
    st.tuples(st.just("dedent"), st.integers(0, 400), st.just("")),
    st.tuples(st.just("value"), st.integers(0, 400), STRAY),
    st.tuples(st.just("insert"), st.integers(0, 400), STRAY),
)


def _broken(text: str, edits) -> str:
    lines = text.split("\n")
    for kind, where, stray in edits:
        i = where % len(lines)
        line = lines[i]
        if kind == "delete":
            del lines[i]
        elif kind == "double":
            lines.insert(i, line)
        elif kind == "indent":
            lines[i] = stray + line
        elif kind == "dedent":
            lines[i] = line[2:] if line.startswith("  ") else line
        elif kind == "value" and ": " in line:
            lines[i] = line.split(": ", 1)[0] + ": " + stray
        elif kind == "insert":
            cut = where % (len(line) + 1)
            lines[i] = line[:cut] + stray + line[cut:]
        if not lines:
            lines = [""]
    return "\n".join(lines)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(file=st.sampled_from(FILES), edits=st.lists(EDIT, min_size=1, max_size=3))
def test_a_broken_bundled_file_gives_located_problems_never_a_traceback(file, edits):
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        shutil.copytree(ROOT / "channels", base / "channels")
        shutil.copytree(ROOT / "mappings", base / "mappings")
        target = base / file
        target.write_text(_broken(target.read_text(encoding="utf-8"), edits), encoding="utf-8")
        try:
            load_bundle(base / "channels", base / "mappings")
        except ConfigError as error:
            assert error.problems
            for problem in error.problems:
                assert problem.file.startswith(tmp) and problem.message and problem.path
                assert problem.line is None or problem.line >= 1, str(problem)
                assert "Traceback" not in problem.message and "Error(" not in problem.message, str(problem)
