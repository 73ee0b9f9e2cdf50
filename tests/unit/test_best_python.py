"""scripts/best-python: which interpreter `make` builds the venv from.

The preference order itself is a measured choice (docs/benchmarks.md, "Which Python");
these tests pin the lookup rules: PATH before pyenv's versions, an interpreter that does
not run (a pyenv shim for a version not selected) is skipped, an explicit name or path is
resolved the same way, and a missing one is a clear error with nothing on stdout (the
Makefile then stops before making a venv).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "best-python"
#: The script's order (measured, so read from it rather than copied here).
PREFERRED = re.findall(r'^PREFERRED="([^"]*)"', SCRIPT.read_text(), re.M)[0].split()


def best_python(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Run the script with only ``tmp_path/bin`` and the system dirs on PATH."""
    env = {**os.environ, "PATH": f"{tmp_path / 'bin'}:/usr/bin:/bin",
           "PYENV_ROOT": str(tmp_path / "pyenv")}
    return subprocess.run(["sh", str(SCRIPT), *args], env=env, capture_output=True,
                          text=True, check=False)


def interpreter(path: Path) -> Path:
    """A working interpreter at ``path`` (this one, linked)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.symlink_to(Path(sys.executable).resolve())
    return path


def broken(path: Path) -> Path:
    """An executable that fails as pyenv's shim does for a version not selected."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\necho 'pyenv: command not found' >&2\nexit 127\n")
    path.chmod(0o755)
    return path


def test_the_first_preferred_on_path_wins(tmp_path: Path) -> None:
    assert PREFERRED[-1] == "python3"  # the fallback of a machine with nothing else
    for name in reversed(PREFERRED[1:]):
        interpreter(tmp_path / "bin" / name)
    want = interpreter(tmp_path / "bin" / PREFERRED[0])
    r = best_python(tmp_path)
    assert (r.returncode, r.stdout.strip()) == (0, str(want))


def test_one_that_does_not_run_is_skipped_for_pyenvs_copy(tmp_path: Path) -> None:
    first = PREFERRED[0]
    broken(tmp_path / "bin" / first)
    interpreter(tmp_path / "pyenv" / "versions" / "3.99.0" / "bin" / first)
    want = interpreter(tmp_path / "pyenv" / "versions" / "3.99.2" / "bin" / first)
    r = best_python(tmp_path)
    assert (r.returncode, r.stdout.strip()) == (0, str(want))  # the newest patch release
    r = best_python(tmp_path, first)  # asked for by name: the same lookup
    assert (r.returncode, r.stdout.strip()) == (0, str(want))


def test_an_explicit_path(tmp_path: Path) -> None:
    want = interpreter(tmp_path / "elsewhere" / "python")
    r = best_python(tmp_path, str(want))
    assert (r.returncode, r.stdout.strip()) == (0, str(want))


def test_none_usable_is_a_clear_error(tmp_path: Path) -> None:
    broken(tmp_path / "bin" / "python3.99")
    r = best_python(tmp_path, "python3.99")
    assert r.returncode == 1
    assert r.stdout == ""
    assert "python3.99 not found, does not run, or is older than Python 3." in r.stderr
