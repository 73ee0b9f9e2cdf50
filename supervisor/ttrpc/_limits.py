"""How much one peer may make the ttrpc server hold: the defaults, in one place.

Every limit is *backpressure* or a refusal of a new connection, never an error
for a call that was read: a peer over a per-connection limit is simply not read
from until its calls finish, exactly as if the shim were slow.

The defaults and why:

* :data:`MAX_BUFFERED_BYTES` (4 MiB) per connection: request frames read and
  not yet answered, responses not yet written, and a partial frame in the
  decoder.  One maximum-size message (4 MiB) still gets through alone -- see
  ``ServerConnection.can_receive`` -- so a connection holds at most
  ``max(limit, 10 + MAX_MESSAGE_SIZE)`` plus one read (64 KiB).  containerd's
  requests are a few KiB (a Create's spec tens of KiB).
* :data:`MAX_CALLS` (1024) unanswered calls per connection.  containerd parks
  one ``Wait`` per process on its connection and may need to send the ``Kill``
  that ends them: a connection whose parked calls fill this cap is no longer
  read and would deadlock.  Keep it far above the processes one shim serves.
* :data:`MAX_CONNECTIONS` (256) connections at once; one more is accepted and
  closed at once (the listener keeps accepting).  containerd keeps one
  connection per *task* it runs on this shim -- a pod's containers and a
  shared shim's group each have their own -- plus short ones from the CLI; a
  refused connection of containerd's would make it treat that task's shim as
  dead, so the cap sits far above any pod's container count.
* Together: at most ``max_connections`` times the per-connection bound, about
  1 GiB with the defaults, and only for a peer (of our uid, which could as well
  kill the shim) that fills every connection on purpose; containerd's normal
  load holds kilobytes.
* :data:`FIRST_REQUEST_TIMEOUT` (60 s): a connection that has not sent one
  complete request that long after it was accepted is closed.  containerd
  calls as soon as it connects; a connection that has sent a request is never
  cut for being idle, since containerd's may be idle for days and losing it
  makes containerd treat the shim as dead.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = [
    "DEFAULT_LIMITS",
    "FIRST_REQUEST_TIMEOUT",
    "MAX_BUFFERED_BYTES",
    "MAX_CALLS",
    "MAX_CONNECTIONS",
    "Limits",
]

MAX_BUFFERED_BYTES = 4 << 20
MAX_CALLS = 1024
MAX_CONNECTIONS = 256
FIRST_REQUEST_TIMEOUT = 60.0


@dataclass(frozen=True, slots=True)
class Limits:
    """The server's limits (see the module docstring); ``Server(limits=...)``.

    ``first_request_timeout`` may be ``math.inf`` (no timeout); every other
    field is a positive int.
    """

    max_buffered_bytes: int = MAX_BUFFERED_BYTES
    max_calls: int = MAX_CALLS
    max_connections: int = MAX_CONNECTIONS
    first_request_timeout: float = FIRST_REQUEST_TIMEOUT

    def __post_init__(self) -> None:
        for name in ("max_buffered_bytes", "max_calls", "max_connections"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"ttrpc limit {name} must be a positive int, not {value!r}")
        timeout = self.first_request_timeout
        if (
            isinstance(timeout, bool)
            or not isinstance(timeout, int | float)
            or math.isnan(timeout)
            or timeout <= 0
        ):
            raise ValueError(
                f"ttrpc limit first_request_timeout must be a positive number of seconds, "
                f"not {timeout!r}"
            )


DEFAULT_LIMITS = Limits()
