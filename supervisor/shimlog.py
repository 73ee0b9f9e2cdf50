"""The shim daemon's logging: records to the bundle's ``log`` FIFO, never blocking.

Kept out of :mod:`supervisor.launch` so that ``start`` and ``delete``, which
containerd waits for, do not pay for importing :mod:`logging`'s handler
machinery; the daemon (cold or forked) sets it up in
:func:`supervisor.daemon.action_serve`.

A shim serving several containers logs to the FIFO of the bundle it started
in, and moves to another container's FIFO before that bundle is deleted
(:meth:`FifoLogHandler.reopen`): containerd reads each bundle's FIFO only
while that container exists.

Invariant: logging never stalls the shim.  When nobody reads the FIFO (say
containerd is down) and it is full, records are counted and dropped.
"""

from __future__ import annotations

import logging
import os
import sys


class FifoLogHandler(logging.Handler):
    """Log records to the bundle's ``log`` FIFO without ever blocking.

    containerd reads that FIFO into its own log.  When nobody reads it (say
    containerd is down) and it is full, records are counted and dropped, so
    the shim never stalls on its own logging.
    """

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = os.path.abspath(path)
        self.fd = os.open(self.path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        self.dropped = 0

    def reopen(self, path: str) -> None:
        """Log to the FIFO at ``path`` from now on (a shared shim whose bundle is going)."""
        fd = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        self.acquire()
        try:
            old, self.fd, self.path = self.fd, fd, os.path.abspath(path)
        finally:
            self.release()
        os.close(old)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            data = (self.format(record) + "\n").encode(errors="replace")
            os.write(self.fd, data)
        except BlockingIOError:
            self.dropped += 1
        except Exception:
            self.handleError(record)


FORMAT = 'time="%(asctime)s" level=%(levelname)s msg="%(message)s" logger=%(name)s'


def fifo_handler() -> FifoLogHandler | None:
    """The root logger's FIFO handler, if logging goes to a bundle's FIFO."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, FifoLogHandler):
            return handler
    return None


def setup_logging(level: int, fifo: str = "log") -> None:
    """Log at ``level`` to the bundle's log FIFO ``fifo`` (relative: the working
    directory is the bundle), or to stderr when there is none ("" or unopenable)."""
    root = logging.getLogger()
    root.setLevel(level)
    fmt = logging.Formatter(FORMAT)
    handler: logging.Handler
    try:
        if not fifo:
            raise OSError("no log FIFO")
        handler = FifoLogHandler(fifo)
    except OSError:
        handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(fmt)
    root.addHandler(handler)
