"""The output backlog: ordered, bounded, on disk or in memory."""

from __future__ import annotations

from pathlib import Path

import pytest

from supervisor.io import Backlog


@pytest.mark.parametrize("on_disk", [True, False])
def test_order_and_limit(tmp_path: Path, on_disk: bool) -> None:
    b = Backlog(str(tmp_path) if on_disk else "", limit=100)
    b.append(b"a" * 60)
    b.append(b"b" * 60)  # 40 fit, 20 dropped
    assert (b.held, b.dropped) == (100, 20)
    got = b""
    while not b.empty:
        chunk = b.peek(30)
        b.consume(len(chunk))
        got += chunk
    assert got == b"a" * 60 + b"b" * 40
    b.append(b"c" * 10)  # room again once drained
    assert b.peek() == b"c" * 10
    assert b.spooled == 110
    b.close()


def test_partial_consume(tmp_path: Path) -> None:
    b = Backlog(str(tmp_path), limit=1 << 20)
    b.append(b"0123456789")
    b.consume(4)
    assert b.peek() == b"456789"
    b.append(b"ab")
    assert b.peek() == b"456789ab"
    b.close()


def test_unusable_directory_falls_back_to_memory(tmp_path: Path) -> None:
    b = Backlog(str(tmp_path / "missing"), limit=1 << 20)
    b.append(b"xyz")
    assert b.peek() == b"xyz"
    assert b.directory == ""
