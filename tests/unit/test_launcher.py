"""The fast entry script (:mod:`supervisor.launch.launcher`): what it holds, that it runs
the shim without ``site``, and that whatever needs site-packages still finds them."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from supervisor.launch import launcher


def test_script_names_the_interpreter_with_one_flag_word_and_the_package_dir() -> None:
    text = launcher.script_text("/venv/bin/python", "/src")
    first, *rest = text.splitlines()
    # Linux hands everything after the interpreter to it as ONE argument: "-I -S" would not do.
    assert first == "#!/venv/bin/python -IS"
    assert any(line.startswith("sys.path.append('/src')") for line in rest)
    assert rest[-2:] == ["from supervisor.shim import main", "sys.exit(main())"]


def test_an_interpreter_path_with_spaces_is_refused() -> None:
    with pytest.raises(ValueError, match="spaces"):
        launcher.script_text("/my venv/bin/python", "/src")


def test_package_dir_holds_the_package() -> None:
    assert (Path(launcher.package_dir()) / "supervisor" / "shim.py").is_file()


def test_main_writes_an_executable_script_that_runs_the_shim(tmp_path: Path) -> None:
    path = tmp_path / "containerd-shim-supervisor-v2"
    path.write_text("old console script")
    assert launcher.main([str(path)]) == 0
    assert stat.S_IMODE(path.stat().st_mode) == 0o755
    assert path.read_text() == launcher.script_text(sys.executable, launcher.package_dir())
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left
    out = subprocess.run([str(path), "-v"], capture_output=True, text=True, check=True).stdout
    assert "Version:" in out


def test_main_refuses_options() -> None:
    assert launcher.main(["--help"]) == 2


def run_isolated(code: str) -> str:
    """``code`` in an interpreter started as the entry script starts it (``-IS``)."""
    script = f"import sys\nsys.path.insert(0, {launcher.package_dir()!r})\n{code}"
    return subprocess.run([sys.executable, launcher.FLAGS, "-c", script], capture_output=True,
                          text=True, check=True, env={**os.environ, "PYTHONPATH": "/nowhere"}
                          ).stdout


def test_the_light_path_runs_without_site() -> None:
    out = run_isolated("import supervisor.shim, supervisor.launch.delete\n"
                       "print('site' in sys.modules, '/nowhere' in sys.path)")
    assert out.split() == ["False", "False"]  # -S, and -I ignored $PYTHONPATH


def test_options_decode_under_the_entry_scripts_flags() -> None:
    """:func:`supervisor.shim.decode_options` reads options by hand: no site, no protobuf
    (the light path may run under an interpreter without our site-packages)."""
    options = b"\n\x1acontainerd.runc.v1.Options\x12\x062\x04crun"  # binary_name="crun"
    out = run_isolated("from supervisor.shim import decode_options\n"
                       f"print(decode_options({options!r}).binary_name,"
                       " 'site' in sys.modules, 'google' in sys.modules)")
    assert out.split() == ["crun", "False", "False"]


def test_full_site_runs_site_once() -> None:
    out = run_isolated("from supervisor.launch.launcher import full_site\n"
                       "full_site(); n = len(sys.path); full_site()\n"
                       "import trio\n"
                       "print(len(sys.path) == n)")
    assert out.split() == ["True"]
