"""Exception types of the ttrpc package, each saying whose fault the failure is.

Two independent axes:

* :class:`ProtocolError` -- bytes or calls that break the ttrpc protocol.  The
  subclass says who broke it: :class:`RemoteProtocolError` (the peer sent
  something malformed) or :class:`LocalProtocolError` (our own code asked the
  state machine for something the protocol forbids, e.g. an oversized request).
  Malformed input never raises anything but a ``ProtocolError``.
* :class:`ConnectionEnded` -- a connection can no longer carry calls.
  :class:`ConnectionClosed` means we closed it (``aclose()``, or a local
  cancellation left a write half-done); :class:`ConnectionBroken` means the peer
  went away or broke the protocol.

Invariant: every class carries a ``remote`` flag, ``True`` exactly when the
peer is to blame, so callers can log and retry without string matching.
"""

from __future__ import annotations

from typing import ClassVar

__all__ = [
    "ConnectionBroken",
    "ConnectionClosed",
    "ConnectionEnded",
    "LocalProtocolError",
    "ProtocolError",
    "RemoteProtocolError",
]


class ProtocolError(Exception):
    """The ttrpc protocol was violated; ``remote`` says by whom."""

    remote: ClassVar[bool] = True


class RemoteProtocolError(ProtocolError):
    """The peer sent bytes that break the protocol (its fault)."""

    remote = True


class LocalProtocolError(ProtocolError):
    """Our side asked for something the protocol forbids (our fault)."""

    remote = False


class ConnectionEnded(Exception):
    """The connection can no longer carry calls; ``remote`` says why."""

    remote: ClassVar[bool] = True


class ConnectionClosed(ConnectionEnded):
    """The connection was closed locally (by us), e.g. after ``aclose()``."""

    remote = False


class ConnectionBroken(ConnectionEnded):
    """The peer went away, reset the connection or broke the protocol."""

    remote = True
