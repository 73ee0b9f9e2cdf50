"""Protobuf unary handlers for a ttrpc service: decode, call, encode, map errors once.

Both of the shim's services (Task, Introspect) are tables of ``method name ->
(request class, coroutine)``; :func:`handlers` turns such a table into the
``bytes -> bytes`` handlers :class:`supervisor.ttrpc.Server` registers.  A
service's ``status_of`` is its one error boundary: every exception leaves the
service as the ttrpc status it maps to; the ones it maps to ``UNKNOWN`` or
``INTERNAL`` (bugs, not refusals) are logged with their traceback unless the
service calls them ``expected``.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from google.protobuf.message import Message

from supervisor.ttrpc import CallContext, Code, RPCError

Handler = Callable[[CallContext, bytes], Awaitable[bytes]]
Method = Callable[[Any], Awaitable[Message]]


def handlers(
    service: str,
    table: Iterable[tuple[str, type[Message], Method]],
    *,
    status_of: Callable[[BaseException], RPCError],
    log: logging.Logger,
    expected: tuple[type[BaseException], ...] = (),
) -> dict[str, Handler]:
    def unary(name: str, cls: type[Message], fn: Method) -> Handler:
        async def handler(ctx: CallContext, payload: bytes) -> bytes:
            try:
                request = cls()
                request.ParseFromString(payload)
                response = await fn(request)
            except Exception as e:
                status = status_of(e)
                if status.code in (Code.UNKNOWN, Code.INTERNAL) and not isinstance(e, expected):
                    log.exception("%s/%s failed", service, name)
                else:
                    log.debug("%s/%s: %s", service, name, status)
                raise status from e
            return response.SerializeToString()

        return handler

    return {name: unary(name, cls, fn) for name, cls, fn in table}
