"""Fixtures shared by the unit tests of the fork server and the commands that drive it."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture
def place() -> Iterator[str]:
    """A socket path in a directory that does not exist yet (short: AF_UNIX)."""
    top = tempfile.mkdtemp(prefix="sv-fs-", dir="/tmp")
    try:
        yield os.path.join(top, "run", "fs.sock")
    finally:
        shutil.rmtree(top, ignore_errors=True)


@pytest.fixture
def spawned() -> Iterator[list[int]]:
    """Pids of the servers a test spawned: stopped (SIGKILL) and reaped afterwards."""
    pids: list[int] = []
    yield pids
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    """A listening unix socket, as ``start`` hands a shim (short path: AF_UNIX)."""
    with tempfile.TemporaryDirectory(prefix="sv-l-", dir="/tmp") as d:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(os.path.join(d, "shim.sock"))
        sock.listen(16)
        with sock:
            yield sock


@pytest.fixture
def bundle(tmp_path: Path) -> Path:
    b = tmp_path / "bundle"
    b.mkdir()
    return b
