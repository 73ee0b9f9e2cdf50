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
    # Everything beyond the light actions runs in the interpreter the script names.
    assert rest[-2:] == ["from supervisor.shim import main",
                         "sys.exit(main(python='/venv/bin/python'))"]


def test_the_light_interpreter_goes_in_the_shebang_the_venvs_in_the_call() -> None:
    first, *rest = launcher.script_text("/venv/bin/python", "/src", "/usr/bin/python3").splitlines()
    assert first == "#!/usr/bin/python3 -IS"
    assert rest[-1] == "sys.exit(main(python='/venv/bin/python'))"
    with pytest.raises(ValueError, match="spaces"):
        launcher.script_text("/venv/bin/python", "/src", "/my python/python3")


def test_light_min_is_pyprojects_requires_python() -> None:
    text = (Path(launcher.package_dir()) / "pyproject.toml").read_text()
    wanted = ".".join(map(str, launcher.LIGHT_MIN))
    assert f'requires-python = ">={wanted}"' in text


def test_choose_light_takes_the_fastest_that_saves_the_margin(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    pythons = {}
    for name in ("venv", "fast", "faster-but-broken", "slow", "almost"):
        pythons[name] = tmp_path / name
        pythons[name].write_text("")
        pythons[name].chmod(0o755)
    costs = {"venv": 6.0, "fast": 4.0, "faster-but-broken": 1.0, "slow": 9.0, "almost": 5.5}
    monkeypatch.setattr(launcher, "start_cost", lambda p: costs[Path(p).name])
    monkeypatch.setattr(launcher, "_runs_light_path",
                        lambda p, packages: Path(p).name != "faster-but-broken")
    venv = str(pythons["venv"])

    def choose(*names: str) -> str:
        return Path(launcher.choose_light(venv, "/src", tuple(str(pythons[n]) for n in names))
                    ).name

    assert choose("slow", "fast", "faster-but-broken") == "fast"
    assert choose("almost") == "venv"  # 8 % faster: not worth a second interpreter
    assert choose("faster-but-broken") == "venv"
    assert choose() == "venv"
    (tmp_path / "link").symlink_to(pythons["venv"])  # the venv's own interpreter again
    costs["link"] = 0.0
    assert Path(launcher.choose_light(venv, "/src", (str(tmp_path / "link"),))).name == "venv"


def test_an_interpreter_path_with_spaces_is_refused() -> None:
    with pytest.raises(ValueError, match="spaces"):
        launcher.script_text("/my venv/bin/python", "/src")


def test_package_dir_holds_the_package() -> None:
    assert (Path(launcher.package_dir()) / "supervisor" / "shim.py").is_file()


def test_main_writes_an_executable_script_that_runs_the_shim(tmp_path: Path) -> None:
    path = tmp_path / "containerd-shim-supervisor-v2"
    path.write_text("old console script")
    assert launcher.main(["--light", "venv", str(path)]) == 0
    assert stat.S_IMODE(path.stat().st_mode) == 0o755
    assert path.read_text() == launcher.script_text(sys.executable, launcher.package_dir())
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left
    out = subprocess.run([str(path), "-v"], capture_output=True, text=True, check=True).stdout
    assert "Version:" in out


def test_main_refuses_options() -> None:
    assert launcher.main(["--help"]) == 2


def light_candidates() -> list[str]:
    """The distribution interpreters here that run the light path (none: skip)."""
    return [p for p in launcher.LIGHT_CANDIDATES
            if os.access(p, os.X_OK) and launcher._runs_light_path(p, launcher.package_dir())]


def test_a_script_with_a_light_interpreter_runs_the_light_actions_there(tmp_path: Path) -> None:
    found = light_candidates()
    if not found:
        pytest.skip("no distribution Python 3.11+ here")
    path = tmp_path / "containerd-shim-supervisor-v2"
    assert launcher.main(["--light", found[0], str(path)]) == 0
    assert path.read_text().startswith(f"#!{found[0]} -IS\n")
    out = subprocess.run([str(path), "-v"], capture_output=True, text=True, check=True).stdout
    assert "Version:" in out


def test_a_light_interpreter_without_bytecode_is_not_used(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    path = tmp_path / "containerd-shim-supervisor-v2"
    monkeypatch.setattr(launcher, "_runs_light_path", lambda python, packages: True)
    monkeypatch.setattr(launcher, "compile_for", lambda python, packages: False)
    assert launcher.main(["--light", "/usr/bin/python3", str(path)]) == 0
    assert path.read_text() == launcher.script_text(sys.executable, launcher.package_dir())


def test_a_light_interpreter_that_cannot_run_the_light_path_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "containerd-shim-supervisor-v2"
    assert launcher.main(["--light", "/bin/false", str(path)]) == 1
    assert not path.exists()


def test_the_daemon_action_goes_on_in_the_daemons_interpreter(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from supervisor import shim  # noqa: PLC0415

    execs: list[tuple[str, list[str]]] = []
    monkeypatch.setattr(os, "execv", lambda path, argv: execs.append((path, argv)))
    monkeypatch.setattr(sys, "argv", ["/venv/bin/containerd-shim-supervisor-v2"])
    shim.in_daemon_python(sys.executable, ["-id", "c"])
    assert execs == []  # already there
    shim.in_daemon_python("/venv/bin/python", ["-id", "c"])
    assert execs == [("/venv/bin/python", ["/venv/bin/python",
                                           "/venv/bin/containerd-shim-supervisor-v2", "-id", "c"])]


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
