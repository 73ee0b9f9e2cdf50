"""The fast entry script: ``containerd-shim-supervisor-v2`` run as ``python -I -S``.

containerd waits for ``start`` and ``delete``, and most of what they cost
before our first line runs is the interpreter's: ``site`` (it scans the venv's
``site-packages`` and runs its ``.pth`` files) and, in the console script
pip writes, ``import re`` for one ``re.sub`` on ``argv[0]`` (re loads enum,
functools and the regex compiler).  A console script cannot carry interpreter
flags (pip writes its shebang itself, and drops any flags a data script's
``#!python`` line had), so this module writes the entry script instead::

    python -m supervisor.launch.launcher [--light auto|venv|PYTHON] [PATH]

writes ``PATH`` (default: ``containerd-shim-supervisor-v2`` beside this
interpreter, over pip's console script) atomically, mode 0755: a shebang of
the *light* interpreter (below) with ``-IS`` (one word: Linux passes the rest
of a shebang line as a single argument), the directory holding the
``supervisor`` package put on ``sys.path`` after the standard library (so
nothing there shadows it), then :func:`supervisor.shim.main` told the
*daemon's* interpreter: this one (``sys.executable``: the venv's, never the
one it links to).  ``make venv`` runs it; an installed copy runs it once per
install (README), instead of linking the console script.  The console script
and ``python -m supervisor.shim`` keep working as before, only slower.

Two interpreters.  The light actions (``start``, ``delete``, ``-info``,
``-v``) import the standard library and :mod:`supervisor.launch` alone
(``tests/unit/test_layering.py``), so any CPython from :data:`LIGHT_MIN` on
runs them, and the interpreter's own start is most of what they cost.  A
distribution's build (static libpython, PGO and LTO: Debian's ``python3.11``
starts in ~3.9 ms of CPU) starts faster than a pyenv or source build with a
shared libpython (~6.2 ms for pyenv's 3.12 here), and containerd runs the
binary twice per container.  ``--light auto`` (the default) therefore times
``-IS -c pass`` in this interpreter and in the distribution's
(:data:`LIGHT_CANDIDATES`) that run the light path from this package, and
puts the fastest in the shebang when it saves at least :data:`LIGHT_MARGIN`
of this one's time (:func:`choose_light`); the chosen one gets its own
bytecode of the package, or is not used where that cannot be written.
``--light venv`` keeps this interpreter for everything; ``--light PYTHON``
names one.  Everything else (the daemon, the fork server, the CLI) runs in
the daemon's interpreter, whose ``site-packages`` hold trio and protobuf:
:func:`supervisor.shim.main` re-executes any other action there.

Design.  ``-S``: no ``site`` at start-up, so only the ``supervisor`` package
is importable until :func:`full_site` runs ``site.main()`` -- which the daemon
side does before it imports anything beyond the standard library (``start``,
``delete`` and ``-info`` never do, runtime options included).  ``-I``: no
``PYTHON*`` variables from containerd's environment and no script directory
on ``sys.path``, so nothing but the named package directory decides what a
root ``start`` imports.

Invariants.  The daemon a cold ``start`` spawns runs the same script
through the daemon's interpreter with no flags
(:func:`supervisor.launch.start.daemon_argv`), so it gets ``site`` as a
console script would; inserting the package directory again is then
harmless.  The script holds three facts of its install (two interpreters, the
package directory): a moved venv or package, or a light interpreter removed,
needs the script written again, as pip's own scripts would.
"""

from __future__ import annotations

import os
import sys

#: The binary containerd runs (``containerd-shim-<runtime>-v2``): one name for all.
NAME = "containerd-shim-supervisor-v2"
#: The interpreter flags of the entry script: isolated (``-I``), no ``site`` (``-S``).
FLAGS = "-IS"
#: The oldest Python the light actions run on: pyproject.toml's ``requires-python``
#: (``tests/unit/test_launcher.py`` checks that they agree).
LIGHT_MIN = (3, 11)
#: Every standard module the light actions may import, at any point of their paths (a
#: distribution may split its standard library: Debian's ``python3-minimal`` has no
#: ``json``); ``tests/unit/test_layering.py`` checks the list against the code.  (The
#: sha256 module, ``_sha2`` or ``_sha256`` by version, has a fallback: not listed.)
LIGHT_STDLIB = ("__future__", "_json", "_signal", "_socket", "collections", "ctypes",
                "errno", "fcntl", "hashlib", "json", "os", "resource", "shutil", "site",
                "struct", "subprocess", "sys", "time", "tomllib", "typing", "zlib")
#: Interpreters ``--light auto`` tries besides the venv's: a distribution's own builds.
LIGHT_CANDIDATES = ("/usr/bin/python3", "/usr/bin/python3.11", "/usr/bin/python3.12",
                    "/usr/bin/python3.13")
#: The share of the venv interpreter's start time another must save to be chosen.
LIGHT_MARGIN = 0.15
#: How many timed starts decide (the median of each interpreter's).
LIGHT_SAMPLES = 9


def full_site() -> None:
    """Run ``site`` now if the interpreter started without it (``-S``): the venv's
    ``site-packages`` and ``.pth`` files, for what imports beyond the standard library."""
    if "site" not in sys.modules:
        import site

        site.main()


def package_dir() -> str:
    """The directory that holds the ``supervisor`` package (site-packages, or the source
    tree of an editable install)."""
    import supervisor

    return os.path.dirname(os.path.dirname(os.path.abspath(supervisor.__file__)))


def script_text(python: str, packages: str, light: str | None = None) -> str:
    """The entry script: the light actions in ``light`` (default: ``python``), everything
    else in ``python``, the daemon's interpreter; the package from ``packages``."""
    light = light or python
    for path in (python, light):
        if any(c.isspace() for c in path):
            raise ValueError(f"a shebang cannot name an interpreter path with spaces: {path!r}")
    return (f"#!{light} {FLAGS}\n"
            f"# {NAME}: written by `python -m supervisor.launch.launcher`; runs the shim\n"
            "# without site and isolated (see that module). Write it again if this moves.\n"
            "import sys\n"
            f"sys.path.append({packages!r})  # after the standard library: never shadows it\n"
            "from supervisor.shim import main\n"
            f"sys.exit(main(python={python!r}))\n")


def _runs_light_path(python: str, packages: str) -> bool:
    """Whether ``python`` is a CPython from :data:`LIGHT_MIN` on that imports, without
    ``site``, every module of the light actions from ``packages`` and every standard
    module they may import later (:data:`LIGHT_STDLIB`)."""
    import subprocess

    folder = os.path.join(packages, "supervisor", "launch")
    try:
        names = sorted(n[:-3] for n in os.listdir(folder) if n.endswith(".py"))
    except OSError:
        return False
    modules = [*LIGHT_STDLIB, "supervisor.shim",
               *(f"supervisor.launch.{n}" for n in names if n != "__init__")]
    check = (f"import sys; sys.path.append({packages!r}); "
             f"assert sys.implementation.name == 'cpython' and sys.version_info >= {LIGHT_MIN}; "
             f"import {', '.join(modules)}")
    try:
        return subprocess.run([python, FLAGS, "-c", check], stdin=subprocess.DEVNULL,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              timeout=30, check=False).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def start_cost(python: str, samples: int = LIGHT_SAMPLES) -> float:
    """The median CPU seconds (user + system) of ``python -IS -c pass``."""
    costs = []
    for _ in range(samples):
        pid = os.posix_spawn(python, [python, FLAGS, "-c", "pass"], {})
        _, _, usage = os.wait4(pid, 0)
        costs.append(usage.ru_utime + usage.ru_stime)
    costs.sort()
    return costs[len(costs) // 2]


def choose_light(python: str, packages: str,
                 candidates: tuple[str, ...] = LIGHT_CANDIDATES) -> str:
    """The interpreter the light actions run in: the fastest to start of ``python`` and
    the ``candidates`` that run them, if it saves :data:`LIGHT_MARGIN`; else ``python``."""
    seen = {os.path.realpath(python)}
    usable = []
    for candidate in candidates:
        real = os.path.realpath(candidate)
        if real not in seen and os.access(real, os.X_OK):
            seen.add(real)
            if _runs_light_path(candidate, packages):
                usable.append(candidate)
    if not usable:
        return python
    own = start_cost(python)
    cost, best = min((start_cost(c), c) for c in usable)
    return best if cost <= own * (1 - LIGHT_MARGIN) else python


def compile_for(python: str, packages: str) -> bool:
    """Write the package's bytecode for ``python`` too; whether it could (a package
    directory we may not write: without bytecode every ``start`` would compile the
    light path again, which costs more than the faster start saves)."""
    import subprocess

    return subprocess.run([python, "-I", "-m", "compileall", "-q",
                           os.path.join(packages, "supervisor")], stdin=subprocess.DEVNULL,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                          check=False).returncode == 0


def write(path: str, python: str | None = None, packages: str | None = None,
          light: str | None = None) -> None:
    """Write the entry script to ``path`` atomically (a temporary file, then rename)."""
    text = script_text(python or sys.executable, packages or package_dir(), light)
    tmp = os.path.join(os.path.dirname(os.path.abspath(path)), f".{os.path.basename(path)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o755)
    try:
        os.write(fd, text.encode())
        os.fchmod(fd, 0o755)
    finally:
        os.close(fd)
    os.replace(tmp, path)


USAGE = (f"usage: python -m supervisor.launch.launcher [--light auto|venv|PYTHON] [PATH]  "
         f"(default: auto, and {NAME} beside this interpreter)")


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else list(argv)
    light = "auto"
    if args[:1] == ["--light"] and len(args) >= 2:
        light, args = args[1], args[2:]
    if len(args) > 1 or (args and args[0].startswith("-")):
        print(USAGE, file=sys.stderr)
        return 2
    path = args[0] if args else os.path.join(os.path.dirname(sys.executable), NAME)
    packages = package_dir()
    if light == "venv":
        light = sys.executable
    elif light == "auto":
        light = choose_light(sys.executable, packages)
    elif not _runs_light_path(light, packages):
        print(f"supervisor.launch.launcher: {light} does not run the light actions (CPython "
              f"{'.'.join(map(str, LIGHT_MIN))} or later, stdlib only)", file=sys.stderr)
        return 1
    try:
        if light != sys.executable and not compile_for(light, packages):
            print(f"supervisor.launch.launcher: no bytecode for {light} in {packages}: "
                  f"start and delete stay in {sys.executable}", file=sys.stderr)
            light = sys.executable
        write(path, packages=packages, light=light)
    except (OSError, ValueError) as e:
        print(f"supervisor.launch.launcher: {path}: {e}", file=sys.stderr)
        return 1
    print(path if light == sys.executable else f"{path} (start, delete: {light})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
