"""``_spawn.spawn``: a child gets the fds it is given and no other."""

from __future__ import annotations

import os

from supervisor.launch._spawn import spawn


def test_an_inherited_fd_does_not_reach_the_child() -> None:
    # A conformance runner's flock fd, leaked through containerd into `start`, was held by
    # the fork server `start` spawned for its whole life (the runner's next run blocked).
    leaked_r, leaked_w = os.pipe()
    os.set_inheritable(leaked_w, True)
    r, w = os.pipe()
    try:
        pid = spawn(["sh", "-c", "ls /proc/self/fd"], fds={1: w})
        os.close(w)
        w = -1
        with os.fdopen(r, closefd=False) as out:
            listed = {int(n) for n in out.read().split()}
        os.waitpid(pid, 0)
    finally:
        for fd in (r, w, leaked_r, leaked_w):
            if fd >= 0:
                os.close(fd)
    assert leaked_w not in listed
    assert {0, 1, 2} <= listed
