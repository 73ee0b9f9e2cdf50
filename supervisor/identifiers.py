"""containerd's identifier rules (``pkg/identifiers``), the one copy in the shim.

Design
------
containerd accepts as an id (of a container, an exec, a namespace, an event
topic's components) only a string of ASCII letters and digits, in runs joined
by single ``.``, ``_`` or ``-``, at most :data:`MAX_LENGTH` characters.  The
shim applies the same rule itself: a root client on the shim's socket need not
be containerd, and an id becomes part of a path (an exec's process spec and pid
file live in the bundle, named after its id), so ``../x`` must never get that
far.  :func:`check` refuses with :class:`~supervisor.errors.InvalidArgument`
(INVALID_ARGUMENT on the wire), naming the id.

Invariants
----------
* Stdlib only (and :mod:`supervisor.errors`): the light path and the event
  spool may import it without trio or protobuf.
* An id :func:`is_valid` accepts has no ``/``, is not ``.`` or ``..``, and is
  not empty: it is safe as one path component.
"""

from __future__ import annotations

import re

from supervisor.errors import InvalidArgument

__all__ = ["MAX_LENGTH", "check", "is_valid"]

#: containerd's ``identifiers.maxLength``.
MAX_LENGTH = 76
# containerd's ``^[A-Za-z0-9]+(?:[._-](?:[A-Za-z0-9]+))*$`` (ASCII classes; ``\Z``, not
# ``$``, which would accept a trailing newline).
_PATTERN = re.compile(r"[A-Za-z0-9]+(?:[._-][A-Za-z0-9]+)*\Z")
_SHOWN = 2 * MAX_LENGTH


def is_valid(value: str) -> bool:
    """Whether containerd would accept ``value`` as an identifier."""
    return len(value) <= MAX_LENGTH and _PATTERN.match(value) is not None


def check(value: str, what: str = "id") -> str:
    """``value`` if it is a valid identifier, else InvalidArgument naming it and the rule."""
    if is_valid(value):
        return value
    if not value:
        raise InvalidArgument(f"{what} must not be empty")
    # Named in full unless it is absurdly long (the message goes to logs and the client).
    shown = repr(value) if len(value) <= _SHOWN else f"{value[:_SHOWN]!r}..."
    if len(value) > MAX_LENGTH:
        raise InvalidArgument(f"{what} {shown} is longer than {MAX_LENGTH} characters")
    raise InvalidArgument(
        f"{what} {shown} is not a valid identifier: letters and digits, in runs joined "
        "by single '.', '_' or '-'")
