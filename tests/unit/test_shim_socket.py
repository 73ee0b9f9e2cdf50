"""``start``'s socket claim: a socket between ``bind`` and ``listen`` is not taken for stale.

Between ``bind`` and ``listen`` a connect is refused exactly as on a dead shim's socket, so
a second ``start`` (the shared-shim churn on containerd 2.1 hit it: "[Errno 2] No such file
or directory: '/run/containerd/s/...'") would unlink the first one's socket and bind its
own. Scripted: the second ``start`` runs while the first is stopped inside ``new_listener``.
"""

from __future__ import annotations

import _socket
import os
import threading
from pathlib import Path

import pytest

from supervisor import shim


def test_replace_stale_waits_for_a_socket_being_bound(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = str(tmp_path / "s" / "sock")
    answers: list[_socket.socket | None] = []
    second = threading.Thread(target=lambda: answers.append(shim.replace_stale(path)))
    real_chmod = os.chmod

    def chmod_then_second_start(p: str, mode: int) -> None:  # inside new_listener
        real_chmod(p, mode)
        if second.ident is not None:
            return  # the second start's own bind
        second.start()
        second.join(2)  # without the lock it is done by now; with it, it waits for us

    monkeypatch.setattr(shim.os, "chmod", chmod_then_second_start)
    first = shim.new_listener(path)
    monkeypatch.undo()
    second.join(10)
    try:
        assert answers == [None]  # it found the first start's socket listening
        client = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
        client.connect(path)
        fd, _ = first._accept()  # the path still leads to the first start's socket
        os.close(fd)
        client.close()
    finally:
        first.close()
        for s in answers:
            if s is not None:
                s.close()


def test_new_listener_refuses_a_path_in_use(tmp_path: Path) -> None:
    path = str(tmp_path / "sock")
    first = shim.new_listener(path)
    try:
        with pytest.raises(OSError) as e:
            shim.new_listener(path)
        assert e.value.errno == shim.errno.EADDRINUSE
    finally:
        first.close()
