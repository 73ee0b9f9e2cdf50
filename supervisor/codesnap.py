"""A copy of the code a shim runs, kept open, to exec back into if an upgrade fails.

Design
------
An in-place upgrade (:mod:`supervisor.upgrade`) execs the code installed now;
if that code cannot adopt the shim's state, the shim must go on with the code
it ran -- whose files are, by then, already replaced on disk.  So each shim
makes sure, once it serves (in a worker thread, off containerd's path), that
a zip of its running package exists: ``<dir>/<digest of its code
identity>.pyz`` holding ``supervisor/**/*.py`` and a ``__main__.py`` that runs
:func:`supervisor.upgrade.main`; and keeps it open for its whole life
(:class:`Snapshot`).  ``python -I /proc/self/fd/N ...`` runs it: the zip is
first on ``sys.path``, so ``supervisor`` comes from it.

Invariants
----------
* A snapshot is of the code the shim runs: the files' identity
  (:func:`supervisor.launch.forkclient.code_identity`) is read before and after
  the zip is written, and must be the identity the shim recorded when it
  started; otherwise there is no snapshot (and no upgrade: nothing to fall
  back to).
* Written atomically (a temporary file, then rename) in a 0700 directory, so
  another shim of the same code reads a whole file or none; one of the same
  code identity already there is used as it is.
* :mod:`zipfile` is imported only when a snapshot is written.
* Writing one removes the others (:func:`_prune`): their shims hold theirs open.
* Opening one that exists costs two syscalls and no thread
  (:func:`open_existing`): a worker thread started beside the first Create
  delayed it ~15 ms.
"""

from __future__ import annotations

import logging
import os

from supervisor.launch.digest import sha256_hex
from supervisor.launch.forkclient import code_identity

log = logging.getLogger("supervisor.codesnap")

#: Where snapshots are kept; ``$SUPERVISOR_CODE_DIR`` replaces it (tests).
DEFAULT_DIR = "/run/containerd/supervisor/code"
DIR_ENV = "SUPERVISOR_CODE_DIR"
MAIN = ("import sys\n"
        "from supervisor.upgrade import main\n"
        "sys.exit(main(sys.argv[1:]))\n")


def code_dir() -> str:
    return os.environ.get(DIR_ENV) or DEFAULT_DIR


def snapshot_path(code: str, directory: str | None = None) -> str:
    return os.path.join(directory or code_dir(), sha256_hex(code.encode())[:32] + ".pyz")


class Snapshot:
    """An open copy of the running code: :attr:`fd` (close-on-exec until an exec)."""

    def __init__(self, fd: int, path: str) -> None:
        self.fd = fd
        self.path = path

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _write_zip(path: str) -> None:
    import zipfile  # noqa: PLC0415 - only when a snapshot is written (rarely)

    import supervisor  # noqa: PLC0415 - the package's own directory

    root = os.path.dirname(os.path.abspath(supervisor.__file__))
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as z:
            z.writestr("__main__.py", MAIN)
            for folder, dirs, files in os.walk(root):
                dirs[:] = sorted(d for d in dirs if d != "__pycache__")
                for name in sorted(files):
                    if name.endswith(".py"):
                        full = os.path.join(folder, name)
                        z.write(full, os.path.join("supervisor", os.path.relpath(full, root)))
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def open_existing(code: str, directory: str | None = None) -> Snapshot | None:
    """The snapshot of the code whose identity is ``code``, if one was made (by any shim)."""
    path = snapshot_path(code, directory)
    try:
        return Snapshot(os.open(path, os.O_RDONLY | os.O_CLOEXEC), path)
    except FileNotFoundError:
        return None


def ensure(code: str, directory: str | None = None) -> Snapshot:
    """The snapshot of the running code, whose identity is ``code``, made if missing.

    Blocking (run it in a thread); OSError if it cannot be made, ValueError if
    the files on disk are not the running code any more.
    """
    directory = directory or code_dir()
    existing = open_existing(code, directory)
    if existing is not None:
        return existing
    path = snapshot_path(code, directory)
    os.makedirs(directory, mode=0o700, exist_ok=True)
    if code_identity() != code:
        raise ValueError("the code on disk changed since this shim started")
    _write_zip(path)
    if code_identity() != code:
        os.unlink(path)
        raise ValueError("the code on disk changed while it was copied")
    log.debug("code snapshot %s written", path)
    snapshot = Snapshot(os.open(path, os.O_RDONLY | os.O_CLOEXEC), path)
    _prune(directory, keep=path)
    return snapshot


def _prune(directory: str, keep: str) -> None:
    """Remove the snapshots of other code: each shim running it holds its own open (an
    unlinked file lives on while open), and a shim of that code started later writes it
    again.  So the directory (tmpfs: memory) holds about one copy per code installed,
    not one per code ever run."""
    try:
        names = os.listdir(directory)
    except OSError:
        return
    for name in names:
        path = os.path.join(directory, name)
        if name.endswith(".pyz") and path != keep:
            try:
                os.unlink(path)
            except OSError:
                pass
