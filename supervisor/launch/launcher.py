"""The fast entry script: ``containerd-shim-supervisor-v2`` run as ``python -I -S``.

containerd waits for ``start`` and ``delete``, and most of what they cost
before our first line runs is the interpreter's: ``site`` (it scans the venv's
``site-packages`` and runs its ``.pth`` files) and, in the console script
pip writes, ``import re`` for one ``re.sub`` on ``argv[0]`` (re loads enum,
functools and the regex compiler).  A console script cannot carry interpreter
flags (pip writes its shebang itself, and drops any flags a data script's
``#!python`` line had), so this module writes the entry script instead::

    python -m supervisor.launch.launcher [PATH]

writes ``PATH`` (default: ``containerd-shim-supervisor-v2`` beside this
interpreter, over pip's console script) atomically, mode 0755: a shebang of
this interpreter (``sys.executable``: the venv's, never the one it links to)
with ``-IS`` (one word: Linux passes the rest of a shebang line as a single
argument), the directory holding the ``supervisor`` package put on
``sys.path`` after the standard library (so nothing there shadows it), then
:func:`supervisor.shim.main`.  ``make venv`` runs it; an installed copy runs it
once per install (README), instead of linking the console script.  The
console script and ``python -m supervisor.shim`` keep working as before, only
slower.

Design.  ``-S``: no ``site`` at start-up, so only the ``supervisor`` package
is importable until :func:`full_site` runs ``site.main()`` -- which the shim
does before it imports anything beyond the standard library (the daemon side;
``start``, ``delete`` and ``-info`` never do, runtime options included).
``-I``: no ``PYTHON*`` variables from containerd's environment and no script
directory on ``sys.path``, so nothing but the named package directory decides
what a root ``start`` imports.

Invariants.  The daemon a cold ``start`` spawns runs the same script
through ``sys.executable`` with no flags (:func:`supervisor.launch.start.daemon_argv`),
so it gets ``site`` as a console script would; inserting the package
directory again is then harmless.  The script holds two facts of its
install (the interpreter, the package directory): a moved venv or package
needs the script written again, as pip's own scripts would.
"""

from __future__ import annotations

import os
import sys

#: The binary containerd runs (``containerd-shim-<runtime>-v2``): one name for all.
NAME = "containerd-shim-supervisor-v2"
#: The interpreter flags of the entry script: isolated (``-I``), no ``site`` (``-S``).
FLAGS = "-IS"


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


def script_text(python: str, packages: str) -> str:
    """The entry script for interpreter ``python`` and package directory ``packages``."""
    if any(c.isspace() for c in python):
        raise ValueError(f"a shebang cannot name an interpreter path with spaces: {python!r}")
    return (f"#!{python} {FLAGS}\n"
            f"# {NAME}: written by `python -m supervisor.launch.launcher`; runs the shim\n"
            "# without site and isolated (see that module). Write it again if this moves.\n"
            "import sys\n"
            f"sys.path.append({packages!r})  # after the standard library: never shadows it\n"
            "from supervisor.shim import main\n"
            "sys.exit(main())\n")


def write(path: str, python: str | None = None, packages: str | None = None) -> None:
    """Write the entry script to ``path`` atomically (a temporary file, then rename)."""
    text = script_text(python or sys.executable, packages or package_dir())
    tmp = os.path.join(os.path.dirname(os.path.abspath(path)), f".{os.path.basename(path)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o755)
    try:
        os.write(fd, text.encode())
        os.fchmod(fd, 0o755)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) > 1 or (args and args[0].startswith("-")):
        print(f"usage: python -m supervisor.launch.launcher [PATH]  (default: {NAME} "
              "beside this interpreter)", file=sys.stderr)
        return 2
    path = args[0] if args else os.path.join(os.path.dirname(sys.executable), NAME)
    try:
        write(path)
    except (OSError, ValueError) as e:
        print(f"supervisor.launch.launcher: {path}: {e}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
