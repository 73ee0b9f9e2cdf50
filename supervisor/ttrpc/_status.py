"""gRPC status codes and the exception that carries one across a ttrpc call.

ttrpc reuses ``google.rpc.Status`` for call outcomes, so the codes are gRPC's
(0 ``OK`` .. 16 ``UNAUTHENTICATED``).  :class:`RPCError` is raised by a handler
to choose the status the server replies with, and raised by the client when a
call ends with a non-OK status (or its deadline passes locally).

Invariant: ``RPCError.code`` is always a :class:`Code` other than ``OK``; a
numeric code outside the known range arrives as ``UNKNOWN`` with the number
kept in ``raw_code`` and in the message.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence

__all__ = ["Code", "RPCError"]


class Code(enum.IntEnum):
    """The gRPC status codes, with their wire values."""

    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    ABORTED = 10
    OUT_OF_RANGE = 11
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14
    DATA_LOSS = 15
    UNAUTHENTICATED = 16


def code_from_wire(raw: int) -> Code:
    """Map a wire status code to :class:`Code`; unknown numbers become ``UNKNOWN``."""
    try:
        return Code(raw)
    except ValueError:
        return Code.UNKNOWN


class RPCError(Exception):
    """A call ended with a non-OK status.

    ``details`` holds the status' ``google.protobuf.Any`` details as
    ``(type_url, value)`` pairs, untouched.
    """

    code: Code
    message: str
    details: tuple[tuple[str, bytes], ...]
    raw_code: int

    def __init__(
        self,
        code: Code | int,
        message: str = "",
        details: Sequence[tuple[str, bytes]] = (),
    ) -> None:
        raw = int(code)
        known = code_from_wire(raw)
        if known is Code.OK:
            raise ValueError("RPCError needs a non-OK status code")
        if known is Code.UNKNOWN and raw != Code.UNKNOWN:
            message = f"[status code {raw}] {message}"
        super().__init__(known, message)
        self.code = known
        self.raw_code = raw
        self.message = message
        self.details = tuple(details)

    def __str__(self) -> str:
        return f"{self.code.name}: {self.message}" if self.message else self.code.name

    def __repr__(self) -> str:
        return f"RPCError({self.code.name}, {self.message!r})"
