"""Private installs of the supervisor package, for the in-place upgrade tests (issue 17).

An upgrade is only real when the code on disk changes under running shims.  The
worktree's own venv cannot be changed under the tests (every other test runs it),
so a :class:`PrivateInstall` is a venv of its own (``python -m venv
--without-pip``: fast, no index) holding a plain copy of a ``supervisor``
package -- of a git commit (:meth:`PrivateInstall.install_commit`) or of the
worktree as it is (:meth:`PrivateInstall.install_worktree`) -- and the shim's
entry script written for it (``python -m supervisor.launch.launcher``).  The
third-party packages (trio, protobuf, psutil) come from the running venv through
a ``.pth`` line naming its site-packages: a directory added that way has its own
``.pth`` files ignored, so the worktree's editable install does not leak in and
``python -I -m supervisor...`` (how a shim runs its pre-flight and its new code)
imports the private copy.

A containerd runs the private shim when :attr:`PrivateInstall.bin` is first on
its ``PATH`` (:func:`use_install`).  Installing again replaces the copy in place,
as ``pip install`` of a new release would.
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import trio
from harness import REPO_ROOT, Containerd

#: The pytest option / environment variable naming the commit "previous release" is.
BASE_ENV = "SUPERVISOR_TEST_UPGRADE_BASE"
MARK_FILE = "supervisor/upgrade.py"


def git(*args: str, input: bytes | None = None) -> bytes:
    return subprocess.run(["git", "-C", str(REPO_ROOT), *args], input=input,
                          capture_output=True, check=True, timeout=60).stdout


def previous_commit(limit: int = 500) -> str | None:
    """The newest commit before HEAD that has ``supervisor/upgrade.py`` -- the previous
    installed package that can be upgraded in place -- or None (no such commit, or no git).

    HEAD's first-parent line first (after a merge of the upgrade's branches one by one,
    the merge before: all its parts together), then every ancestor, newest first.
    """
    try:
        first = git("rev-list", "--first-parent", f"--max-count={limit}", "HEAD").split()
        every = git("rev-list", f"--max-count={limit}", "HEAD").split()
        commits = list(dict.fromkeys(c.decode() for c in first[1:] + every[1:]))
        if not commits:
            return None
        query = "".join(f"{c}:{MARK_FILE}\n" for c in commits).encode()
        answers = git("cat-file", "--batch-check", input=query).decode().splitlines()
    except (OSError, subprocess.SubprocessError):
        return None
    for commit, answer in zip(commits, answers, strict=True):
        if not answer.endswith("missing"):
            return commit
    return None


def site_packages(venv: Path) -> Path:
    return venv / "lib" / f"python{sys.version_info[0]}.{sys.version_info[1]}" / "site-packages"


class PrivateInstall:
    """A venv of its own with a copy of the package (see the module docstring)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True,
                       capture_output=True, timeout=120)
        self.bin = root / "bin"
        self.python = self.bin / "python"
        self.site = site_packages(root)
        deps = Path(trio.__file__).resolve().parents[1]  # the running venv's site-packages
        (self.site / "_supervisor_test_deps.pth").write_text(f"{deps}\n")
        self.installed = ""

    def install_tree(self, tree: Path, label: str) -> None:
        """Replace the installed package with ``tree/supervisor`` and write the entry script."""
        target = self.site / "supervisor"
        if target.exists():
            shutil.rmtree(target)
        shutil.copytree(tree / "supervisor", target,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        # New files get new mtimes (the code identity is stats): like a pip install.  Their
        # bytecode now, as pip does: a __pycache__ made later would change the identity.
        subprocess.run([str(self.python), "-I", "-m", "compileall", "-q", str(target)],
                       check=True, capture_output=True, timeout=120)
        # The launcher's default: the binary (launcher.NAME) beside this interpreter.
        subprocess.run([str(self.python), "-I", "-m", "supervisor.launch.launcher"],
                       check=True, capture_output=True, timeout=60)
        self.installed = label

    def append(self, module: str, text: str) -> None:
        """Append ``text`` to the installed ``module`` (a path below site-packages) and
        compile it: a release with a defect."""
        path = self.site / module
        path.write_text(path.read_text() + "\n" + text)
        subprocess.run([str(self.python), "-I", "-m", "compileall", "-q", str(path)],
                       check=True, capture_output=True, timeout=60)
        self.installed += "+defect"

    def install_worktree(self) -> None:
        self.install_tree(REPO_ROOT, "worktree")

    def install_commit(self, commit: str, scratch: Path) -> None:
        data = git("archive", "--format=tar", commit, "supervisor")
        dest = scratch / f"tree-{commit[:12]}"
        dest.mkdir(parents=True)
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            tar.extractall(dest, filter="data")
        self.install_tree(dest, commit)

    def code_identity(self) -> str:
        """What this install's ``start`` computes (forkclient.code_identity, run by it)."""
        return subprocess.run(
            [str(self.python), "-I", "-c",
             "from supervisor.launch.forkclient import code_identity; print(code_identity())"],
            check=True, capture_output=True, text=True, timeout=60).stdout.strip()

    def supervisor(self, c: Containerd, *argv: str, timeout: float = 120
                   ) -> subprocess.CompletedProcess[str]:
        """This install's ``supervisor`` CLI on ``c``'s state dir and namespace."""
        return subprocess.run(
            [str(self.python), "-I", "-m", "supervisor.cli", *argv,
             "--state-dir", str(c.state), "--namespace", c.namespace],
            capture_output=True, text=True, timeout=timeout, check=False)


def use_install(c: Containerd, install: PrivateInstall | None) -> None:
    """Before ``c.start()``: its shims come from ``install`` (None: the worktree's venv).
    Their code snapshots go to a directory of ``c``'s own (``Containerd.env``)."""
    if install is not None:
        c.extra_env.pop("PATH", None)
        c.extra_env["PATH"] = os.pathsep.join([str(install.bin), c.env()["PATH"]])
